"""Lanes of several models of one class (issue 7 prerequisite): correctness on the GPU, then the cost
of running G models' requests as ONE lane (grouped matmuls over (model) and (model, expert)) vs one
lane per model (the layout before model classes) vs a single model with the same batch, and the cost
of a padded page table (coarse shape buckets).

    PYTHONPATH=. python -m benchmarks.model_classes_bench [--models 4] [--batch 32] [--context 2048]

On 2+ GPUs the timed store is crosspool 1+1; on one GPU it is colocated. OLMoE-1B-7B shapes, random
weights on the devices (bf16 arena); decode of `batch` requests with `context` tokens each, K = 4
steps per call. Each variant compiles once (time reported), warms up, then is timed over --iters
calls; ms per decode step = call / K.

Correctness first: three models of one tiny class (different weights, per-model norms) and a
model of another class through GroupRunner on the GPUs (Pallas kernels) must equal each model's
reference output token for token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step import decode_inputs, fill_random, olmoe_config
from crosspool_jax.execution.pooled_step import LaneShape, StepSpec, build_step, model_geometry
from crosspool_jax.memory.arena import ArenaStore, model_rows
from crosspool_jax.memory.topology import PoolTopology, Role
from crosspool_jax.models.params import weight_specs
from pallas_kernels.page_layout import PoolLayout


def check_correctness(devs: list[jax.Device]) -> dict[str, bool]:
    sys.path.insert(0, "tests")
    from pooled_helpers import References, build_runner, drive
    from test_model_classes import LATE, MODELS, _requests

    models = {**MODELS, **LATE}
    out = {}
    layout = PoolLayout(16384, "float32", 64)
    variants = (("crosspool 1+1", dict(split="1+1")), ("colocated", dict(split=None, colocated=devs[0])))
    if len(devs) < 2:
        variants = variants[1:]
    for label, kw in variants:
        runner = build_runner(models, kv_pages=64, prefill_chunk=16, backend=None, layout=layout, **kw)
        reqs = _requests("", list(models))
        log = drive(runner, reqs)
        refs = References(models)
        ok = all(log.tokens[r.rid] == refs(r)[0] for r in reqs)
        groups = max(ln.groups for spec in runner._programs for ln in spec.lanes)
        out[label] = ok
        out[f"{label} max groups"] = groups
    return out


def build(devs: list[jax.Device], n_models: int, kv_pages: int) -> tuple[ArenaStore, Any]:
    cfg = olmoe_config()
    layout = PoolLayout(65536, "bfloat16", 128, 1)
    specs = weight_specs(cfg, jnp.bfloat16)
    rows = model_rows(cfg, specs, 1, layout)
    rpp = layout.rows_per_page
    a_pages = -(-rows[Role.KV] * n_models // rpp) + n_models + 1
    f_pages = -(-rows[Role.WEIGHTS] * n_models // rpp) + n_models + 1
    if len(devs) >= 2:
        store = ArenaStore(PoolTopology.split("1+1", devs[:2]),
                           dataclasses.replace(layout, num_pages=max(a_pages + kv_pages, f_pages)), a_pages)
    else:  # one device: the colocated layout (both roles in the first pages)
        store = ArenaStore(None, dataclasses.replace(layout, num_pages=a_pages + f_pages + kv_pages),
                           a_pages + f_pages, colocated=devs[0])
    for i in range(n_models):
        store.models[f"m{i}"] = store.plan_model(f"m{i}", cfg, specs)
    fill_random(store)
    return store, cfg


def lane_inputs(store: ArenaStore, names: list[str], arr: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arr` (decode_inputs: slots on KV device 0) as a lane of `names`, slots split evenly, in order."""
    n = store.num_devices
    b = arr["tokens"].shape[1]
    g = len(names)
    per = b // g
    out = dict(arr)
    out["a_base"] = np.tile(np.array([store.models[m].base[Role.KV] for m in names], np.int32), (n, 1))
    out["f_base"] = np.tile(np.array([store.models[m].base[Role.WEIGHTS] for m in names], np.int32), (n, 1))
    real = np.zeros((n, g), np.int32)
    real[0] = per
    out["grp_rows"] = real
    out["grp_slots"] = real.copy()
    grp = np.zeros((n, b), np.int32)
    grp[0] = np.arange(b) // per
    out["tok_grp"] = grp
    out["slot_grp"] = grp.copy()
    return out


