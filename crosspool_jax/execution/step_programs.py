"""The compiled-programs half of a device group's runner (`GroupRunner`, which inherits it):
which compiled step program serves a call (its own, or a larger one that dominates it while its
own compiles), compiling off the serving path (background threads or worker processes,
`precompile` ahead of time). The grid of program shapes is `step_grid.StepGrid`, and the warm-up
plan of a newly loaded lane with the admission holds that wait for it `warm_programs.WarmPrograms`:
both also bases of the runner.

`StepPrograms` keeps no state of its own beyond `_init_programs`; it reads the runner's store,
geometries, planner, requests, buckets, clock (`_now`) and state lock (`_unlocked`), and the
runner's counters (`_init_counters`). Host-side bookkeeping only: nothing here is traced.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from crosspool_jax.execution import compile_queue
from crosspool_jax.execution.compile_cache import OFF, ON
from crosspool_jax.execution.compile_process import (
    CompileProcessError,
    ProcessCompiler,
    StoreShape,
    compile_spec,
)
from crosspool_jax.execution.host_step import HostScheduledStep, MeasuredChoice, StrategyTrial, trial_key
from crosspool_jax.execution.pooled_step import LaneShape, StepSpec

_log = logging.getLogger(__name__)

# The process-wide default of `fallback` where a runner is not given it (and
# `warm_programs.WARM_PROGRAMS_ENV` that of `warm_programs`): e.g. a test run on a 2-core CPU
# (scripts/test.sh) turns both off, so an engine test compiles only the programs its calls use, on
# the serving path (background warm-ups and a fallback's exact program would compete with it for
# the cores); the stall-free tests pass both explicitly.
FALLBACK_ENV = "CROSSPOOL_COMPILE_FALLBACK"  # `compile_cache.ON` / `OFF` words: on / off, 1 / 0, ...


def env_setting(name: str, default: int | bool) -> int | bool:
    """`$name` read as the type of `default` (`default` when unset or empty); ValueError names the
    variable when its value is not one."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return default
    if isinstance(default, bool):
        if text not in ON + OFF:
            raise ValueError(f"${name} must be on or off, got {text!r}")
        return text in ON
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"${name} must be an integer >= 0, got {text!r}")
    return value


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << (max(int(n), 1) - 1).bit_length())


def lane_dominates(have: LaneShape, want: LaneShape) -> bool:
    """A program compiled for lane shape `have` can run a lane of shape `want` (same class, every
    size >=), its inputs padded to `have` as bucket padding already pads them. Split-KV extras
    must be present in both or in neither (a program with extras merges partial attentions by
    log-sum-exp: another reduction than the plain one)."""
    return (have.cls == want.cls and have.groups >= want.groups and have.slots >= want.slots
            and have.tokens >= want.tokens and have.max_pages >= want.max_pages
            and (have.extras == 0) == (want.extras == 0) and have.extras >= want.extras
            and have.extra_rows >= want.extra_rows and have.stop_width >= want.stop_width)


def spec_dominates(have: StepSpec, want: StepSpec) -> bool:
    """`have`'s program can run a call that wants `want`: same decode flag, backends, attention
    schedule and lane structure, decode steps K >= (slots past their `remaining` idle), and each
    lane dominating (`lane_dominates`). `attention_kernels` and `one_row_decode` are not compared:
    they pick kernels of the same math."""
    if (have.decode, have.backend, have.attention_schedule, have.matmul_backend, have.unroll_layers,
            len(have.lanes)) != (want.decode, want.backend, want.attention_schedule,
                                 want.matmul_backend, want.unroll_layers, len(want.lanes)):
        return False
    if have.steps < want.steps or (not want.decode and have.steps != want.steps):
        return False
    return all(lane_dominates(h, w) for h, w in zip(have.lanes, want.lanes, strict=True))


def describe_spec(spec: StepSpec) -> str:
    """A step program's shape in one line, e.g. "decode K=4 [G1 B8 T8 P16]" (per lane: models,
    slots, tokens, pages per layer; +X split-KV extras)."""
    lanes = " ".join(describe_lane(ln) for ln in spec.lanes)
    kind = f"decode K={spec.steps}" if spec.decode else "prefill"
    return f"{kind} {spec.attention_schedule} {lanes}"


