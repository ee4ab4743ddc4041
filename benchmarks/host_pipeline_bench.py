"""Decode-step benchmark of the host-scheduled pipeline (crosspool_jax/host_pipeline.py, issue 5.8):
per-step time at several group sizes and micro-batch counts, KV pool on GPU 0, weights pool on
GPU 1, against the same programs colocated on GPU 0 and against the roofline of ../shared/DESIGN.md.

    PYTHONPATH=. python benchmarks/host_pipeline_bench.py [--model olmoe] [--batch 32] [--context 2048]
        [--steps 8] [--iters 5] [--configs 1x1,2x1,2x2,4x2,4x4] [--check 1x1,2x2] [--json OUT]
    PYTHONPATH=. python benchmarks/host_pipeline_bench.py --tiny     # CPU smoke run (2 host devices)

A config "MxG" is M micro-batches and group size G (layers per host call; G divides M; M / G lanes
in ping-pong; docs/host_pipeline.md). Needs 2 devices of one platform (device 0: KV pool, device 1:
weights pool).

Correctness first:
  1. tiny models (demo-mixtral at 2x1, demo-qwen3-moe at 2x2; float32, matmuls at full float32
     precision) through the pipeline on these two devices must equal the reference path
     (`ReferenceGenerator`) token for token;
  2. at the benchmark's shapes (OLMoE-1B-7B by default, bf16, random weights generated on the devices, random
     KV values over `--context` tokens), every config of `--check` must produce the same tokens on
     the 1+1 split as the same pipeline colocated on device 0 (the same programs on one device).
Other configs' tokens are compared with the colocated 1x1 run for information only (a different
micro-batch size changes the matmul shapes, so bf16 rounding may legitimately differ).
A failed check is printed and makes the script exit 1 after the table.

Timing: each config's `decode` call of `--steps` steps is run once (compiles) and then `--iters`
times; the table gives the median per decode step, the host's dispatch time per step (everything
is issued asynchronously; dispatch close to the step time means the host is the bottleneck), host
calls and device-to-device transfers per step, the ratio to the colocated 1x1 run and to the
roofline (bytes one decode step must read / copy bandwidth measured here, `benchmarks.step`'s
count). One more compile checks the attention program of the largest group for copies of the KV
arena (0 expected: K/V appended in place).
"""

from __future__ import annotations

import os
import sys

_FLAG = "--xla_force_host_platform_device_count=2"  # CPU (--tiny) needs 2 devices; no effect on GPU
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.kernels import copy_bandwidth  # noqa: E402
from benchmarks.step import MODELS, olmoe_config, roofline_bytes  # noqa: E402
from crosspool_jax.config import ModelConfig  # noqa: E402
from crosspool_jax.host_pipeline import (  # noqa: E402
    HostPipeline,
    PipelineConfig,
    PlacedModel,
    colocated_meshes,
    place_model,
    place_random_model,
)
from crosspool_jax.topology import EXPERT_AXIS, KV_AXIS  # noqa: E402


def tiny_config() -> ModelConfig:
    """OLMoE-shaped, small enough for a CPU smoke run (4 layers, D 128, 16 experts top-4)."""
    return olmoe_config(vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=8, num_experts=16,
                        num_experts_per_tok=4)


def parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        m, g = part.strip().lower().split("x")
        out.append((int(m), int(g)))
    return out


def split_meshes(devs: list[jax.Device]) -> tuple[jax.sharding.Mesh, jax.sharding.Mesh]:
    """KV pool = device 0, weights pool = device 1, each its own mesh."""
    return (jax.sharding.Mesh(np.array(devs[:1]), (KV_AXIS,)),
            jax.sharding.Mesh(np.array(devs[1:2]), (EXPERT_AXIS,)))


def check_reference(devs: list[jax.Device]) -> dict[str, bool]:
    """Tiny demo models through the pipeline on the 1+1 split vs `ReferenceGenerator` (float32)."""
    from crosspool_jax.demo import demo_models
    from crosspool_jax.reference import ReferenceGenerator

    models = demo_models()
    prompts = [[3, 17, 42, 99, 5], [250, 7, 11], [64, 65, 66, 67, 68, 69], [1, 2, 3, 4]]
    out = {}
    with jax.default_matmul_precision("float32"):
        for name, (mb, g) in (("demo-mixtral", (2, 1)), ("demo-qwen3-moe", (2, 2))):
            m = models[name]
            w = jax.tree.map(lambda a: a.astype(jnp.float32), m.weights)
            placed = place_model(m.config, w, *split_meshes(devs))
            pipe = HostPipeline(placed, PipelineConfig(group_size=g, micro_batches=mb), len(prompts), 32)
            got = pipe.generate(prompts, 12)
            ref = ReferenceGenerator(m.config, w)
            want = [list(ref.generate(p, 12).token_ids) for p in prompts]
            out[f"{name} {mb}x{g} == reference"] = got == want
    return out


