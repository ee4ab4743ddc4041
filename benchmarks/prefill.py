"""Whole-prompt prefill through the engine's step program (issue 16): tokens/s and model-FLOP
utilisation for OLMoE-1B-7B and Qwen3-30B-A3B shapes at prompts of 512, 4K and 32K tokens, beside
an XLA-only version of the same math, in one run.

    PYTHONPATH=. python -m benchmarks.prefill [--shapes olmoe-1b-7b,qwen3-30b-a3b] \\
        [--prompts 512,4096,32768] [--chunk 4096] [--batch 1,2] [--variants engine,xla] \\
        [--iters 5] [--json OUT]                                                 # one GPU
    JAX_PLATFORMS=cpu PYTHONPATH=. python -m benchmarks.prefill --smoke            # CPU, tiny

Variants (the same `pooled_step` program, one request, colocated on the first device):
- engine: the engine's kernels on the platform (GPU: the Pallas prefill attention over the paged KV
  and the arena grouped matmul reading weights in place), its default attention kernels
  (`pallas_kernels.dispatch.DEFAULT_ATTENTION_KERNELS`);
- triton / mosaic / auto: the engine with `attention_kernels` "triton" / "mosaic" / "auto" (the
  same program with each prefill chunk's attention on that kernel family; "mosaic" falls back to
  Triton where the Mosaic kernel refuses the shapes; "auto" is `dispatch`'s Hopper rule);
- xla: attention by the jnp reference over the same pages and the experts by XLA's `ragged_dot`
  over weights sliced from the arena (`backend` / `matmul_backend` "reference").
On CPU both variants are the XLA reference (the Pallas kernels run only interpreted there):
`--smoke` checks the script, not the kernels. A prompt of P tokens is prefilled as the engine does
it: calls of `--chunk` tokens (the GPU default `max_prefill_tokens`), each after the KV of the
chunks before it. `--batch B[,B2...]` prefills B prompts side by side, as the engine's step does
when several requests wait (its `max_prefill_tokens` is then the call's total): each call holds
`--chunk` tokens of each of the B prompts (B x chunk rows), and tokens/s counts all B prompts.
One program per (shape, prompt, batch, variant) serves all of a prompt's chunks (page tables as
wide as the whole prompt), each chunk timed at its own context (median of `--iters` calls after 2
untimed); a prompt's seconds are the sum over its chunks. Past 8 chunks, 8 evenly spaced chunks
are timed and the others interpolated linearly in their start position (the output says which).
Model FLOPs per chunk: `prefill_cost.chunk_work` (2 x the active parameters per token, the
top-k experts only, plus the causal attention products), the same count the engine's prefill budget
prices. MFU = model FLOPs / seconds / the bf16 matmul peak measured in the same run (a square
matmul, median).

Correctness first: demo-mixtral and demo-qwen3-moe (float32 arena; `--smoke`: demo-mixtral) prefill
prompts of 1, 2 and 3 chunks through both variants on this device and must sample the greedy token
the reference path (`ReferenceGenerator`) gives after each. The table prints last.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.calibrate import build
from benchmarks.kernels import matmul_peak
from benchmarks.layer_loop import median_call_seconds, prefill_inputs
from benchmarks.runner import GPU_MEM_FRACTION, GPU_PRESET_MAX_PREFILL_TOKENS, model_config
from crosspool_jax.execution.pooled_step import LaneShape, StepSpec, build_step, input_shapes, model_geometry
from crosspool_jax.execution.prefill_cost import chunk_work
from crosspool_jax.models.costs import model_costs
from pallas_kernels.dispatch import DEFAULT_ATTENTION_KERNELS
from pallas_kernels.page_layout import PoolLayout

VARIANTS = ("engine", "triton", "mosaic", "auto", "xla")
DEFAULT_VARIANTS = ("engine", "xla")
KERNELS = {"engine": DEFAULT_ATTENTION_KERNELS, "triton": "triton", "mosaic": "mosaic", "auto": "auto",
           "xla": "triton"}
MAX_TIMED_CHUNKS = 8
GPU_SHAPES = ("olmoe-1b-7b", "qwen3-30b-a3b")
GPU_PROMPTS = (512, 4096, 32768)


def timed_chunks(n_chunks: int) -> list[int]:
    """Which chunks of a prompt are timed: all up to `MAX_TIMED_CHUNKS`, else that many evenly
    spaced ones, the first and the last included."""
    if n_chunks <= MAX_TIMED_CHUNKS:
        return list(range(n_chunks))
    return sorted({round(i * (n_chunks - 1) / (MAX_TIMED_CHUNKS - 1)) for i in range(MAX_TIMED_CHUNKS)})


def prompt_seconds(times: dict[int, float], n_chunks: int) -> float:
    """A prompt's seconds from its timed chunks (`times`: chunk index -> seconds), the others
    interpolated linearly between their timed neighbours."""
    idx = sorted(times)
    return float(np.interp(np.arange(n_chunks), idx, [times[i] for i in idx]).sum())


def prompt_variant(store: Any, cfg: Any, platform: str, prompt: int, chunk: int, variant: str,
                   iters: int, rng: np.random.Generator, batch: int = 1) -> dict[str, Any]:
    """`batch` prompts' prefill, side by side, under one variant: compile seconds, per timed chunk
    its seconds, the prompts' seconds, tokens/s (all of them) and model FLOPs."""
    tpp = model_geometry(cfg, store.layout, platform).tokens_per_page
    t = min(chunk, prompt)
    n_chunks = -(-prompt // t)
    be = "reference" if variant == "xla" or platform == "cpu" else None
    cls = store.models["m"].cls
    _, width = prefill_inputs(store, cfg, tpp, t, rng, context=(n_chunks - 1) * t, requests=batch)
    spec = StepSpec((LaneShape(cls, 1, batch, batch * t, width),), False, 1, be, matmul_backend=be,
                    attention_kernels=KERNELS[variant])
    sds = jax.ShapeDtypeStruct(store.arena.shape, store.arena.dtype, sharding=store.sharding)
    t0 = time.perf_counter()
    prog = build_step(spec, store, platform).lower(sds, input_shapes(spec, store)).compile()
    compile_s = time.perf_counter() - t0
    geom = model_geometry(cfg, store.layout, platform)
    costs = model_costs(cfg, store.layout.dtype, geom.bytes_per_token_used)
    times: dict[int, float] = {}
    for c in timed_chunks(n_chunks):
        arr, p = prefill_inputs(store, cfg, tpp, t, rng, context=c * t, requests=batch)
        if p < width:  # the program's page tables are the whole prompt's
            pad = np.full((*arr["tail_pages"].shape[:-1], width - p), -1, np.int32)
            arr["tail_pages"] = np.concatenate([arr["tail_pages"], pad], axis=-1)
        inputs = ({k: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding) for k, v in arr.items()},)
        times[c] = median_call_seconds(prog, store, inputs, iters)
    seconds = prompt_seconds(times, n_chunks)
    work = [chunk_work(costs, c * t, min(prompt, (c + 1) * t)) for c in range(n_chunks)]
    flops = batch * sum(w.dense_flops + w.attention_flops for w in work)
    return {"variant": variant, "prompt": prompt, "batch": batch, "chunk": t, "chunks": n_chunks,
            "timed_chunks": sorted(times), "compile_s": round(compile_s, 2),
            "chunk_s": {str(c): round(s, 6) for c, s in sorted(times.items())}, "seconds": seconds,
            "tokens_per_s": batch * prompt / seconds, "model_flops": flops,
            "attention_share": batch * sum(w.attention_flops for w in work) / flops}