def describe_lane(ln: LaneShape) -> str:
    """A lane's shape, e.g. "[G1 B8 T8 P16]" (`describe_spec`)."""
    extras = f" +X{ln.extras}" if ln.extras else ""
    return f"[G{ln.groups} B{ln.slots} T{ln.tokens} P{ln.max_pages}{extras}]"


def program_cost(spec: StepSpec) -> int:
    """A rough size of `spec`'s work per call (rows x (1 + pages) per lane, x steps): picks the
    smallest of several programs that could run a call."""
    return spec.steps * sum(ln.groups + ln.tokens * (1 + ln.max_pages) * (1 + ln.extras)
                            for ln in spec.lanes)


def _compile_for(ref: weakref.ref, spec: StepSpec) -> Any:
    """(background thread) `spec`'s program for the runner behind `ref`, compiled ahead of time;
    None when the runner is gone or the interpreter is exiting (queued work is then skipped)."""
    runner = ref()
    if runner is None or compile_queue.exiting():
        return None
    start = runner._now()
    prog = runner._compile_aot(spec)
    runner.compile_spans.append((start, runner._now(), spec.decode))
    return prog


@dataclasses.dataclass(frozen=True)
class ShapeBuckets:
    """How a call's sizes round up to the static shapes of a compiled program: the smallest
    ``floor * growth**k >= n``. Coarser buckets (bigger floor / growth) mean fewer programs to
    compile and more padding per call. ``fine`` (the CPU default) keeps padding small; ``coarse``
    (the GPU default) keeps a long run to a few dozen programs, since a GPU compile of a
    real-size step takes seconds while padded slots and pages cost little there (the kernels skip
    pages past each sequence's length and rows past each group's size)."""

    slots_floor: int = 1  # B per KV device
    tokens_floor: int = 8  # prefill query rows T per KV device
    pages_floor: int = 1  # page-table width P
    growth: int = 2
    # a lane's model groups G: "active" = the class's models with work in this call (rounded to a
    # power of two); "placed" = every model of the class in the group (one G per class: no
    # program per number of active models; empty groups cost a lane in the kernels' item maps)
    groups: str = "active"
    # decode steps per call: False = the power of two covering the most tokens any slot still
    # needs (up to steps_per_call); True = always steps_per_call (finished slots idle on device)
    fixed_steps: bool = False

    def round(self, n: int, floor: int, top: int | None = None) -> int:
        """The bucket of `n`: the smallest ``floor * growth**k >= n``; `top` (>= floor), when given,
        is a bucket too, the largest: n <= top rounds to at most `top` (so a prefill of
        `max_prefill_tokens` = 4,096 runs in a 4,096-row program, not in coarse's 8,192)."""
        size = max(1, floor)
        while size < n:
            size *= self.growth
        return size if top is None or n > top else min(size, max(top, floor))

    def ladder(self, n: int, floor: int, top: int | None = None) -> list[int]:
        """Every bucket from the smallest up to `round(n, floor, top)`, ascending."""
        out = [max(1, floor)]
        while out[-1] < n:
            out.append(out[-1] * self.growth)
        if top is not None and n <= top:
            out = [s for s in out if s < top] + [max(top, out[0])]
        return out

    @classmethod
    def fine(cls) -> ShapeBuckets:
        return cls()

    @classmethod
    def coarse(cls) -> ShapeBuckets:
        return cls(slots_floor=8, tokens_floor=32, pages_floor=16, growth=4, groups="placed",
                   fixed_steps=True)


