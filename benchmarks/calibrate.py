"""Measures what the simulator's cost model needs and writes a calibration JSON (issue 19).

    PYTHONPATH=. python -m benchmarks.calibrate --json $OUT/calibration.json       # one H200: ~4 min
    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        PYTHONPATH=. python -m benchmarks.calibrate --json cal_cpu.json             # CPU, tiny shapes

What it times, with the engine's own step programs (`pooled_step.build_step`, the runner's
`GroupRunner`), on the first device (colocated) and, with 2+ devices, on a 1+1 KV+weights split:

- decode: one K-step call (K = 4) of `batch` requests of one model, each with `context` tokens of
  KV, over a grid of batch x context; seconds per decode step = median call / K;
- prefill: one chunk of `tokens` prompt tokens of one request with `context` tokens of KV before it;
- compile: the seconds to trace, lower and compile each of those programs (one at a time);
- transfers: host -> device and device -> host copies of a 256 MiB buffer (16 MiB on CPU), and
  device -> device with 2+ devices;
- host: the runner's `launch()` seconds per program call (plan, inputs, dispatch) over a short
  run of real requests with host overlap off (`GroupRunner.launch_seconds / calls`);
- the copy bandwidth (benchmarks/kernels.copy_bandwidth), against which the model's bytes are read.

GPU: OLMoE-1B-7B shapes (random bf16 weights placed on the device, pages of 256 KiB, the engine's
Pallas kernels); CPU: demo-mixtral (float32, 16 KiB pages, the XLA reference kernels), tiny grids:
a CPU calibration is for the simulator's tests and its validation against a CPU `crosspool bench`,
not for GPU predictions. A topology not measured here (one GPU: no split) is taken from `--base`
(default: the calibration made from docs/benchmarks.md), which the file names. The run ends with
a short table; the JSON holds every point with the card, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import copy_bandwidth
from benchmarks.layer_loop import prefill_inputs
from benchmarks.step import decode_inputs
from crosspool_jax.execution.pooled_step import (
    LaneShape,
    StepSpec,
    build_step,
    input_shapes,
    model_geometry,
    one_model_group_inputs,
)
from crosspool_jax.memory.arena import ArenaStore, model_rows
from crosspool_jax.memory.topology import PoolTopology, Role
from crosspool_jax.models.params import weight_specs
from pallas_kernels.page_layout import PoolLayout

K = 4
# one H200 in about 4 minutes: each point is one program compile (seconds) plus 10 timed calls
GPU_DECODE = ((1, 512), (32, 512), (64, 512), (1, 4096), (32, 4096), (64, 4096), (8, 32768), (32, 16384))
GPU_PREFILL = ((512, 0), (2048, 0), (2048, 8192), (512, 32768), (2048, 32768))
GPU_SPLIT_DECODE = ((1, 512), (32, 4096), (64, 4096))
GPU_SPLIT_PREFILL = ((512, 0), (2048, 8192))
CPU_DECODE = ((1, 32), (4, 32), (1, 160), (4, 160))
CPU_PREFILL = ((16, 0), (64, 0), (64, 128))
CPU_SPLIT_DECODE = ((1, 32), (4, 160))
CPU_SPLIT_PREFILL = ((16, 0), (64, 128))
QUICK_DECODE = ((1, 32), (4, 160))  # --quick (CPU tests): colocated only, two points of each kind
QUICK_PREFILL = ((16, 0), (64, 128))


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def build(model: str, topology: PoolTopology | None, colocated: Any, layout: PoolLayout,
          kv_pages: int) -> tuple[ArenaStore, Any]:
    """An arena holding `model` (random weights generated on the devices) and `kv_pages` KV pages."""
    from benchmarks.runner import model_config

    cfg = model_config(model)
    rows = model_rows(cfg, weight_specs(cfg, jnp.dtype(layout.dtype)), 1, layout)
    rpp = layout.rows_per_page
    if colocated is not None:
        a_pages, f_pages = -(-(rows[Role.KV] + rows[Role.WEIGHTS]) // rpp) + 1, 0
    else:
        a_pages, f_pages = -(-rows[Role.KV] // rpp) + 1, -(-rows[Role.WEIGHTS] // rpp) + 1
    pages = max(a_pages + kv_pages, f_pages)
    store = ArenaStore(topology, PoolLayout(layout.page_bytes, layout.dtype, layout.row_elems, pages),
                       a_pages, colocated=colocated)
    store.place_model_random("m", cfg, seed=0)
    return store, cfg


def time_call(store: ArenaStore, spec: StepSpec, arr: dict[str, np.ndarray], platform: str,
              iters: int) -> tuple[float, float]:
    """(compile seconds, median call seconds) of `spec`'s program on these inputs."""
    sds = jax.ShapeDtypeStruct(store.arena.shape, store.arena.dtype, sharding=store.sharding)
    t0 = time.perf_counter()
    prog = build_step(spec, store, platform).lower(sds, input_shapes(spec, store)).compile()
    compile_s = time.perf_counter() - t0
    inputs = ({k: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding) for k, v in arr.items()},)
    from benchmarks.layer_loop import median_call_seconds

    return compile_s, median_call_seconds(prog, store, inputs, iters)