def check_correctness(platform: str, names: tuple[str, ...]) -> dict[str, bool]:
    """Demo models `names` (float32) prefill prompts of 1, 2 and 3 chunks under both variants;
    the greedy token after each equals the reference path's."""
    from crosspool_jax.demo import demo_models
    from crosspool_jax.execution.pool_runner import GroupRunner
    from crosspool_jax.execution.sampling import SamplingParams
    from crosspool_jax.models.reference import ReferenceGenerator

    out = {}
    models = demo_models()
    prompt = [3 + (7 * i) % 200 for i in range(40)]
    for name in names:
        m = models[name]
        w = jax.tree.map(lambda a: a.astype(jnp.float32), m.weights)
        ref = ReferenceGenerator(m.config, w)
        want = [next(iter(ref.generate(prompt[:end], 1).token_ids)) for end in (16, 32, 40)]
        for variant in DEFAULT_VARIANTS:
            be = "reference" if variant == "xla" or platform == "cpu" else None
            r = GroupRunner(None, PoolLayout(16384, "float32", 64, 512), 256, colocated=jax.devices()[0],
                            platform=platform, backend=be, prefill_chunk=16, max_prefill_tokens=16,
                            warm_programs=0)
            r.add_model(name, m.config, w)
            got = []
            for end in (16, 32, 40):  # one request per prefix: the last chunk's token is sampled
                r.submit(f"{name}-{end}", name, prompt[:end], 1, SamplingParams())
                while r.has_work:
                    got += r.step().tokens.get(f"{name}-{end}", [])
            out[f"{name} {variant}"] = got == want
            if got != want:
                print(f"  {name} {variant}: greedy tokens {got}, reference {want}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(GPU_SHAPES))
    ap.add_argument("--prompts", default=",".join(str(p) for p in GPU_PROMPTS))
    ap.add_argument("--chunk", type=int, default=GPU_PRESET_MAX_PREFILL_TOKENS,
                    help=f"tokens of each prompt per call (default {GPU_PRESET_MAX_PREFILL_TOKENS}: the "
                         "engine's GPU max_prefill_tokens)")
    ap.add_argument("--batch", default="1",
                    help="comma-separated counts of prompts prefilled side by side, each call "
                         "holding --chunk tokens of each (default 1)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated subset of {','.join(VARIANTS)} (default "
                         f"{','.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU: demo-mixtral, prompts 16,64, chunk 16, float32 16-KiB pages")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    args = ap.parse_args(argv)
    # before JAX starts its backend: JAX's default pool (75% of the card) is smaller than the arena
    # of Qwen3-30B-A3B with KV for 32K-token prompts on an 80-GB card (its 59.87-GiB allocation
    # failed there, 2026-12-05); the bench's pool share (`runner.GPU_MEM_FRACTION`) unless set
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        ap.error(f"--variants {args.variants!r}: a subset of {','.join(VARIANTS)}")
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        ap.error(f"--batch {args.batch!r}: counts >= 1")
    platform = jax.devices()[0].platform
    platform = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
    if args.smoke:
        shapes, prompts, chunk, layout = ["demo-mixtral"], [16, 64], 16, PoolLayout(16384, "float32", 64, 1)
    else:
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        prompts = [int(p) for p in args.prompts.split(",")]
        chunk = args.chunk
        layout = (PoolLayout(262144, "bfloat16", 128, 1) if platform == "gpu"
                  else PoolLayout(16384, "float32", 64, 1))
    # IEEE fp32 matmuls on both sides: on a GPU XLA's default fp32 dot is tf32, which can flip a
    # near-tied greedy token of the reference (demo-qwen3-moe did on the H200, both variants).
    with jax.default_matmul_precision("highest"):
        ok = check_correctness(platform, ("demo-mixtral",) if args.smoke
                               else ("demo-mixtral", "demo-qwen3-moe"))
    print("correctness (greedy token per chunk = reference):", ok, flush=True)
    if not all(ok.values()):
        print("crosspool prefill bench: a variant differs from the reference; no timings", file=sys.stderr)
        return 1
    peak = matmul_peak(8192 if platform == "gpu" else 512, layout.dtype)
    rng = np.random.default_rng(0)
    rows = []
    for shape in shapes:
        cfg = model_config(f"{shape}-00" if not shape.startswith("demo-") else shape)
        tpp = model_geometry(cfg, layout, platform).tokens_per_page
        need = max(batches) * -(-max(prompts) // tpp) * cfg.num_layers + 1
        store, cfg = build(f"{shape}-00" if not shape.startswith("demo-") else shape, None,
                           jax.devices()[0], layout, need)
        for prompt in prompts:
            for batch, variant in itertools.product(batches, variants):
                r = prompt_variant(store, cfg, platform, prompt, chunk, variant, args.iters, rng, batch)
                r.update(shape=shape, mfu=r["model_flops"] / r["seconds"] / peak)
                rows.append(r)
                print(f"prefill {shape} P={prompt} x{batch} {variant}: {r['tokens_per_s']:,.0f} tokens/s, "
                      f"MFU {r['mfu']:.1%}, compile {r['compile_s']} s", flush=True)
        del store
    dev = jax.devices()[0]
    out = {"benchmark": "benchmarks/prefill.py", "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "command": " ".join(sys.argv), "device": dev.device_kind, "platform": platform,
        "jax": jax.__version__, "dtype": layout.dtype, "page_bytes": layout.page_bytes,
        "peak_flops": peak, "correctness": ok, "rows": rows}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    print(f"\n{dev.device_kind}; measured {layout.dtype} matmul peak {peak / 1e12:.1f} TFLOP/s")
    print(f"{'shape':16s} {'prompt':>7s} {'batch':>5s} {'call tokens':>11s} "
          f"{'variant':8s} {'tokens/s':>12s} {'MFU':>7s} {'attn':>6s} "
          f"{'engine/xla':>10s}")
    by = {(r["shape"], r["prompt"], r["batch"], r["variant"]): r for r in rows}
    for r in rows:
        x = by.get((r["shape"], r["prompt"], r["batch"], "xla"))
        ratio = f"{r['tokens_per_s'] / x['tokens_per_s']:.2f}x" if r["variant"] != "xla" and x else ""
        print(f"{r['shape']:16s} {r['prompt']:7d} {r['batch']:5d} {r['batch'] * r['chunk']:11d} "
              f"{r['variant']:8s} {r['tokens_per_s']:12,.0f} "
              f"{r['mfu']:7.1%} {r['attention_share']:6.1%} {ratio:>10s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
