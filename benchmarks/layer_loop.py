"""The layer loop (issue 15 item 1): compile time and step time of the one-program step with the
layers as `lax.scan` loops (`pooled_step.run_layers`) vs every layer emitted straight (the step
before the loop), same spec and inputs, in one run, on one device (colocated group).

    PYTHONPATH=. python -m benchmarks.layer_loop [--models olmoe,olmoe@32] [--batch 32]
        [--context 2048] [--steps-per-call 4] [--prefill-tokens 512] [--iters 10] [--json OUT]
        [--variants unrolled,loop] [--xla-option KEY=VALUE ...]

--variants: "unrolled" (every layer emitted), "loop" (the engine's step), "loop+options" (the
loop compiled with the --xla-option options, e.g. xla_gpu_autotune_level=0: what they save in
compile time and cost in step time).

Default models: OLMoE-1B-7B shapes (16 layers) and the same with 32 layers (compile time vs depth).
Per model and variant: seconds to trace + lower + compile the decode program (K steps per call)
and a prefill program (one chunk of `--prefill-tokens` tokens of one request), then the decode
program's ms per decode step (median of `--iters` calls / K) and its ratio to the roofline of
benchmarks/step.py (bytes one decode step must read / copy bandwidth measured in this run), and the
prefill program's ms per call (median of `--iters`).

Correctness first: the first decode call's tokens of every variant must equal the first
variant's (same random weights and KV), and the demo models (demo-deepseek-v3: dense first layer,
then MoE: two loop segments) through a colocated runner equal the reference path.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import numpy as np

from benchmarks.kernels import copy_bandwidth
from benchmarks.precompile_bench import parse_option
from benchmarks.step import MODELS, build_store, decode_inputs, olmoe_config, roofline_bytes
from crosspool_jax.execution.pooled_step import (
    LaneShape,
    StepSpec,
    build_step,
    empty_lane_inputs,
    input_shapes,
    layer_segments,
    layer_signatures,
    model_geometry,
    one_model_group_inputs,
)
from pallas_kernels.page_layout import PoolLayout


def prefill_inputs(store: Any, cfg: Any, tpp: int, tokens: int, rng: np.random.Generator,
                   context: int = 0, requests: int = 1) -> tuple[dict[str, np.ndarray], int]:
    """`requests` requests' prefill chunks of `tokens` tokens each (one call of requests x tokens
    rows), every one after `context` tokens of its own KV, on KV device 0: (lane inputs, pages per
    layer row P)."""
    n, L, B = store.num_devices, cfg.num_layers, requests
    T = B * tokens
    pages = -(-(context + tokens) // tpp)
    P = 1 << (max(pages, 1) - 1).bit_length()
    arr = empty_lane_inputs(n, B, T, L, P, 1, decode=False)
    arr["remaining"][:] = 1
    arr["tokens"][0] = rng.integers(0, cfg.vocab_size, T)
    arr["positions"][0] = np.tile(np.arange(context, context + tokens), B)
    arr["tok_slot"][0] = np.repeat(np.arange(B), tokens)
    arr["cu_q"][0] = np.arange(B + 1) * tokens
    ids = rng.permutation(store.kv_pages)[: B * L * pages] + store.kv_first_page
    arr["tail_pages"][0, :, :, :pages] = ids.reshape(B, L, pages)
    arr["tail_len"][0] = context + tokens
    arr["sample_row"][0] = (np.arange(B) + 1) * tokens - 1
    arr.update(one_model_group_inputs(store, "m", [T], T, B))
    arr["grp_slots"][0, 0] = B
    return arr, P


def compile_seconds(spec: StepSpec, store: Any, platform: str,
                    options: dict[str, Any] | None = None) -> tuple[Any, float]:
    """`spec`'s program traced, lowered and compiled ahead of time (with XLA `options`), and the
    seconds that took."""
    arena = jax.ShapeDtypeStruct(store.arena.shape, store.arena.dtype, sharding=store.sharding)
    t0 = time.perf_counter()
    prog = build_step(spec, store, platform).lower(arena, input_shapes(spec, store)).compile(
        compiler_options=options or None)
    return prog, time.perf_counter() - t0


def median_call_seconds(prog: Any, store: Any, inputs: tuple, iters: int) -> float:
    """Median seconds of `prog` on (arena, inputs) over `iters` calls after 2 untimed ones."""
    for _ in range(2):
        store.arena, out = prog(store.arena, inputs)
    jax.block_until_ready(out)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        store.arena, out = prog(store.arena, inputs)
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def run_model(name: str, args: argparse.Namespace, dev: jax.Device, bw: float) -> list[dict[str, Any]]:
    base, _, depth = name.partition("@")  # "olmoe@32": OLMoE shapes with 32 layers
    cfg = olmoe_config(num_hidden_layers=int(depth)) if depth and base == "olmoe" else MODELS[base]()
    platform = "gpu" if dev.platform in ("gpu", "cuda") else "cpu"
    be = None if platform == "gpu" else "reference"  # CPU: a smoke run on plain-XLA kernels
    layout = PoolLayout(262144, "bfloat16", 128, 1) if be is None else PoolLayout(16384, "bfloat16", 64, 1)
    geom = model_geometry(cfg, layout, platform)
    tpp = geom.tokens_per_page
    k = args.steps_per_call
    need = args.batch * -(-(args.context + k) // tpp) * cfg.num_layers + 1
    need = max(need, -(-args.prefill_tokens // tpp) * cfg.num_layers + 1)
    store, _ = build_store(cfg, None, dev, layout, need)
    rng = np.random.default_rng(0)
    arr = decode_inputs(store, cfg, tpp, args.batch, args.context, k, rng)
    arr.update(one_model_group_inputs(store, "m", [args.batch], args.batch, args.batch))
    P = arr["tail_pages"].shape[-1]
    dec_in = ({key: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding) for key, v in arr.items()},)
    parr, pp = prefill_inputs(store, cfg, tpp, args.prefill_tokens, rng)
    pre_in = ({key: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding) for key, v in parr.items()},)
    cls = store.models["m"].cls
    roof = roofline_bytes(cfg, args.batch, args.context, geom.bytes_per_token_used)
    segs = layer_segments(layer_signatures([cfg]))
    rows, tokens = [], {}
    loop = f"loop ({len(segs)} segment{'s' if len(segs) > 1 else ''})"
    for variant in args.variants.split(","):
        unroll, options = variant == "unrolled", (args.options if variant == "loop+options" else None)
        label = {"unrolled": "unrolled", "loop": loop, "loop+options": f"{loop} {args.options}"}[variant]
        dspec = StepSpec((LaneShape(cls, 1, args.batch, args.batch, P),), True, k, be,
                         matmul_backend=be, unroll_layers=unroll)
        pspec = StepSpec((LaneShape(cls, 1, 1, args.prefill_tokens, pp),), False, 1, be,
                         matmul_backend=be, unroll_layers=unroll)
        dprog, dsec = compile_seconds(dspec, store, platform, options)
        pprog, psec = compile_seconds(pspec, store, platform, options)
        store.arena, out = dprog(store.arena, dec_in)
        tokens[variant] = np.asarray(out[0])
        ms = median_call_seconds(dprog, store, dec_in, args.iters) / k * 1e3
        pre_ms = median_call_seconds(pprog, store, pre_in, args.iters) * 1e3
        floor_ms = roof["total"] / bw * 1e3
        row = {"model": name, "variant": label, "layers": cfg.num_layers,
               "decode_compile_s": round(dsec, 2), "prefill_compile_s": round(psec, 2),
               "ms_per_step": round(ms, 3), "x_roofline": round(ms / floor_ms, 3),
               "prefill_ms": round(pre_ms, 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del dprog, pprog
    # each call reads only the random KV below the context and what it appends itself, so every
    # variant's first call sees the same values
    first = next(iter(tokens.values()))
    rows.append({"model": name, "variant": "tokens equal (first decode call)",
                 "equal": all(bool(np.array_equal(first, t)) for t in tokens.values())})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def check_tiny(dev: jax.Device) -> dict[str, bool]:
    """demo models (float32) through a colocated runner (loop) vs the reference path."""
    import jax.numpy as jnp

    from crosspool_jax.demo import demo_models
    from crosspool_jax.execution.pool_runner import GroupRunner
    from crosspool_jax.execution.sampling import SamplingParams
    from crosspool_jax.models.reference import ReferenceGenerator

    out = {}
    gpu = dev.platform in ("gpu", "cuda")
    runner = GroupRunner(None, PoolLayout(16384, "float32", 64, 2048), 1024, colocated=dev,
                         platform="gpu" if gpu else "cpu", backend=None if gpu else "reference")
    for nm, m in demo_models().items():
        w = jax.tree.map(lambda a: a.astype(jnp.float32), m.weights)
        runner.add_model(nm, m.config, w)
        prompt = [3, 17, 42, 99, 5, 250, 7]
        ref = list(ReferenceGenerator(m.config, w).generate(prompt, 16).token_ids)
        runner.submit(nm, nm, prompt, 16, SamplingParams())
        got: list[int] = []
        while runner.has_work:
            got += runner.step().tokens.get(nm, [])
        out[nm] = got == ref
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="olmoe,olmoe@32",
                    help="benchmarks/step.py's MODELS; olmoe@N: OLMoE shapes with N layers")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps-per-call", type=int, default=4)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", default="unrolled,loop", help="of unrolled, loop, loop+options")
    ap.add_argument("--xla-option", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    args.options = dict(parse_option(o) for o in args.xla_option)
    if "loop+options" in args.variants and not args.options:
        ap.error("variant loop+options needs --xla-option")
    dev = jax.devices()[0]
    check = check_tiny(dev)
    print(json.dumps({"correctness vs reference": check}), flush=True)
    bw = copy_bandwidth(1 << 30 if dev.platform in ("gpu", "cuda") else 1 << 24)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args, dev, bw)
        jax.clear_caches()
    print(f"\n{dev.device_kind}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'model':16s} {'variant':28s} {'dec compile s':>13s} {'pre compile s':>13s} {'ms/step':>8s} "
          f"{'x roof':>7s} {'prefill ms':>10s}")
    for r in rows:
        if "ms_per_step" in r:
            print(f"{r['model']:16s} {r['variant']:28s} {r['decode_compile_s']:13.2f} "
                  f"{r['prefill_compile_s']:13.2f} {r['ms_per_step']:8.3f} {r['x_roofline']:7.3f} "
                  f"{r['prefill_ms']:10.3f}")
        else:
            print(f"{r['model']:16s} {r['variant']:28s} equal={r['equal']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "copy_bandwidth": bw, "args": vars(args),
                       "correctness": check, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
