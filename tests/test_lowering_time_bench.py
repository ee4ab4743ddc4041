"""benchmarks/lowering_time.py lowers real step programs for an H200 on a CPU-only host."""

from __future__ import annotations

import re

from benchmarks import lowering_time


def test_inside_the_h200_target_kernels_take_their_gpu_lowering():
    from pallas_kernels._common import resolve_backend

    assert resolve_backend(None) == "interpret"  # a CPU host
    with lowering_time.target_h200():
        assert resolve_backend(None) == "gpu"  # attention and KV append lower as Triton kernels
    assert resolve_backend(None) == "interpret"  # restored


def test_lowers_grid_programs_for_cuda_and_counts_their_kernels(capsys):
    """One run (lowering the grid's programs is the slow part): the per-program trace / lower
    times, and the Triton kernels each program carries."""
    lowering_time.main(["--programs", "1", "--kernels", "--quick"])
    out = capsys.readouterr().out
    rows = re.findall(r"^(decode|prefill) .*trace (\d+\.\d+) s, lower (\d+\.\d+) s", out, re.M)
    assert [r[0] for r in rows] == ["decode", "prefill"]
    assert all(float(r[2]) > 0 for r in rows)
    assert re.search(r"^2 programs: \d+\.\d+ s traced and lowered", out, re.M)
    per_program = [int(n) for n in re.findall(r"; (\d+) Triton kernels$", out, re.M)]
    assert len(per_program) == 2 and all(n > 0 for n in per_program)
    m = re.search(r"^Triton kernels: (\d+) instances in 2 programs, (\d+) distinct \((.*)\)$", out, re.M)
    assert m, out
    instances, distinct = int(m.group(1)), int(m.group(2))
    assert instances == sum(per_program) and 0 < distinct <= instances
    named = dict(item.rsplit(" ", 1) for item in m.group(3).split(", "))
    assert {"paged_attention", "arena_grouped_matmul"} <= set(named)
    assert sum(int(v) for v in named.values()) == distinct


def test_triton_kernels_are_told_apart_by_their_ir():
    call = ('%0 = stablehlo.custom_call @__gpu$xla.gpu.triton(%a) {{backend_config = {{ir = "{ir}", '
            'name = "{name}"}}}} : (tensor<4xf32>) -> tensor<4xf32>\n')
    text = (call.format(ir="AAA", name="k1") + call.format(ir="AAA", name="k1")
            + call.format(ir="BBB", name="k1") + call.format(ir="CCC", name="k2"))
    kernels = lowering_time.triton_kernels(text)
    assert sorted(kernels.values()) == ["k1", "k1", "k2"]  # 4 calls, 3 distinct IRs
