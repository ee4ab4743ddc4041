"""Where a step program's device time goes, kernel by kernel (issues 15 and 16).

    PYTHONPATH=. python -m benchmarks.profile_step [--shape olmoe-1b-7b] [--prefill 2048,512] \\
        [--context 0] [--decode 32[,1]] [--decode-context 2048[,43000]] [--decode-slots 32] \\
        [--decode-pages P] [--schedules split,persistent] [--calls 3] [--json OUT]   # one GPU
    JAX_PLATFORMS=cpu PYTHONPATH=. python -m benchmarks.profile_step --smoke              # CPU

The engine's step program (one request colocated on the first device, random weights, as
`benchmarks/prefill.py` builds it) for a prefill chunk of each `--prefill` size after `--context`
tokens of KV, and for a decode call (K = 4 steps) of each `--decode` count of requests at its
`--decode-context` tokens each (comma lists, zipped; in `--decode-slots` slots and a `--decode-
pages`-wide page table, the rest empty, as the engine pads a call to its bucket: e.g. the smoke
replay's most common decode call, 1 request at ~43K tokens in 8 slots x 4,096 pages), once per
`--schedules` entry; each program is timed (median of `--calls` calls, a sync each), then run
`--calls` times more under `jax.profiler.trace`. The device's kernel events of those calls (GPU:
the "Stream" lines of the device plane; on CPU the XLA thunks of the host's PjRt client thread,
which only shows the script works) are summed per kernel name: launches and microseconds per call,
share of the kernel time, and a coarse kind (`kind_of`: our Pallas kernels by their names, XLA's
GEMMs, sorts, other fusions). A call's wall time minus its kernel time is time the device is not
running a kernel of it (launch gaps, host syncs). The tables print last.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from pallas_kernels.dispatch import ATTENTION_KERNELS, DEFAULT_ATTENTION_KERNELS

KINDS = (  # (kind, substrings of a kernel name), first match wins
    ("expert/projection matmul (ours)", ("arena_grouped_matmul",)),
    ("attention (ours)", ("paged_attention", "persistent", "prefill_attention", "mla_decode")),
    ("kv append (ours)", ("kv_append", "append")),
    ("xla gemm", ("gemm", "cublas", "cutlass", "triton_gemm", "dot")),
    ("sort / top-k", ("sort", "topk", "top_k")),
    ("copy / memset", ("memcpy", "memset", "copy")),
)


HOST_NOT_THUNKS = ("ThunkExecutor", "ThreadpoolListener", "end: ")  # CPU trace markers


def kind_of(name: str) -> str:
    """A kernel's coarse kind from its name (`KINDS`; anything else is "other XLA")."""
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other XLA"


def device_events(xplane_path: str) -> tuple[str, list[tuple[str, float]]]:
    """(source, [(kernel name, microseconds)]) of one trace: the device planes' stream lines, or
    on a machine without a device plane the host's XLA client thread (thunk executions)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    dev, host = [], []
    for plane in data.planes:
        for line in plane.lines:
            if plane.name.startswith("/device:") and line.name.startswith("Stream"):
                dev += [(e.name, e.duration_ns / 1e3) for e in line.events]
            elif plane.name == "/host:CPU" and line.name.startswith("tf_XLAPjRtCpuClient"):
                host += [(e.name, e.duration_ns / 1e3) for e in line.events
                         if not e.name.startswith(HOST_NOT_THUNKS)]
    return ("device streams", dev) if dev else ("host XLA thunks (no device plane)", host)


def kernel_table(events: Iterable[tuple[str, float]], calls: int) -> list[dict[str, Any]]:
    """Events summed per name, per call, largest first: name, kind, launches, us, share."""
    us: dict[str, float] = collections.defaultdict(float)
    n: dict[str, int] = collections.Counter()
    for name, t in events:
        us[name] += t
        n[name] += 1
    total = sum(us.values()) or 1.0
    rows = [{"kernel": k, "kind": kind_of(k), "launches": n[k] / calls, "us": us[k] / calls,
             "share": us[k] / total} for k in us]
    return sorted(rows, key=lambda r: -r["us"])


def kind_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`kernel_table` rows summed per kind, largest first."""
    by: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"us": 0.0, "launches": 0.0})
    for r in rows:
        by[r["kind"]]["us"] += r["us"]
        by[r["kind"]]["launches"] += r["launches"]
    total = sum(v["us"] for v in by.values()) or 1.0
    return sorted(({"kind": k, **v, "share": v["us"] / total} for k, v in by.items()),
                  key=lambda r: -r["us"])