class StepPrograms:
    """Compiled step programs of a `GroupRunner` (module docstring); a base class of it, not used
    alone."""

    def _init_programs(self, max_programs: int, buckets: ShapeBuckets | None, fallback: bool | None,
                       compiler_options: dict[str, Any] | None, compile_process: bool,
                       compile_workers: int) -> None:
        """The compiled programs' state (held, ready, compiling), the buckets and how programs
        compile (`__init__`'s arguments of the same names)."""
        # compiled step programs, least recently used first; bounded because every compiled
        # program holds its own memory mappings and code (on XLA:CPU ~570 mappings each: a
        # process died past ~110 programs at the default vm.max_map_count of 65,530)
        self._programs: dict[StepSpec, Callable] = {}
        self.max_programs = max_programs
        self._background: dict[StepSpec, Any] = {}  # spec -> Future of its compiled program
        # compiled in the background, not used by a call yet (`_lookup` puts them in service)
        self._ready: dict[StepSpec, Callable] = {}
        self.held_generation = 0  # bumped whenever a program enters or leaves `_programs` / `_ready`
        self._executor: Any = None
        self.buckets = buckets or (ShapeBuckets.coarse() if self.platform == "gpu" else ShapeBuckets.fine())
        self.fallback = env_setting(FALLBACK_ENV, True) if fallback is None else fallback
        self.compiler_options = dict(compiler_options or {})
        self.compile_workers = compile_workers
        self._process_compiler = ProcessCompiler(compile_workers) if compile_process else None
        self._count_lock = threading.Lock()  # the compile threads' counters
        if self._process_compiler is not None:
            weakref.finalize(self, self._process_compiler.close)

    # -- compiled programs --
    def _lookup(self, spec: StepSpec) -> Callable | None:
        """The compiled program of `spec`, marked most recently used (a finished background
        compile enters service here); None if there is none yet."""
        self._poll_background()
        prog = self._programs.pop(spec, None)
        if prog is None:
            prog = self._ready.pop(spec, None)
            if prog is None:
                return None
            self.background_built += 1
            self._insert(spec, prog)
            return prog
        self._programs[spec] = prog
        return prog

    def _poll_background(self) -> None:
        """Moves the background thread's finished programs to `_ready` (held, not in service until
        a call uses one). A failed background compile is dropped: the call that needs the program
        compiles it on the serving path, where the error is raised."""
        for spec, fut in list(self._background.items()):
            if not fut.done():
                continue
            del self._background[spec]
            if fut.cancelled() or fut.exception() is not None or fut.result() is None:
                continue
            if spec not in self._programs:
                self._ready[spec] = fut.result()
                self.held_generation += 1
                self._evict()

    def _program_for(self, want: StepSpec) -> tuple[StepSpec, Callable]:
        """The program a call wanting `want` runs, and its spec: `want`'s own when compiled; else
        (`fallback`) the smallest compiled program that dominates it, while `want`'s compiles in
        the background; else, when the background thread is compiling a program that dominates it
        (and not `want`'s own), that one, waited for (it is done sooner than a fresh compile); else
        `want`'s, compiled on this thread (`_compile`). The waits count as blocked."""
        if want.decode and self.fallback:
            self._anticipate(want)
        prog = self._lookup(want)
        if prog is not None:
            return want, prog
        if self.fallback:
            bigger = [sp for sp in (*self._programs, *self._ready) if spec_dominates(sp, want)]
            if not bigger and not (want in self._background and self._background[want].running()):
                bigger = [sp for sp, fut in self._background.items()
                          if fut.running() and spec_dominates(sp, want)]
                if bigger:
                    t0 = self._now()
                    with self._unlocked():  # cancels from other threads free pages meanwhile
                        self._background[bigger[0]].exception()  # waits; a failure: compiled below
                    self.blocked_compile_seconds += self._now() - t0
                    self.blocked_compiles += 1
                    self.blocked_log.append((self._now() - t0, "a running larger compile",
                                             describe_spec(want)))
                    self._poll_background()
                    bigger = [sp for sp in bigger if sp in self._ready]
            if bigger:
                have = min(bigger, key=program_cost)
                # urgent (before queued warm-ups): until it is ready, every such call runs padded
                self._compile_in_background(want, compile_queue.URGENT)
                self.fallback_calls += 1
                return have, self._lookup(have)
        return want, self._compile(want)

    def _anticipate(self, want: StepSpec) -> None:
        """Queues for the background thread the decode program its requests grow into next: the
        same lanes with page tables one bucket wider (a decode's context only grows), unless it is
        compiled, queued or past the model's context (`max_position_embeddings`); it runs before
        queued warm-ups (`compile_queue.URGENT`). A request crossing a page bucket then finds its
        program compiled (or a dominating one) instead of compiling on the serving path."""
        lanes = []
        for ln in want.lanes:
            model = next(n for n, ma in self.store.models.items() if ma.cls == ln.cls)
            most = self._pages_bucket(model, ln.cls.config.max_position_embeddings)
            if ln.max_pages >= most:
                return
            lanes.append(dataclasses.replace(ln, max_pages=min(most, ln.max_pages * self.buckets.growth)))
        nxt = dataclasses.replace(want, lanes=tuple(lanes))
        self._compile_in_background(nxt, compile_queue.URGENT)

    def _insert(self, spec: StepSpec, prog: Callable) -> None:
        self._ready.pop(spec, None)
        self._programs[spec] = prog
        self.held_generation += 1
        self._evict()

    def _evict(self) -> None:
        """Keeps at most `max_programs` programs, in service and ready together: the oldest ready
        one goes first, then the least recently used one in service."""
        while len(self._programs) + len(self._ready) > self.max_programs and (
                self._ready or len(self._programs) > 1):
            held = self._ready if self._ready else self._programs
            held.pop(next(iter(held)))
            self.held_generation += 1

    def _strategy(self, spec: StepSpec, lowered: Callable) -> Callable:
        """`spec`'s step under this runner's execution strategy, given its lowered program."""
        if self.execution == "lowered":
            return lowered
        if self.execution == "host":
            return HostScheduledStep(spec, self.store, self.platform)
        trial = self._trials.setdefault(trial_key(spec), StrategyTrial())
        if trial.choice == "lowered":
            return lowered
        host = HostScheduledStep(spec, self.store, self.platform)
        return host if trial.choice == "host" else MeasuredChoice(lowered, host, trial)

    def _compile(self, spec: StepSpec) -> Callable:
        """`spec`'s program, compiled on this thread now (ahead of time, so the time is the
        compile's), or the background thread's compile of it waited for if already running; the
        seconds count in `blocked_compile_seconds`."""
        t0 = self._now()
        prog = None
        fut = self._background.pop(spec, None)
        with self._unlocked():  # cancels from other threads free pages meanwhile
            if fut is not None and not fut.cancel():  # running: sooner than a new compile
                try:
                    prog = fut.result()
                except Exception:  # compiled again below, where the error is raised
                    prog = None
            if prog is None:
                prog = self._compile_aot(spec)
        self.blocked_compile_seconds += self._now() - t0
        self.blocked_compiles += 1
        self.blocked_log.append((self._now() - t0, "its own compile", describe_spec(spec)))
        self.programs_built += 1
        self._insert(spec, prog)
        return prog

    def _compile_aot(self, spec: StepSpec) -> Any:
        """`spec`'s program compiled ahead of time (the host-scheduled strategy's small per-layer
        programs still compile on their first call). A program asking for the Mosaic GPU
        attention kernels (`attention_kernels` "auto" / "mosaic") whose compile fails is compiled
        with the Triton kernels instead (the same function; a warning, `kernel_fallbacks`), and so
        are the later programs of its lane's class and kind (prefill or decode); the program is
        still held under `spec`. A failure with the Triton kernels is raised."""
        if self.execution == "host":
            return HostScheduledStep(spec, self.store, self.platform)
        if spec.attention_kernels == "triton":
            return self._compile_kernels(spec)
        key = (spec.lanes[0].cls, spec.decode)
        triton = dataclasses.replace(spec, attention_kernels="triton")
        if key in self._mosaic_failed:
            return self._compile_kernels(triton)
        try:
            return self._compile_kernels(spec)
        except Exception as e:  # any compile error: the Triton build decides whether it is real
            with self._count_lock:
                self._mosaic_failed.add(key)
                self.kernel_fallbacks += 1
            _log.warning("%s with attention_kernels=%r failed to compile (%s: %s); compiling it, and "
                         "this lane's later %s programs, with the Triton kernels",
                         describe_spec(spec), spec.attention_kernels, type(e).__name__,
                         str(e).splitlines()[0][:200] if str(e) else "",
                         "decode" if spec.decode else "prefill")
            return self._compile_kernels(triton)

    def _compile_kernels(self, spec: StepSpec) -> Any:
        """`_compile_aot` of a lowered or measured `spec`: in a compile worker process when the
        runner has them (a worker's failure: compiled here), else here."""
        if self._process_compiler is not None and self.execution == "lowered":
            try:
                prog = self._process_compiler.compile(spec, StoreShape.of(self.store), self.platform,
                                                      self.compiler_options)
                with self._count_lock:
                    self.process_compiles += 1
                return prog
            except CompileProcessError as e:
                with self._count_lock:
                    self.process_compile_failures += 1
                _log.warning("compiling %s in this process: %s", describe_spec(spec), e)
        return self._strategy(spec, compile_spec(spec, self.store, self.platform, self.compiler_options))

    def execution_summary(self) -> dict[str, int]:
        """Held step programs by the strategy they run: {"lowered": n, "host": n, "measuring": n}
        ("measuring": `auto` programs still timing both)."""
        out = {"lowered": 0, "host": 0, "measuring": 0}
        for prog in self._programs.values():
            if isinstance(prog, MeasuredChoice):
                out[prog.choice or "measuring"] += 1
            else:
                out["host" if isinstance(prog, HostScheduledStep) else "lowered"] += 1
        return out

    def _compile_in_background(self, spec: StepSpec, priority: int = compile_queue.WARM) -> None:
        """Queues `spec`'s compile for the runner's background threads (nothing if it is held
        or queued already; `priority`: `compile_queue.URGENT` runs before the warm-ups); `_lookup`
        picks the program up once it is done."""
        if spec in self._background or spec in self._programs or spec in self._ready:
            return
        if self._executor is None:
            self._executor = compile_queue.CompileQueue(threads=self.compile_workers)
            # a runner dropped with compiles queued: they are cancelled, the thread ends
            weakref.finalize(self, self._executor.shutdown)
        job = functools.partial(_compile_for, weakref.ref(self), spec)
        self._background[spec] = self._executor.submit(job, priority)

    def wait_background(self, timeout: float | None = None) -> bool:
        """Waits until the background thread has finished every queued compile (tests, and a
        caller that wants the warm programs before serving); True if it did within `timeout`."""
        import concurrent.futures

        futs = list(self._background.values())
        _, pending = concurrent.futures.wait(futs, timeout=timeout)
        return not pending

    def stop_background(self) -> None:
        """Cancels the queued background compiles and lets the compile thread end after the one it
        is running (an engine shutting down: its warm-ups would only burn CPU). The runner still
        works afterwards: a later background compile starts a new thread."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
        self._poll_background()

    # -- ahead-of-time compilation --
    def precompile(self, specs: Sequence[StepSpec], threads: int = 4,
                   log: Callable[[str], None] | None = None) -> int:
        """Compiles the `specs` it does not hold yet ahead of time, `threads` at once (XLA compiles
        outside the GIL), and keeps them as this runner's programs; returns how many it compiled.
        Call while idle. Background compiles of these specs not started yet are dropped (compiled
        here instead); the others stay queued."""
        import concurrent.futures

        specs = [sp for sp in specs if sp not in self._programs]
        for sp in specs:
            fut = self._background.get(sp)
            if fut is not None and fut.cancel():
                del self._background[sp]
            self._ready.pop(sp, None)  # compiled again here (from the persistent cache, mostly)
        self.max_programs = max(self.max_programs, len(self._programs) + len(specs) + len(self._background))

        def one(sp: StepSpec) -> tuple[StepSpec, Any, float]:
            t0 = time.perf_counter()
            return sp, self._compile_aot(sp), time.perf_counter() - t0

        with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
            for i, (sp, compiled, dt) in enumerate(pool.map(one, specs)):
                self._programs[sp] = compiled
                self.programs_built += 1
                self.held_generation += 1
                if log is not None:
                    lane = sp.lanes[0]
                    log(f"precompiled {i + 1}/{len(specs)}: {'decode' if sp.decode else 'prefill'} "
                        f"{lane.cls.config.family.value} G={lane.groups} slots={lane.slots} "
                        f"tokens={lane.tokens} pages={lane.max_pages} ({dt:.1f} s)")
        return len(specs)
