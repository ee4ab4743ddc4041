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