def profile_calls(run: Callable[[], Any], calls: int) -> dict[str, Any]:
    """`run` (one call, synced) timed `calls` times, then traced `calls` times: wall us per call
    (median), kernel tables, the kernel time per call and the rest of the wall."""
    run()
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                run()
        paths = sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))
        source, events = device_events(paths[-1])
    rows = kernel_table(events, calls)
    wall = float(np.median(walls)) * 1e6
    kernels = sum(r["us"] for r in rows)
    return {"wall_us": wall, "kernel_us": kernels, "not_in_kernels_us": wall - kernels,
            "source": source, "kernels": rows, "kinds": kind_table(rows)}


def step_runner(store: Any, cfg: Any, platform: str, spec: Any, arr: dict[str, np.ndarray]
                ) -> Callable[[], Any]:
    """One synced call of `spec`'s program on `arr` (the arena donated and kept in the store)."""
    from crosspool_jax.execution.pooled_step import build_step, input_shapes

    sds = jax.ShapeDtypeStruct(store.arena.shape, store.arena.dtype, sharding=store.sharding)
    prog = build_step(spec, store, platform).lower(sds, input_shapes(spec, store)).compile()
    inputs = ({k: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding) for k, v in arr.items()},)

    def run() -> Any:
        store.arena, out = prog(store.arena, inputs)
        return jax.block_until_ready(out)

    return run


