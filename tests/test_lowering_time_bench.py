"""benchmarks/lowering_time.py lowers real step programs for an H200 on a CPU-only host."""

from __future__ import annotations

import re

from benchmarks import lowering_time


def test_lowers_grid_programs_for_cuda_without_a_gpu(capsys):
    lowering_time.main(["--programs", "1"])
    out = capsys.readouterr().out
    rows = re.findall(r"^(decode|prefill) .*trace (\d+\.\d+) s, lower (\d+\.\d+) s", out, re.M)
    assert [r[0] for r in rows] == ["decode", "prefill"]
    assert all(float(r[2]) > 0 for r in rows)
    assert re.search(r"^2 programs: \d+\.\d+ s traced and lowered", out, re.M)


def test_inside_the_h200_target_kernels_take_their_gpu_lowering():
    from pallas_kernels._common import resolve_backend

    assert resolve_backend(None) == "interpret"  # a CPU host
    with lowering_time.target_h200():
        assert resolve_backend(None) == "gpu"  # attention and KV append lower as Triton kernels
    assert resolve_backend(None) == "interpret"  # restored
