"""Host seconds to trace and lower step programs for an H200, on any machine (no GPU needed).

The Python half of a step program's compile (tracing, then lowering to StableHLO with the Triton
kernels' IR) holds the GIL, so in `PooledEngine.precompile`'s threads it runs one program at a
time; XLA's and Triton's compile of the lowered module (not timed here) runs outside it. This
times the first --programs decode and --programs prefill programs of the one-lane bucket grid
(the GPU's coarse buckets) of OLMoE-1B-7B's layer structure (16 layers, 64 experts top-8; hidden
sizes shrunk so the models fit a CPU host's memory: lowering time follows the program's ops, not
its dimensions), lowered for CUDA as on an H200 (`target_h200`: every kernel takes its GPU
lowering, with the H200 as the Triton target). To compare two commits, run it in a worktree of
each (this file copied into the older one):

    PYTHONPATH=. JAX_PLATFORMS=cpu python -m benchmarks.lowering_time [--programs 4] [--repeat 2]

--quick (the test's run) gives the models 8 experts instead of 64 and a 512-MiB arena instead of
3 GiB: the same programs' structure (op for op; the grouped matmuls' group count is data), but
the setup writes an eighth of the weights; its times are not the benchmark's.

With --kernels it also counts the Triton kernels the picked programs carry (`--programs 0`: the
whole grid): kernel instances (one per distinct kernel of a program) against distinct kernels
over the programs (by their Triton IR), per kernel name. XLA compiles every instance again unless
its kernel cache (`JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=all`) has it, so the ratio bounds what
that cache can save of the kernels' compile.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
from jax._src.pallas.triton import gpu_info

from benchmarks.step import olmoe_config
from crosspool_jax.engine import EngineConfig, PooledEngine
from crosspool_jax.execution.pooled_step import StepSpec, build_step, input_shapes
from crosspool_jax.execution.step_programs import ShapeBuckets

# OLMoE-1B-7B's structure at CPU-sized widths
SMALL = dict(hidden_size=256, intermediate_size=128, vocab_size=1024, num_attention_heads=2,
             num_key_value_heads=2)
QUICK = dict(num_experts=8, num_experts_per_tok=2)  # --quick


@contextlib.contextmanager
def target_h200() -> Iterator[None]:
    """Inside, the step programs lower as on an H200: the kernels that pick their backend from the
    platform (`pallas_kernels._common.resolve_backend`: attention, KV append) take their GPU
    kernels, not the interpreter, and Pallas' Triton lowering, which asks the local GPU for its
    compute capability, gets an H200's."""
    info = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H200)
    saved = gpu_info.get_gpu_info, jax.default_backend
    gpu_info.get_gpu_info = lambda *a, **k: info
    jax.default_backend = lambda: "gpu"
    try:
        yield
    finally:
        gpu_info.get_gpu_info, jax.default_backend = saved


def time_lowering(spec: StepSpec, store: Any) -> tuple[float, float, Any]:
    """(trace seconds, lower seconds, the lowered program) of `spec`'s step program for CUDA."""
    arena = jax.ShapeDtypeStruct(store.arena.shape, store.arena.dtype, sharding=store.sharding)
    t0 = time.perf_counter()
    traced = build_step(spec, store, "gpu").trace(arena, input_shapes(spec, store))
    t1 = time.perf_counter()
    lowered = traced.lower(lowering_platforms=("cuda",))
    return t1 - t0, time.perf_counter() - t1, lowered


_TRITON_CALL = re.compile(r'custom_call @__gpu\$xla\.gpu\.triton\(.*?\{(.*?)\}\s*:', re.S)


def triton_kernels(module_text: str) -> dict[str, str]:
    """The Triton kernels of a lowered module's text: {digest of the kernel's IR: kernel name}."""
    out = {}
    for m in _TRITON_CALL.finditer(module_text):
        attrs = m.group(1)
        ir = re.search(r'ir = "([^"]*)"', attrs)
        name = re.search(r'name = "([^"]*)"', attrs)
        digest = hashlib.sha1((ir.group(1) if ir else attrs).encode()).hexdigest()
        out[digest] = name.group(1) if name else "?"
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=4, help="decode and prefill programs, each")
    ap.add_argument("--repeat", type=int, default=1,
                    help="times each program is lowered (the best is printed)")
    ap.add_argument("--kernels", action="store_true",
                    help="also count the programs' Triton kernels: instances vs distinct (module docstring)")
    ap.add_argument("--quick", action="store_true",
                    help="8 experts and a 512-MiB arena: checks the script (module docstring)")
    args = ap.parse_args(argv)
    arena = (512 << 20) if args.quick else (3 << 30)
    engine = PooledEngine(mode="shared", pools="1", devices=jax.devices()[:1], config=EngineConfig(
        arena_bytes=arena, page_bytes=256 << 10, prefill_chunk=2048, weights_fraction=0.6))
    group = engine.groups[0]
    group.warm_programs = 0  # no background compiles beside the timing
    group.buckets = ShapeBuckets.coarse()  # the GPU's grid, not the CPU's finer one
    for i in range(3):
        engine.add_random_model(f"olmoe-{i:02d}", olmoe_config(**SMALL, **(QUICK if args.quick else {})),
                                seed=i)
    specs = group.bucket_specs(131072, 64)
    n = args.programs or len(specs)
    pick = [s for s in specs if s.decode][:n] + [s for s in specs if not s.decode][:n]
    total, instances, names = 0.0, 0, {}
    for spec in pick:
        with target_h200():
            times = [time_lowering(spec, group.store) for _ in range(args.repeat)]
        best = min(times, key=lambda t: t[0] + t[1])
        total += best[0] + best[1]
        ln = spec.lanes[0]
        kernels = triton_kernels(best[2].as_text()) if args.kernels else {}
        instances += len(kernels)
        names.update(kernels)
        print(f"{'decode' if spec.decode else 'prefill':8s} slots={ln.slots:<4d} tokens={ln.tokens:<5d} "
              f"pages={ln.max_pages:<5d} G={ln.groups}: trace {best[0]:.2f} s, lower {best[1]:.2f} s "
              f"(best of {args.repeat})" + (f"; {len(kernels)} Triton kernels" if args.kernels else ""),
              flush=True)
    print(f"{len(pick)} programs: {total:.2f} s traced and lowered ({total / max(len(pick), 1):.2f} s "
          f"each; {len(specs)} programs in this grid)")
    if args.kernels:
        per_name = collections.Counter(names.values())
        print(f"Triton kernels: {instances} instances in {len(pick)} programs, {len(names)} distinct ("
              + ", ".join(f"{k} {v}" for k, v in per_name.most_common()) + ")")
    engine.shutdown(timeout=0)


if __name__ == "__main__":
    main()
