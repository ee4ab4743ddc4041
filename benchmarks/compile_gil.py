"""How long a background compile holds the serving thread off the GIL (issue 15).

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        PYTHONPATH=. python -m benchmarks.compile_gil [--programs 4] [--json OUT]

The engine compiles step programs on a background thread (`execution/compile_queue.py`) while its
stepping thread serves. XLA's compile releases the GIL; tracing and lowering the program (Python
and MLIR building) do not. Here a "serving" thread wakes every 1 ms (`time.sleep(0.001)`, then
records how late it woke) while the main thread traces + lowers, then compiles, the demo-mixtral
lane's top step programs (`GroupRunner._top_specs`), once per interpreter switch interval
(`sys.setswitchinterval`: Python's 5 ms default, and the engine's `compile_queue.
COMPILE_SWITCH_INTERVAL_S`), JAX's caches cleared between, so each variant traces, lowers and
compiles the same programs; then a third variant, the engine's `compile_process` option: a worker
process traces, lowers and compiles each program and this process only loads the executable it
sends back (phase "worker + load", the whole `ProcessCompiler.compile` call; the worker is started
before the ticker). Per variant and phase: wake-ups, the longest and P99 lateness, and the seconds
lost in wake-ups later than 5 ms. No persistent compilation cache is used.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from crosspool_jax.execution import compile_queue
from crosspool_jax.execution.pooled_step import build_step, input_shapes

DEFAULT_SWITCH_S = 0.005  # CPython's default switch interval
LATE_S = 0.005


class Ticker:
    """A thread that sleeps 1 ms at a time and records, per current phase, how late it woke."""

    def __init__(self) -> None:
        self.phase = "idle"
        self.late: dict[str, list[float]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop:
            time.sleep(0.001)
            now = time.perf_counter()
            self.late.setdefault(self.phase, []).append(now - last - 0.001)
            last = now

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop = True
        self._thread.join()


def summary(late: list[float]) -> dict[str, float]:
    a = np.asarray(late)
    return {"wakeups": int(a.size), "max_ms": float(a.max() * 1e3),
            "p99_ms": float(np.percentile(a, 99) * 1e3), "lost_s": float(a[a > LATE_S].sum())}


def run(programs: int) -> dict[str, Any]:
    from crosspool_jax.demo import demo_models
    from crosspool_jax.execution.pool_runner import GroupRunner
    from pallas_kernels.page_layout import PoolLayout

    mix = demo_models()["demo-mixtral"]
    platform = "cpu" if jax.devices()[0].platform == "cpu" else "gpu"
    r = GroupRunner(None, PoolLayout(16384, "float32", 64, 2048), 1024, colocated=jax.devices()[0],
                    platform=platform, warm_programs=0,
                    backend="reference" if platform == "cpu" else None)
    r.add_model("mix", mix.config, jax.tree.map(lambda a: a.astype("float32"), mix.weights))
    key = r._lane_key("mix")
    specs = [sp for p in (4, 8, 16) for sp in r._top_specs(key, p)][:programs]
    arena = jax.ShapeDtypeStruct(r.store.arena.shape, r.store.arena.dtype, sharding=r.store.sharding)
    rows = []
    before = sys.getswitchinterval()
    try:
        for interval in (DEFAULT_SWITCH_S, compile_queue.COMPILE_SWITCH_INTERVAL_S):
            sys.setswitchinterval(interval)
            jax.clear_caches()
            seconds = {"trace+lower": 0.0, "compile": 0.0}
            with Ticker() as tick:
                time.sleep(0.2)
                for sp in specs:
                    tick.phase = "trace+lower"
                    t0 = time.perf_counter()
                    low = build_step(sp, r.store, r.platform).lower(arena, input_shapes(sp, r.store))
                    t1 = time.perf_counter()
                    tick.phase = "compile"
                    low.compile()
                    seconds["trace+lower"] += t1 - t0
                    seconds["compile"] += time.perf_counter() - t1
                    tick.phase = "idle"
                time.sleep(0.2)
            for phase in ("trace+lower", "compile"):
                rows.append({"switch_interval_s": interval, "phase": phase, "seconds": seconds[phase],
                             **summary(tick.late[phase])})
    finally:
        sys.setswitchinterval(before)
    rows.append(process_variant(specs, r))
    return {"programs": len(specs), "rows": rows}


def process_variant(specs: list, runner: Any) -> dict[str, Any]:
    """The same programs compiled by a `ProcessCompiler` worker (the default switch interval)."""
    from crosspool_jax.execution.compile_process import ProcessCompiler, StoreShape

    shape = StoreShape.of(runner.store)
    pc = ProcessCompiler()
    try:
        pc.start()  # the worker's start-up (imports, backend) stays out of the measured phase
        seconds = 0.0
        with Ticker() as tick:
            time.sleep(0.2)
            for sp in specs:
                tick.phase = "worker + load"
                t0 = time.perf_counter()
                pc.compile(sp, shape, runner.platform)
                seconds += time.perf_counter() - t0
                tick.phase = "idle"
            time.sleep(0.2)
    finally:
        pc.close()
    return {"switch_interval_s": sys.getswitchinterval(), "phase": "worker + load",
            "seconds": seconds, **summary(tick.late["worker + load"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--programs", type=int, default=4, help="step programs per variant (default 4)")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    args = ap.parse_args(argv)
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # every variant compiles for real
    try:
        res = run(args.programs)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    res.update(benchmark="benchmarks/compile_gil.py", command=" ".join(sys.argv),
               device=jax.devices()[0].device_kind, jax=jax.__version__,
               date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    print(f"{res['programs']} demo-mixtral step programs per variant, {res['device']}")
    print(f"{'switch interval':>15s} {'phase':12s} {'seconds':>8s} {'wake-ups':>9s} {'late max':>9s} "
          f"{'late P99':>9s} {'lost (>5 ms)':>12s}")
    for row in res["rows"]:
        print(f"{row['switch_interval_s'] * 1e3:12.1f} ms {row['phase']:12s} {row['seconds']:8.2f} "
              f"{row['wakeups']:9d} {row['max_ms']:7.1f} ms {row['p99_ms']:7.1f} ms {row['lost_s']:10.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
