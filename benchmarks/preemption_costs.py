"""Swap vs recompute, measured: what a preempted request costs to bring back on this machine.

    PYTHONPATH=. python -m benchmarks.preemption_costs [--model olmoe] [--context 2048]

On a crosspool 1+1 group with a random model at real size: (1) prefill throughput of the pooled
step (tokens/s; a compiled chunked-prefill call timed after a warm-up request of the same shape),
(2) the host link for KV pages (the runner's own swap path: pages gathered from the arena and
copied to host, then copied back and scattered; bytes/s each way). Prints, for a request of
`--context` tokens, the swap round trip and the recompute time, i.e. what the planner's AUTO
policy compares (`KVPlanner.preemption_costs_s`).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step import MODELS
from crosspool_jax.execution.pool_runner import GroupRunner
from crosspool_jax.execution.pooled_step import model_geometry
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.execution.step_plan import _gather_pages, _scatter_pages
from crosspool_jax.memory.arena import model_rows
from crosspool_jax.memory.topology import PoolTopology, Role
from crosspool_jax.models.params import weight_specs
from pallas_kernels.page_layout import PoolLayout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="olmoe", choices=sorted(MODELS))
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    devs = jax.devices()
    platform = "gpu" if devs[0].platform in ("gpu", "cuda") else "cpu"
    cfg = MODELS[args.model]()
    layout = PoolLayout(65536, "bfloat16", 128, 1)
    rows = model_rows(cfg, weight_specs(cfg, jnp.bfloat16), 1, layout)
    rpp = layout.rows_per_page
    geom = model_geometry(cfg, layout, platform)
    a_pages = -(-rows[Role.KV] // rpp) + 1
    f_pages = -(-rows[Role.WEIGHTS] // rpp) + 1
    req_pages = cfg.num_layers * -(-(args.context + 8) // geom.tokens_per_page)
    kv_pages = 3 * req_pages + 8
    runner = GroupRunner(PoolTopology.split("1+1", devs[:2]),
                         PoolLayout(65536, "bfloat16", 128, max(f_pages, a_pages + kv_pages)), a_pages,
                         platform=platform, prefill_chunk=args.chunk, max_prefill_tokens=args.chunk)
    runner.add_random_model("m", cfg, seed=0)
    rng = np.random.default_rng(0)
    times = []
    for i in range(3):  # 1st compiles; later ones are timed by the runner (compile excluded)
        prompt = [int(t) for t in rng.integers(0, cfg.vocab_size, args.context)]
        runner.submit(f"r{i}", "m", prompt, 1, SamplingParams())
        t0 = time.perf_counter()
        while runner.has_work:
            runner.step()
        times.append(time.perf_counter() - t0)
    prefill_tps = runner.prefill_rate["m"]
    store = runner.store
    idx = jnp.asarray(store.kv_first_page + np.arange(req_pages, dtype=np.int32))
    host = np.asarray(_gather_pages(store.arena, idx))  # warm-up (compile)
    store.arena = _scatter_pages(store.arena, idx, jnp.asarray(host))
    store.arena.block_until_ready()
    out_s, in_s = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        host = np.asarray(_gather_pages(store.arena, idx))
        out_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.arena = _scatter_pages(store.arena, idx, jnp.asarray(host))
        store.arena.block_until_ready()
        in_s.append(time.perf_counter() - t0)
    nbytes = req_pages * layout.page_bytes
    res = {
        "device": devs[0].device_kind, "model": args.model, "context": args.context,
        "prefill_tokens_per_s": prefill_tps, "request_wall_s": times,
        "kv_bytes": nbytes, "swap_out_s": float(np.median(out_s)), "swap_in_s": float(np.median(in_s)),
    }
    res["swap_round_trip_s"] = res["swap_out_s"] + res["swap_in_s"]
    res["recompute_s"] = args.context / prefill_tps
    res["host_link_bytes_per_s"] = 2 * nbytes / res["swap_round_trip_s"]
    print(json.dumps(res, indent=1))
    print(f"\n{res['device']}: {args.model}, a {args.context}-token request holds {nbytes / 1e6:.1f} MB "
          f"of KV; swap round trip {res['swap_round_trip_s'] * 1e3:.1f} ms "
          f"({res['host_link_bytes_per_s'] / 1e9:.1f} GB/s) vs recompute "
          f"{res['recompute_s'] * 1e3:.1f} ms ({prefill_tps:.0f} prefill tokens/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
