"""How long `PooledEngine.precompile` takes on this machine: OLMoE-1B-7B-shaped models (or --model's
shapes; random weights), one mode, the one-lane shape grid up to --max-context tokens and
--max-slots requests per KV device, compiled with --threads at once. Prints one line per program
with the compile phases' seconds so far (trace, lower, XLA compile; summed over this process's
threads, so a run stopped by a time limit still shows them), then the total.

    PYTHONPATH=. python -m benchmarks.precompile_bench [--mode shared] [--models 3] [--threads 8]
        [--compile-process] [--xla-option xla_gpu_autotune_level=0 ...]

--compile-process: each program is traced, lowered and compiled in one of --threads worker
processes (`EngineConfig.compile_process`, `compile_workers` = --threads) instead of threads of
this process.

--xla-option KEY=VALUE (repeatable): an XLA option every step program compiles with
(`GroupRunner.compiler_options`); VALUE is read as an int, a float, true / false, or kept a string.
"""

from __future__ import annotations

import argparse
import collections
import threading
import time
from typing import Any

import jax

from benchmarks.step import MODELS
from crosspool_jax.engine import EngineConfig, PooledEngine


def parse_option(text: str) -> tuple[str, Any]:
    """"KEY=VALUE" -> (KEY, VALUE as int, float or bool where it reads as one, else the string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--xla-option wants KEY=VALUE, got {text!r}")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


# jax's compile events (`jax._src.dispatch`): tracing, lowering to StableHLO, XLA's compile
PHASE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                "/jax/core/compile/backend_compile_duration": "xla compile"}


class PhaseSeconds:
    """Seconds of each compile phase, summed over this process's threads (so over wall time when
    several compile at once); worker processes' phases are not seen here."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        from jax import monitoring
        monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, name: str, secs: float, **_: Any) -> None:
        phase = PHASE_EVENTS.get(name)
        if phase is not None:
            with self._lock:
                self.seconds[phase] += float(secs)
                self.counts[phase] += 1

    def summary(self) -> str:
        return "; ".join(f"{p} {self.seconds[p]:.1f} s over {self.counts[p]}"
                         for p in PHASE_EVENTS.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="shared")
    ap.add_argument("--model", choices=sorted(MODELS), default="olmoe", help="the models' shapes")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--max-context", type=int, default=8192)
    ap.add_argument("--max-slots", type=int, default=32)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--compile-process", action="store_true",
                    help="compile in --threads worker processes (EngineConfig.compile_process)")
    ap.add_argument("--xla-option", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    options = dict(parse_option(o) for o in args.xla_option)
    devs = jax.devices()
    n = 1 if args.mode != "crosspool" else 2
    engine = PooledEngine(mode=args.mode, pools=None if args.mode == "crosspool" else "1",
                          config=EngineConfig(weights_fraction=0.6, compile_process=args.compile_process,
                                              compile_workers=args.threads if args.compile_process else 1),
                          devices=devs[:n])
    t0 = time.perf_counter()
    for i in range(args.models):
        engine.add_random_model(f"{args.model}-{i:02d}", MODELS[args.model](), seed=i)
    print(f"{devs[0].device_kind}: {args.models} models placed in {time.perf_counter() - t0:.1f} s; "
          f"{engine.describe()}", flush=True)
    for g in engine.groups:
        g.compiler_options = options
    phases = PhaseSeconds()
    t0 = time.perf_counter()
    count = engine.precompile(args.max_context, args.max_slots, threads=args.threads,
                              log=lambda m: print(f"{m} [so far: {phases.summary()}]", flush=True))
    wall = time.perf_counter() - t0
    how = "worker processes" if args.compile_process else "threads"
    print(f"precompiled {count} programs in {wall:.1f} s with {args.threads} {how}, options {options} "
          f"({wall / max(count, 1):.2f} s per program)", flush=True)
    print(f"compile phases summed over threads: {phases.summary()}", flush=True)
    engine.shutdown(timeout=0)


if __name__ == "__main__":
    main()