def timed(store: ArenaStore, lanes: list[LaneShape], inputs: list[dict[str, np.ndarray]], k: int,
          iters: int) -> dict[str, float]:
    spec = StepSpec(tuple(lanes), True, k, None)
    prog = build_step(spec, store, "gpu")
    dev_in = tuple({key: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding) for key, v in p.items()}
                   for p in inputs)
    t0 = time.perf_counter()
    compiled = prog.lower(store.arena, dev_in).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", -1))
    alias = int(getattr(mem, "alias_size_in_bytes", -1))
    print(f"  temp {temp / 2**30:.2f} GiB, aliased {alias / 2**30:.2f} GiB, arena "
          f"{store.arena.nbytes / 2**30:.2f} GiB", flush=True)
    if temp > store.arena.nbytes // 2:
        return {"compile_s": round(compile_s, 2), "temp_bytes": temp, "error": "temp buffers too big"}
    stats = store.devices[0].memory_stats() or {}
    before = stats.get("bytes_in_use", 0)
    store.arena, out = compiled(store.arena, dev_in)
    jax.block_until_ready(out)
    stats = store.devices[0].memory_stats() or {}
    print(f"  in use before/after the first call {before / 2**30:.2f} / "
          f"{stats.get('bytes_in_use', 0) / 2**30:.2f} GiB, peak so far "
          f"{stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB", flush=True)
    for _ in range(2):
        store.arena, out = compiled(store.arena, dev_in)
    jax.block_until_ready(out)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        store.arena, out = compiled(store.arena, dev_in)
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
    valid = sum(int((np.asarray(o) >= 0).sum()) for o in out)
    return {"ms_per_step": float(np.median(ts)) / k * 1e3, "compile_s": round(compile_s, 2),
            "valid_tokens": valid, "temp_bytes": temp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    devs = jax.devices()
    res: dict[str, Any] = {"device": devs[0].device_kind, "args": vars(args)}
    if not args.skip_check:
        res["correctness"] = check_correctness(devs)
        print("correctness:", res["correctness"], flush=True)
    k, g, b = 4, args.models, args.batch
    cfg = olmoe_config()
    layout = PoolLayout(65536, "bfloat16", 128, 1)
    tpp = model_geometry(cfg, layout, "gpu").tokens_per_page
    pages_per = -(-(args.context + k) // tpp)
    kv_pages = b * cfg.num_layers * pages_per + 8
    store, cfg = build(devs, g, kv_pages)
    names = [f"m{i}" for i in range(g)]
    cls = store.models["m0"].cls
    arr = decode_inputs(store, cfg, tpp, b, args.context, k, np.random.default_rng(0))
    P = arr["tail_pages"].shape[-1]
    rows = []

    def run(label: str, lanes: list[LaneShape], inputs: list[dict[str, np.ndarray]]) -> None:
        try:
            r = timed(store, lanes, inputs, k, args.iters)
        except Exception as e:  # report and go on
            r = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        r["label"] = label
        rows.append(r)
        print(json.dumps(r), flush=True)

    run(f"1 model, 1 lane, B={b}", [LaneShape(cls, 1, b, b, P)], [lane_inputs(store, names[:1], arr)])
    run(f"{g} models, 1 lane (G={g})", [LaneShape(cls, g, b, b, P)], [lane_inputs(store, names, arr)])
    per = b // g
    parts = []
    for i in range(g):
        p = {key: v[:, i * per:(i + 1) * per].copy() for key, v in arr.items()}
        p["tok_slot"] = np.where(p["tok_slot"] >= 0, np.arange(per)[None], -1).astype(np.int32)
        p["sample_row"] = np.where(p["sample_row"] >= 0, np.arange(per)[None], -1).astype(np.int32)
        parts.append(lane_inputs(store, names[i:i + 1], p))
    run(f"{g} models, {g} lanes (one per model)", [LaneShape(cls, 1, per, per, P)] * g, parts)
    padded = dict(arr)
    tp = np.full((*arr["tail_pages"].shape[:-1], 4 * P), -1, np.int32)
    tp[..., :P] = arr["tail_pages"]
    padded["tail_pages"] = tp
    run(f"1 model, page table x4 ({4 * P} pages)", [LaneShape(cls, 1, b, b, 4 * P)],
        [lane_inputs(store, names[:1], padded)])
    padded_b = {key: np.concatenate([v, np.zeros_like(v)], axis=1) if v.ndim >= 2 and v.shape[1] == b else v
                for key, v in arr.items()}
    padded_b["tok_slot"][:, b:] = -1
    padded_b["sample_row"][:, b:] = -1
    padded_b["tail_pages"][:, b:] = -1
    padded_b["stop_ids"][:, b:] = -1
    pb_in = lane_inputs(store, names[:1], padded_b)
    pb_in["grp_rows"][0] = b
    pb_in["grp_slots"][0] = b
    pb_in["tok_grp"][:] = 0
    pb_in["slot_grp"][:] = 0
    run(f"1 model, slots x2 ({2 * b}, {b} real)", [LaneShape(cls, 1, 2 * b, 2 * b, P)], [pb_in])
    res["rows"] = rows
    base = rows[0].get("ms_per_step", float("nan"))
    where = "x2 (crosspool 1+1)" if len(devs) >= 2 else "x1 (colocated)"
    print(f"\n{res['device']} {where}; OLMoE-1B-7B shapes, batch {b} x {args.context} ctx, K={k}")
    print(f"{'variant':44s} {'ms/step':>9s} {'/first':>7s} {'compile s':>9s}")
    for r in rows:
        if "ms_per_step" not in r:
            print(f"{r['label']:44s} ERROR {r['error'][:80]}")
            continue
        print(f"{r['label']:44s} {r['ms_per_step']:9.3f} {r['ms_per_step'] / base:7.2f} "
              f"{r['compile_s']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