def profile_shape(shape: str, layout: Any, platform: str, args: argparse.Namespace
                  ) -> list[dict[str, Any]]:
    """The prefill chunks and the decode call of one model shape (module doc)."""
    from benchmarks.calibrate import build
    from benchmarks.layer_loop import prefill_inputs
    from benchmarks.runner import model_config
    from benchmarks.step import decode_inputs
    from crosspool_jax.execution.pooled_step import (
        LaneShape,
        StepSpec,
        model_geometry,
        one_model_group_inputs,
    )

    name = shape if shape.startswith("demo-") else f"{shape}-00"
    cfg = model_config(name)
    tpp = model_geometry(cfg, layout, platform).tokens_per_page
    prefills = [int(p) for p in args.prefill.split(",") if p]
    decodes = decode_cases(args.decode, args.decode_context)
    need = max([-(-(args.context + p) // tpp) for p in prefills]
               + [n * -(-(c + 4) // tpp) for n, c in decodes]) * cfg.num_layers + 1
    store, cfg = build(name, None, jax.devices()[0], layout, need)
    cls = store.models["m"].cls
    be = "reference" if platform == "cpu" else None
    rng = np.random.default_rng(0)
    out = []
    for p in prefills:
        arr, width = prefill_inputs(store, cfg, tpp, p, rng, context=args.context)
        spec = StepSpec((LaneShape(cls, 1, 1, p, width),), False, 1, be, matmul_backend=be,
                        attention_kernels=args.attention_kernels)
        res = profile_calls(step_runner(store, cfg, platform, spec, arr), args.calls)
        out.append({"shape": shape, "call": f"prefill {p} after {args.context}", **res})
        print_call(out[-1], args.top)
    for n, ctx in decodes:
        slots = max(args.decode_slots, n)
        arr = decode_inputs(store, cfg, tpp, n, ctx, 4, rng, slots=slots, pages=args.decode_pages)
        arr.update(one_model_group_inputs(store, "m", [n], slots, slots))
        width = arr["tail_pages"].shape[-1]
        for sched in args.schedules.split(","):
            spec = StepSpec((LaneShape(cls, 1, slots, slots, width),), True, 4, be,
                            attention_schedule=sched, matmul_backend=be,
                            attention_kernels=args.attention_kernels)
            res = profile_calls(step_runner(store, cfg, platform, spec, arr), args.calls)
            out.append({"shape": shape, "call": f"decode {n} x {ctx} "
                        f"in {slots} slots x {width} pages, {sched}, K=4", **res})
            print_call(out[-1], args.top)
    return out


def decode_cases(counts: str, contexts: str) -> list[tuple[int, int]]:
    """(requests, tokens of context) per decode call: `--decode` and `--decode-context` zipped,
    a single context applying to every count; counts of 0 are skipped."""
    ns = [int(x) for x in str(counts).split(",") if x]
    cs = [int(x) for x in str(contexts).split(",") if x]
    if len(cs) == 1:
        cs = cs * len(ns)
    if len(cs) != len(ns):
        raise SystemExit(f"--decode-context: {len(cs)} contexts for {len(ns)} decode counts")
    return [(n, c) for n, c in zip(ns, cs, strict=True) if n > 0]


def print_call(r: dict[str, Any], top: int) -> None:
    print(f"\n{r['shape']} {r['call']}: wall {r['wall_us']:,.0f} us per call, kernels "
          f"{r['kernel_us']:,.0f} us ({r['source']}), not in kernels {r['not_in_kernels_us']:,.0f} us")
    print(f"  {'kind':34s} {'us/call':>10s} {'share':>7s} {'launches':>9s}")
    for k in r["kinds"]:
        print(f"  {k['kind']:34s} {k['us']:10,.1f} {k['share']:7.1%} {k['launches']:9.0f}")
    print(f"  {'kernel (top ' + str(top) + ')':60s} {'us/call':>10s} {'share':>7s} {'launches':>9s}")
    for k in r["kernels"][:top]:
        print(f"  {k['kernel'][:60]:60s} {k['us']:10,.1f} {k['share']:7.1%} {k['launches']:9.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="olmoe-1b-7b", help="model shape (runner's model_config)")
    ap.add_argument("--prefill", default="2048,512", help="prefill chunk sizes (tokens)")
    ap.add_argument("--context", type=int, default=0, help="KV tokens before each chunk")
    ap.add_argument("--decode", default="32",
                    help="decode requests per call, comma-separated: one call each (0: none)")
    ap.add_argument("--decode-context", default="2048",
                    help="tokens of context of each --decode call's requests (one for all, or one each)")
    ap.add_argument("--decode-slots", type=int, default=0,
                    help="the decode calls' slots (default and at least each call's requests; "
                         "more: empty slots, as the engine pads a call to its bucket)")
    ap.add_argument("--decode-pages", type=int, default=0,
                    help="page-table width per slot and layer (default: the context's, to a power of 2)")
    ap.add_argument("--schedules", default="split",
                    help="decode attention schedules to profile, comma-separated (split, persistent)")
    ap.add_argument("--attention-kernels", default=DEFAULT_ATTENTION_KERNELS, choices=ATTENTION_KERNELS,
                    help="the step programs' attention kernels (pallas_kernels.dispatch)")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--top", type=int, default=25, help="kernels printed per call")
    ap.add_argument("--smoke", action="store_true", help="CPU: demo-mixtral, tiny calls")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    args = ap.parse_args(argv)
    from pallas_kernels.page_layout import PoolLayout

    platform = jax.devices()[0].platform
    platform = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
    if args.smoke:
        args.shape, args.prefill, args.decode, args.decode_context = "demo-mixtral", "16", "2,1", "32"
        args.decode_slots = args.decode_slots or 4
        layout = PoolLayout(16384, "float32", 64, 1)
    else:
        layout = (PoolLayout(262144, "bfloat16", 128, 1) if platform == "gpu"
                  else PoolLayout(16384, "float32", 64, 1))
    rows = profile_shape(args.shape, layout, platform, args)
    dev = jax.devices()[0]
    res = {"benchmark": "benchmarks/profile_step.py", "command": " ".join(sys.argv),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "device": dev.device_kind, "jax": jax.__version__, "calls": rows}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    print(f"\n{dev.device_kind}: per call, wall / kernels / not in kernels (us)")
    for r in rows:
        print(f"  {r['shape']} {r['call']:60s} {r['wall_us']:12,.0f} {r['kernel_us']:12,.0f} "
              f"{r['not_in_kernels_us']:12,.0f}")
    return 0 if all(r["kernels"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