def run_config(placed: PlacedModel, cfg: PipelineConfig, batch: int, context: int, steps: int, iters: int,
               tokens: np.ndarray, inplace_check: bool = False) -> tuple[dict[str, Any], np.ndarray]:
    """Builds the pipeline, fills its KV with random values, times `decode`; returns (row, tokens of
    the first call)."""
    pipe = HostPipeline(placed, cfg, batch, context + steps)
    pipe.fill_kv_random(seed=1)
    positions = np.full(batch, context, np.int32)
    t0 = time.perf_counter()
    first = pipe.decode(tokens, positions, steps)
    compile_s = time.perf_counter() - t0
    walls, dispatch = [], []
    for _ in range(iters):
        pipe.decode(tokens, positions, steps)
        walls.append(pipe.last_stats.wall_s)
        dispatch.append(pipe.last_stats.dispatch_s)
    st = pipe.last_stats
    row: dict[str, Any] = {
        "micro_batches": cfg.micro_batches, "group_size": cfg.group_size, "lanes": cfg.lanes,
        "ms_per_step": float(np.median(walls)) / steps * 1e3,
        "dispatch_ms_per_step": float(np.median(dispatch)) / steps * 1e3,
        "first_call_s": compile_s, "host_calls_per_step": st.host_calls_per_step,
        "transfers_per_step": st.transfers_per_step,
        "kv_bytes_per_token_layer": pipe.geom.bytes_per_token_used,
        "tokens_per_page": pipe.geom.tokens_per_page, "attention_backend": pipe.attn_backend,
        "expert_backend": pipe.expert_backend,
    }
    if inplace_check:
        row["arena_copies_in_attention_program"] = pipe.arena_copies()
    del pipe
    gc.collect()
    return row, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true",
                    help="small OLMoE-shaped model, batch 8 x 64 (CPU smoke run)")
    ap.add_argument("--model", choices=[m for m in sorted(MODELS) if m != "demo"], default="olmoe",
                    help="real shapes to time (random weights); ignored with --tiny")
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 32; --tiny 8)")
    ap.add_argument("--context", type=int, default=None,
                    help="KV tokens per sequence (default 2048; --tiny 64)")
    ap.add_argument("--steps", type=int, default=None,
                    help="decode steps per decode call (default 8; --tiny 4)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per config (default 5; --tiny 2)")
    ap.add_argument("--configs", default="1x1,2x1,2x2,4x2,4x4", help="MxG list (micro-batches x group size)")
    ap.add_argument("--check", default="1x1,2x2", help="configs compared strictly with the colocated run")
    ap.add_argument("--skip-reference-check", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batch = args.batch or (8 if args.tiny else 32)
    context = args.context or (64 if args.tiny else 2048)
    steps = args.steps or (4 if args.tiny else 8)
    iters = args.iters or (2 if args.tiny else 5)
    configs, checks = parse_configs(args.configs), parse_configs(args.check)
    devs = jax.devices()
    if len(devs) < 2:
        raise SystemExit(f"needs 2 devices (KV pool + weights pool), found {len(devs)} ({devs[0].platform})")
    t_start = time.perf_counter()
    res: dict[str, Any] = {"device": devs[0].device_kind, "platform": devs[0].platform, "devices": len(devs),
                           "args": vars(args), "date": time.strftime("%Y-%m-%d")}
    failed = []
    if not args.skip_reference_check:
        res["reference_check"] = check_reference(devs)
        print("reference check:", res["reference_check"], f"({time.perf_counter() - t_start:.0f} s)",
              flush=True)
        failed += [k for k, ok in res["reference_check"].items() if not ok]

    cfg = tiny_config() if args.tiny else MODELS[args.model]()
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, batch).astype(np.int32)
    # colocated: the same pipeline, both "pools" on device 0
    coloc = place_random_model(cfg, *colocated_meshes(devs[0]), seed=0)
    coloc_rows, coloc_tokens = {}, {}
    for mb, g in checks if (1, 1) in checks else [(1, 1), *checks]:
        row, toks = run_config(coloc, PipelineConfig(g, mb), batch, context, steps, iters, tokens)
        coloc_rows[mb, g], coloc_tokens[mb, g] = row, toks
        print("colocated", json.dumps(row), flush=True)
    del coloc
    gc.collect()
    res["colocated"] = [dict(r, config=f"{m}x{g}") for (m, g), r in coloc_rows.items()]

    placed = place_random_model(cfg, *split_meshes(devs), seed=0)
    res["weights_bytes_by_device"] = placed.bytes_by_device()
    largest_g = max(g for _, g in configs)
    rows = []
    for mb, g in configs:
        first_of_largest = g == largest_g and not any(r["group_size"] == g for r in rows)
        try:
            row, toks = run_config(placed, PipelineConfig(g, mb), batch, context, steps, iters, tokens,
                                   inplace_check=first_of_largest)
        except Exception as e:  # report and go on: one failing config must not hide the others
            err = f"{type(e).__name__}: {e}"[:300]
            row, toks = {"micro_batches": mb, "group_size": g, "error": err}, None
        if toks is not None:
            if (mb, g) in coloc_tokens:
                row["equal_to_colocated"] = bool(np.array_equal(toks, coloc_tokens[mb, g]))
                if not row["equal_to_colocated"]:
                    failed.append(f"{mb}x{g} 1+1 != colocated")
            row["agree_with_colocated_1x1"] = float(np.mean(toks == coloc_tokens[1, 1]))
        rows.append(row)
        print("1+1", json.dumps(row), flush=True)
    res["rows"] = rows

    bw = copy_bandwidth(1 << 31 if devs[0].platform != "cpu" else 1 << 24)
    kv_bytes = next((r["kv_bytes_per_token_layer"] for r in rows if "kv_bytes_per_token_layer" in r), 0)
    roof = roofline_bytes(cfg, batch, context, kv_bytes)
    roof_ms = roof["total"] / bw * 1e3
    res |= {"copy_bandwidth_GBps": bw / 1e9, "roofline_bytes": roof, "roofline_ms": roof_ms,
            "elapsed_s": time.perf_counter() - t_start}
    base = coloc_rows[1, 1]["ms_per_step"]
    name = "tiny OLMoE-shaped" if args.tiny else f"{args.model} shapes"
    print(f"\n{res['device']} x{len(devs)} ({devs[0].platform}); {name}, batch {batch} x {context} ctx, "
          f"{steps} steps per decode call; copy BW {bw / 1e9:.0f} GB/s; roofline {roof_ms:.3f} ms/step; "
          f"colocated 1x1 {base:.3f} ms/step")
    print(f"{'config':8s} {'lanes':>5s} {'ms/step':>9s} {'disp ms':>8s} {'/coloc':>7s} {'/roof':>7s} "
          f"{'calls/st':>8s} {'xfer/st':>8s} {'tokens':>16s}")
    for r in rows:
        label = f"{r['micro_batches']}x{r['group_size']}"
        if "error" in r:
            print(f"{label:8s} ERROR {r['error'][:100]}")
            continue
        tok = ("== coloc" if r["equal_to_colocated"] else "!= COLOC") if "equal_to_colocated" in r \
            else f"{100 * r['agree_with_colocated_1x1']:.0f}% ~ 1x1"
        print(f"{label:8s} {r['lanes']:5d} {r['ms_per_step']:9.3f} {r['dispatch_ms_per_step']:8.3f} "
              f"{r['ms_per_step'] / base:7.2f} {r['ms_per_step'] / roof_ms:7.2f} "
              f"{r['host_calls_per_step']:8.1f} {r['transfers_per_step']:8.1f} {tok:>16s}")
    key = "arena_copies_in_attention_program"
    copies = [r[key] for r in rows if key in r]
    if copies:
        print(f"arena copies in the attention program (g = {largest_g}): {copies[0]}")
    print(f"elapsed {res['elapsed_s']:.0f} s")
    failed += [f"{r['micro_batches']}x{r['group_size']} error" for r in rows if "error" in r]
    if failed:
        print("FAILED:", failed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if failed or math.isnan(base):
        sys.exit(1)


if __name__ == "__main__":
    main()