def measure_topology(topology: str, devs: list[Any], model: str, layout: PoolLayout, platform: str,
                     decode_grid: tuple, prefill_grid: tuple, iters: int, stamp: dict[str, Any],
                     log: Any) -> tuple[list, list, list]:
    """Decode, prefill and compile points of one topology ("colocated" on devs[0], "split" 1+1)."""
    from benchmarks.runner import model_config

    cfg = model_config(model)
    tpp = model_geometry(cfg, layout, platform).tokens_per_page
    need = max([b * -(-(c + K) // tpp) for b, c in decode_grid]
               + [-(-(c + t) // tpp) for t, c in prefill_grid]) * cfg.num_layers + 1
    topo, coloc = (None, devs[0]) if topology == "colocated" else (PoolTopology.split("1+1", devs[:2]), None)
    store, cfg = build(model, topo, coloc, layout, need)
    cls = store.models["m"].cls
    be = "reference" if platform == "cpu" else None
    rng = np.random.default_rng(0)
    dec, pre, comp = [], [], []
    common = {"topology": topology, "model": model, "dtype": layout.dtype, "page_bytes": layout.page_bytes,
              "platform": platform, **stamp}
    for b, c in decode_grid:
        arr = decode_inputs(store, cfg, tpp, b, c, K, rng)
        arr.update(one_model_group_inputs(store, "m", [b], b, b))
        lane = LaneShape(cls, 1, b, b, arr["tail_pages"].shape[-1])
        spec = StepSpec((lane,), True, K, be, matmul_backend=be)
        cs, call = time_call(store, spec, arr, platform, iters)
        dec.append({**common, "batch": b, "context": c, "steps_per_call": K, "groups": 1,
                    "s_per_step": call / K, "compile_s": cs})
        comp.append({**common, "kind": "decode", "seconds": cs, "batch": b, "context": c})
        log(f"calibrate {topology} decode B={b} context={c}: {call / K * 1e3:.3f} ms/step, "
            f"compile {cs:.1f} s")
    for t, c in prefill_grid:
        arr, P = prefill_inputs(store, cfg, tpp, t, rng, context=c)
        spec = StepSpec((LaneShape(cls, 1, 1, t, P),), False, 1, be, matmul_backend=be)
        cs, call = time_call(store, spec, arr, platform, iters)
        pre.append({**common, "tokens": t, "context": c, "seconds": call, "compile_s": cs})
        comp.append({**common, "kind": "prefill", "seconds": cs, "tokens": t, "context": c})
        log(f"calibrate {topology} prefill T={t} context={c}: {call * 1e3:.2f} ms "
            f"({t / call:,.0f} tokens/s), compile {cs:.1f} s")
    del store
    return dec, pre, comp


def measure_transfers(devs: list[Any], nbytes: int) -> dict[str, float | None]:
    """Host <-> device (and device 0 -> 1) copy rates of an `nbytes` buffer, bytes/s (median of 5)."""
    host = np.ones(nbytes // 4, np.float32)

    def rate(fn: Any) -> float:
        fn()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return nbytes / float(np.median(ts))

    x = jax.device_put(host, devs[0])
    h2d = rate(lambda: jax.device_put(host, devs[0]).block_until_ready())
    d2h = rate(lambda: np.asarray(x + 0.0))
    d2d = rate(lambda: jax.device_put(x, devs[1]).block_until_ready()) if len(devs) > 1 else None
    return {"host_to_device_bytes_per_s": h2d, "device_to_host_bytes_per_s": d2h,
            "device_to_device_bytes_per_s": d2d}


def measure_host(dev: Any, model: str, layout: PoolLayout, platform: str, requests: int, prompt: int,
                 new: int) -> dict[str, Any]:
    """The runner's launch() seconds per call over `requests` real requests (overlap off), after a
    first identical round that compiles its programs."""
    from benchmarks.runner import model_config
    from crosspool_jax.execution.pool_runner import GroupRunner
    from crosspool_jax.execution.sampling import SamplingParams

    cfg = model_config(model)
    rows = model_rows(cfg, weight_specs(cfg, jnp.dtype(layout.dtype)), 1, layout)
    tpp = model_geometry(cfg, layout, platform).tokens_per_page
    a_pages = -(-(rows[Role.KV] + rows[Role.WEIGHTS]) // layout.rows_per_page) + 1
    kv = requests * -(-(prompt + new) // tpp) * cfg.num_layers * 2 + 1
    lay = PoolLayout(layout.page_bytes, layout.dtype, layout.row_elems, a_pages + kv)
    be = "reference" if platform == "cpu" else None
    r = GroupRunner(None, lay, a_pages, colocated=dev, platform=platform, overlap=False, backend=be,
                    warm_programs=0, prefill_chunk=min(512, prompt), max_prefill_tokens=4 * min(512, prompt))
    r.add_random_model("m", cfg)
    out = {}
    for rnd in range(2):  # round 0 compiles
        calls0, launch0 = r.calls, r.launch_seconds
        for i in range(requests):
            r.submit(f"{rnd}-{i}", "m", list(range(1, prompt + 1)), new, SamplingParams())
        t0 = time.perf_counter()
        while r.has_work:
            r.step()
        out = {"launch_s_per_call": (r.launch_seconds - launch0) / max(1, r.calls - calls0),
               "calls": r.calls - calls0, "wall_s": time.perf_counter() - t0}
    return out | {"requests": requests, "prompt": prompt, "new": new}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, metavar="OUT.json")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per point (default 10 GPU, 3 CPU)")
    ap.add_argument("--topologies", default="auto",
                    help="colocated,split (auto: split too when 2+ devices are visible)")
    ap.add_argument("--quick", action="store_true",
                    help="CPU tests: colocated only, 2 decode and 2 prefill points, 2 requests for the "
                         "host time")
    ap.add_argument("--base", default="h200_docs_2026-12-03.json",
                    help="calibration whose points fill what is not measured here ('' for none; GPU only)")
    args = ap.parse_args(argv)
    t_start = time.time()
    devs = jax.devices()
    platform = "gpu" if devs[0].platform in ("gpu", "cuda") else "cpu"
    gpu = platform == "gpu"
    model = "olmoe-1b-7b-00" if gpu else "demo-mixtral"
    layout = PoolLayout(262144, "bfloat16", 128, 1) if gpu else PoolLayout(16384, "float32", 64, 1)
    iters = args.iters or (10 if gpu else 3)
    tops = ["colocated", "split"] if args.topologies == "auto" and len(devs) > 1 else \
        (["colocated"] if args.topologies == "auto" else args.topologies.split(","))
    if args.quick:
        tops = ["colocated"]
    command = " ".join(["python -m benchmarks.calibrate", *(sys.argv[1:] if argv is None else argv)])
    stamp = {"card": devs[0].device_kind, "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
             "source": f"benchmarks/calibrate.py ({command})"}

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    bw = copy_bandwidth(1 << 30 if gpu else 1 << 24)
    log(f"calibrate: {devs[0].device_kind} x {len(devs)}, copy bandwidth {bw / 1e9:.1f} GB/s")
    dec, pre, comp = [], [], []
    for top in tops:
        d_grid = (GPU_DECODE if top == "colocated" else GPU_SPLIT_DECODE) if gpu else \
            (CPU_DECODE if top == "colocated" else CPU_SPLIT_DECODE)
        p_grid = (GPU_PREFILL if top == "colocated" else GPU_SPLIT_PREFILL) if gpu else \
            (CPU_PREFILL if top == "colocated" else CPU_SPLIT_PREFILL)
        if args.quick:
            d_grid, p_grid = QUICK_DECODE, QUICK_PREFILL
        d, p, c = measure_topology(top, devs, model, layout, platform, d_grid, p_grid, iters, stamp, log)
        dec, pre, comp = dec + d, pre + p, comp + c
        jax.clear_caches()
    transfers = measure_transfers(devs, (256 << 20) if gpu else (16 << 20))
    host = (measure_host(devs[0], model, layout, platform, 16, 1024, 64) if gpu
            else measure_host(devs[0], model, layout, platform, 2 if args.quick else 4, 48, 8))
    cal = {
        "format": "crosspool-calibration", "version": 1,
        "name": f"{'h200' if 'H200' in devs[0].device_kind else platform}-calibrate-{stamp['date']}",
        "platform": platform, "card": devs[0].device_kind, "devices": len(devs), "date": stamp["date"],
        "made_by": stamp["source"], "jax": jax.__version__,
        "copy_bandwidth": {"bytes_per_s": bw, **stamp},
        "decode_points": dec, "prefill_points": pre, "compile_points": comp,
        "host": {**host, **stamp}, "transfers": {**transfers, **stamp},
    }
    if gpu and "split" not in tops and args.base:
        cal["base"] = args.base
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(cal, f, indent=1)
    from benchmarks.sim.costmodel import fit, load_calibration

    cm = fit(load_calibration(args.json))
    print(f"\n{devs[0].device_kind} x {len(devs)}, {time.time() - t_start:.0f} s; copy {bw / 1e9:.0f} GB/s; "
          f"h2d {transfers['host_to_device_bytes_per_s'] / 1e9:.2f} GB/s, d2h "
          f"{transfers['device_to_host_bytes_per_s'] / 1e9:.2f} GB/s; host launch "
          f"{host['launch_s_per_call'] * 1e3:.2f} ms/call")
    print(f"{'topology':10s} {'kind':8s} {'B/T':>6s} {'context':>8s} {'ms':>9s} {'compile s':>9s}")
    for p in dec + pre:
        kind = "decode" if "batch" in p else "prefill"
        ms = (p["s_per_step"] if kind == "decode" else p["seconds"]) * 1e3
        print(f"{p['topology']:10s} {kind:8s} {p.get('batch', p.get('tokens')):>6d} {p['context']:>8d} "
              f"{ms:9.3f} {p['compile_s']:9.2f}")
    for t, prm in cm.params.items():
        print(f"fit {t}: a = {prm.a * 1e6:.1f} us/layer, f = {prm.f:.3f}, F = {prm.flops_per_s / 1e12:.2f} "
              f"TFLOP/s{' (' + prm.borrowed + ')' if prm.borrowed else ''}")
    print(f"calibration: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
