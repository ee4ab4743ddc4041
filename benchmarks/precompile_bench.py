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

--programs N: only the first N programs of each group's grid (in the grid's order), so a short
device call ends with its totals. --profile: compiles them under `jax.profiler.trace` and prints
where the compile's host time went: the profiler's host events (XLA's compiler passes, LLVM,
ptxas, the Triton and Mosaic GPU kernel compiles; not Python's, so jax's tracing and lowering
show only in the phase totals) summed per name over all threads, by self time (the event less
its nested events) and by total time, largest first (`--profile-top` rows each). In-process
compiles only (not with --compile-process).
"""

from __future__ import annotations

import argparse
import collections
import glob
import tempfile
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


def event_name(name: str) -> str:
    """A profiler event's name without its TraceMe metadata ("Name#key=value,...#" -> "Name")."""
    return name.split("#", 1)[0].strip() or name


def add_line_seconds(events: list[tuple[int, int, str]], own: dict[str, float],
                     total: dict[str, float], count: dict[str, int]) -> None:
    """Adds one thread line's events (start ns, duration ns, name) to the per-name seconds: total
    is each event's duration, self (own) its duration less that of the events nested in it, so a
    line's self times add up to its busy time."""
    stack: list[tuple[int, str]] = []  # (end ns, name) of the open events
    for start, dur, name in sorted(events, key=lambda ev: (ev[0], -ev[1])):
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack:  # nested: its time is not its parent's own
            own[stack[-1][1]] -= min(dur, stack[-1][0] - start) / 1e9
        own[name] += dur / 1e9
        total[name] += dur / 1e9
        count[name] += 1
        stack.append((start + dur, name))


def host_event_seconds(xplane_path: str) -> tuple[dict[str, float], dict[str, float], dict[str, int],
                                                 dict[str, float]]:
    """(self seconds, total seconds, count) per event name over the host planes' thread lines of
    one profiler trace (`add_line_seconds`), and the self seconds per name of the busiest line
    alone. With --threads 1 that has been the thread that ran the compiles (its top events jax's
    lowering and XLA's passes, 2026-12-07), so its events are the compile's serial path; XLA's
    work on its other threads overlaps it. Check the table's events before reading it so."""
    from jax.profiler import ProfileData

    own: dict[str, float] = collections.defaultdict(float)
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    busiest: dict[str, float] = {}
    for plane in ProfileData.from_file(xplane_path).planes:
        if plane.name.startswith("/host:"):
            for line in plane.lines:
                events = [(e.start_ns, e.duration_ns, event_name(e.name)) for e in line.events]
                add_line_seconds(events, own, total, count)
                line_own: dict[str, float] = collections.defaultdict(float)
                add_line_seconds(events, line_own, collections.defaultdict(float), collections.Counter())
                if sum(line_own.values()) > sum(busiest.values()):
                    busiest = dict(line_own)
    return own, total, count, busiest


def print_profile(trace_dir: str, programs: int, top: int) -> None:
    """The host-event tables of the trace in `trace_dir` (`host_event_seconds`), per program."""
    paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not paths:
        print(f"no profiler trace under {trace_dir}", flush=True)
        return
    own, total, count, busiest = host_event_seconds(paths[-1])
    n = max(programs, 1)
    for title, table in (("self", own), ("total", total), ("self on the busiest thread", busiest)):
        print(f"\nhost events by {title} time, seconds per program over {n} programs"
              f"{'' if table is busiest else ' (all threads)'}:")
        print(f"{'event':70s} {'s/program':>10s} {'count/program':>14s}")
        for name, secs in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            counted = f"{count[name] / n:14.1f}" if table is not busiest else f"{'-':>14s}"
            print(f"{name[:70]:70s} {secs / n:10.3f} {counted}")
    print(flush=True)


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
    ap.add_argument("--programs", type=int, default=None, help="only the first N of each grid")
    ap.add_argument("--profile", action="store_true", help="host-event tables of the compile")
    ap.add_argument("--profile-top", type=int, default=40)
    args = ap.parse_args()
    if args.profile and args.compile_process:
        raise SystemExit("--profile sees this process's compiles only: drop --compile-process")
    options = dict(parse_option(o) for o in args.xla_option)
    devs = jax.devices()
    n = 1 if args.mode != "crosspool" else 2
    engine = PooledEngine(mode=args.mode, pools=None if args.mode == "crosspool" else "1",
                          config=EngineConfig(weights_fraction=0.6, compile_process=args.compile_process,
                                              compile_workers=args.threads if args.compile_process else 1),
                          devices=devs[:n])
    for g in engine.groups:
        # no warm-up compiles at load: they would run beside the timed ones in the background and
        # land in the phase sums, the profile and an XLA dump (2026-12-07: 10 programs compiled
        # where 5 were asked)
        g.warm_programs = 0
    t0 = time.perf_counter()
    for i in range(args.models):
        engine.add_random_model(f"{args.model}-{i:02d}", MODELS[args.model](), seed=i)
    print(f"{devs[0].device_kind}: {args.models} models placed in {time.perf_counter() - t0:.1f} s; "
          f"{engine.describe()}", flush=True)
    for g in engine.groups:
        g.compiler_options = options
    phases = PhaseSeconds()
    log = lambda m: print(f"{m} [so far: {phases.summary()}]", flush=True)
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        if args.profile:  # native events only: the Python tracer would slow tracing and lowering
            opts = jax.profiler.ProfileOptions()
            opts.python_tracer_level = 0
            jax.profiler.start_trace(trace_dir, profiler_options=opts)
        if args.programs is None:
            count = engine.precompile(args.max_context, args.max_slots, threads=args.threads, log=log)
        else:
            slots = args.max_slots or engine.max_live_requests
            count = sum(g.precompile(g.bucket_specs(args.max_context, slots)[:args.programs],
                                     threads=args.threads, log=log) for g in engine.groups)
        wall = time.perf_counter() - t0
        if args.profile:
            jax.profiler.stop_trace()
            print_profile(trace_dir, count, args.profile_top)
    how = "worker processes" if args.compile_process else "threads"
    print(f"precompiled {count} programs in {wall:.1f} s with {args.threads} {how}, options {options} "
          f"({wall / max(count, 1):.2f} s per program)", flush=True)
    print(f"compile phases summed over threads: {phases.summary()}", flush=True)
    engine.shutdown(timeout=0)


if __name__ == "__main__":
    main()
