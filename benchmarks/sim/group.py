"""One device group in simulated time: the engine's own `GroupRunner` over a cost model.

`SimulatedGroup` IS a `GroupRunner` (crosspool_jax/execution/pool_runner.py): `submit`, `launch`,
`result`, the planner (`KVPlanner`: admission, growth, preemption), the virtualizer, the prefill
budget, the lane grouping into `StepSpec`s and shape buckets, the program lookup with fallback and
background compiles (`_program_for`), the placeholders and the token bookkeeping all run as in the
engine. It replaces only what touches a device, through the runner's seams:

- the store is an `ArenaBook` (the arena's books, no devices, no array);
- `_execute` (build inputs, call programs) returns token placeholders (0) and advances the group's
  device timeline by the cost model's seconds for the call's work (`costmodel.lane_work`, per lane
  group = per program), after the host's launch seconds per call. A mixed step's prefill call
  (`mixed_steps`) is priced as its prompt rows' prefill call plus one step of a decode call of its
  decode rows: measured on one H100 (2026-12-06, docs/benchmarks.md), such calls cost 1.10x that
  sum at the median (P10-P90 0.94-1.33x), where pricing the decode rows as prefill rows (their
  FLOPs) had predicted TTFT P99 1.6x too low;
- `_read` (read a call's tokens) waits until the call's device work ends in virtual time;
- `_now` is the group's virtual clock (seconds); `_compile_aot` (a compile on the serving path)
  advances it by the calibrated compile seconds; `_compile_in_background` queues a virtual compile
  on the group's background compile threads (`SimFuture`, `SimCompileQueue`: the engine's
  `compile_queue.CompileQueue` in virtual time, lowest priority first, so a live request's next
  program (`_anticipate`, URGENT) runs before queued warm-ups); no XLA compile happens.

Time: the group's worker thread is the clock (`clock`): host work and waits advance it; the device
runs calls back to back (`device_free_at`): a call starts when dispatched or when the previous one
ends, whichever is later, so with overlap host work hides under device work as in the engine.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.sim.costmodel import CostModel, SlotWork, lane_work
from crosspool_jax.execution import compile_queue
from crosspool_jax.execution.pool_runner import GroupRunner
from crosspool_jax.execution.pooled_step import LaneShape, StepSpec
from crosspool_jax.execution.runner_records import _Call
from crosspool_jax.execution.step_calls import lane_placements
from crosspool_jax.memory.arena import ArenaBook
from pallas_kernels.page_layout import PoolLayout

SIM_TOKEN = 0  # the token every simulated call samples (requests are submitted without stop ids)


@dataclasses.dataclass(frozen=True)
class SimProgram:
    """A compiled step program in simulated time (its spec; the cost model prices its calls)."""

    spec: StepSpec


class SimFuture:
    """A background compile on the group's one compile thread, in the group's virtual time: queued
    at `submitted`, it runs over [start, done_at) once the queue (`SimCompileQueue`) starts it
    (start None: not started yet); the future API the runner uses (`done`, `running`, `cancel`,
    `cancelled`, `exception`, `result`), where waiting advances the group's clock."""

    def __init__(self, queue: SimCompileQueue, submitted: float, seconds: float, program: SimProgram):
        self.queue, self.submitted, self.seconds, self.program = queue, submitted, seconds, program
        self.start: float | None = None
        self.done_at: float | None = None
        self._cancelled = False

    def done(self) -> bool:
        self.queue.advance(self.queue.group.clock)
        return self._cancelled or (self.done_at is not None and self.queue.group.clock >= self.done_at)

    def running(self) -> bool:
        self.queue.advance(self.queue.group.clock)
        return (not self._cancelled and self.start is not None
                and self.start <= self.queue.group.clock < self.done_at)

    def cancel(self) -> bool:
        """Cancels a compile not started yet (True); a started or finished one runs on (False)."""
        self.queue.advance(self.queue.group.clock)
        if self._cancelled:
            return True
        if self.start is not None:
            return False
        self._cancelled = True
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def _wait(self) -> None:
        if self._cancelled:
            return
        self.queue.advance(float("inf"), until_started=self)
        group = self.queue.group
        group.clock = max(group.clock, self.done_at)

    def exception(self) -> None:
        self._wait()
        return None

    def result(self) -> SimProgram:
        self._wait()
        return self.program


class SimCompileQueue:
    """`compile_queue.CompileQueue` in a group's virtual time: `threads` threads (the engine's
    `compile_workers`), each taking, when it frees up, the lowest priority among the compiles
    queued by then (ties: first queued first). Start times are assigned lazily (`advance`), when
    the group's clock passes them, so a compile queued later with a lower priority still
    overtakes those not started. A compile takes the calibrated seconds however many run at once
    (the host's cores are not modelled)."""

    def __init__(self, group: SimulatedGroup, threads: int = 1):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.group = group
        self.free_at = [0.0] * threads  # when each thread ends its last started compile
        self._heap: list[tuple[int, int, SimFuture]] = []
        self._seq = itertools.count()

    def submit(self, fut: SimFuture, priority: int) -> None:
        heapq.heappush(self._heap, (priority, next(self._seq), fut))

    def advance(self, until: float, until_started: SimFuture | None = None) -> None:
        """Starts the queued compiles the thread reaches by `until` (or, with `until_started`,
        until that one has started)."""
        while self._heap:
            if until_started is not None and until_started.start is not None:
                return
            thread = min(range(len(self.free_at)), key=self.free_at.__getitem__)
            if self.free_at[thread] > until:  # all busy past `until`: nothing starts (common)
                return
            live = [(p, q, f) for p, q, f in self._heap if not f.cancelled()]
            if len(live) != len(self._heap):
                self._heap = live
                heapq.heapify(self._heap)
                continue
            # the thread picks, when free, among the compiles queued by then; idle until the next
            t = max(self.free_at[thread], min(f.submitted for _, _, f in self._heap))
            if t > until:
                return
            ready = [(p, q, f) for p, q, f in self._heap if f.submitted <= t]
            pick = min(ready, key=lambda e: (e[0], e[1]))
            self._heap.remove(pick)
            heapq.heapify(self._heap)
            fut = pick[2]
            fut.start, fut.done_at = t, t + fut.seconds
            self.free_at[thread] = fut.done_at

    def shutdown(self) -> None:
        """Cancels every compile not started (`GroupRunner.stop_background`)."""
        self.advance(self.group.clock)
        for _, _, fut in self._heap:
            fut._cancelled = True
        self._heap.clear()


class SimulatedGroup(GroupRunner):
    """A `GroupRunner` whose device work is simulated (module docstring).

    book: the group's `ArenaBook` (crosspool: num_kv + num_weights devices; shared/static: one
    colocated device). cost: the fitted `CostModel`. runner_kwargs: `GroupRunner`'s (steps_per_call,
    prefill_chunk, max_prefill_tokens, platform, ...), as the engine passes them.
    """

    def __init__(self, book: ArenaBook, layout: PoolLayout, cost: CostModel, **runner_kwargs: Any):
        self.cost = cost
        self.clock = 0.0  # the group's worker thread, seconds
        self.device_free_at = 0.0  # when the device has run every dispatched call
        # the background compile threads (`compile_workers`)
        self.compile_queue = SimCompileQueue(self, int(runner_kwargs.get("compile_workers", 1)))
        self.compile_log: list[tuple[float, float]] = []  # (end time, seconds) of serving-path compiles
        self.background_futures: list[SimFuture] = []  # every background compile queued
        self.busy_seconds = 0.0  # device seconds of calls
        self.outside: dict[str, int] = {}  # calls outside the calibrated ranges, by range
        self.calls_priced = 0
        self.topology_kind = "colocated" if book.colocated else "split"
        if runner_kwargs.get("host_swap_pages"):
            raise ValueError("the simulator has no host swap path (the engine's default is none)")
        super().__init__(None, layout, book.attn_pages, store=book, **runner_kwargs)

    # -- clock and compiles --
    def _now(self) -> float:
        return self.clock

    def _compile_in_background(self, spec: StepSpec, priority: int = compile_queue.WARM) -> None:
        if spec in self._background or spec in self._programs or spec in self._ready:
            return
        fut = SimFuture(self.compile_queue, self.clock, self._compile_seconds(spec), SimProgram(spec))
        self.compile_queue.submit(fut, priority)
        self._background[spec] = fut
        self.background_futures.append(fut)

    def stop_background(self) -> None:
        self.compile_queue.shutdown()
        self._poll_background()

    def idle(self) -> None:
        """A step that dispatched nothing while requests live (each one held for a program still
        compiling): the engine's worker steps again and again meanwhile, with nothing to run until
        the compile thread finishes its current compile; the clock moves there (or, with no
        compile queued, by one host launch)."""
        self.compile_queue.advance(self.clock)
        pending = [f for f in self._background.values() if not f.cancelled()
                   and (f.done_at is None or f.done_at > self.clock)]
        started = [f for f in pending if f.start is not None]
        nxt = min(started, key=lambda f: f.done_at) if started else (
            min(pending, key=lambda f: f.submitted) if pending else None)
        if nxt is None:
            self.clock += self.cost.host_launch_s
            return
        if nxt.start is None:  # the thread is free: it starts the next queued compile(s)
            self.compile_queue.advance(float("inf"), until_started=nxt)
        self.clock = max(self.clock, min(f.done_at for f in pending if f.done_at is not None))

    def wait_background(self, timeout: float | None = None) -> bool:
        """Advances the clock until every queued virtual compile is done (`timeout` ignored)."""
        for fut in list(self._background.values()):
            fut.exception()
        return True

    def _compile_aot(self, spec: StepSpec) -> SimProgram:
        seconds = self._compile_seconds(spec)
        self.clock += seconds  # on the serving path: the worker waits
        self.compile_log.append((self.clock, seconds))
        return SimProgram(spec)

    def _compile_seconds(self, spec: StepSpec) -> float:
        return self.cost.compile_s["decode" if spec.decode else "prefill"]

    def precompile(self, specs: list[StepSpec], threads: int = 4,
                   log: Callable[[str], None] | None = None) -> int:
        """Marks `specs` compiled before serving (as `PooledEngine.precompile` leaves them); the
        time it would take is `precompile_seconds`, not on the clock."""
        specs = [sp for sp in specs if sp not in self._programs]
        for sp in specs:
            fut = self._background.get(sp)
            if fut is not None and fut.cancel():
                del self._background[sp]
            self._ready.pop(sp, None)
        self.max_programs = max(self.max_programs, len(self._programs) + len(specs) + len(self._background))
        for sp in specs:
            self._programs[sp] = SimProgram(sp)
            self.programs_built += 1
            self.held_generation += 1
        return len(specs)

    # -- calls --
    def _execute(self, programs: list[tuple[list[int], Any]], groups: list[tuple[Any, list[str], list]],
                 shapes: list[LaneShape], sorted_rows: list[tuple[list[list], dict[str, int]]], decode: bool
                 ) -> tuple[list[Any], list[list[tuple[str, int, int, int, bool]]], float, float | None]:
        """Prices each lane group's program call with the cost model and queues it on the device
        timeline after the host's launch seconds; the outputs are placeholder tokens."""
        n = self.store.num_devices
        placements = [lane_placements(per_dev, decode) for per_dev, _ in sorted_rows]
        self.clock += self.cost.host_launch_s
        dispatched = self.clock
        seconds = 0.0
        for idxs, prog in programs:
            slots, decode_rows = [], []
            for i in idxs:
                for rows in sorted_rows[i][0]:
                    for w, s0, e0, seg, older, _ in rows:
                        slot = SlotWork(w.req.model, seg.device, e0 - s0, s0,
                                        samples=decode or (w.samples and e0 == w.end),
                                        extra=tuple((s.device, s.num_tokens) for s in older))
                        # a mixed step's decode row (`mixed_steps`): one row past the prompt
                        row = self.mixed_steps and not decode and e0 - s0 == 1 and s0 >= len(w.req.prompt)
                        (decode_rows if row else slots).append(slot)
            if not slots:  # (a prefill call holds at least one prompt row)
                slots, decode_rows = decode_rows, []
            costs = {s.model: self._model_costs(s.model) for s in slots + decode_rows}
            work = lane_work(slots, costs, self.store.num_kv, self.store.num_weights, decode)
            steps = prog.spec.steps
            # rows of the program beyond the call's own (a larger program while its own compiles)
            padded = sum(ln.slots if decode else ln.tokens for ln in prog.spec.lanes) - (
                work.slots_per_device if decode else _busiest_tokens(sorted_rows, idxs))
            seconds += (self.cost.decode_s(self.topology_kind, work, steps, max(0, padded)) if decode
                        else self.cost.prefill_s(self.topology_kind, work)
                        + self.cost.padded_prefill_s(max(0, padded)))
            if decode_rows:  # priced as one step of a decode call of those rows (module docstring)
                rows_work = lane_work(decode_rows, costs, self.store.num_kv, self.store.num_weights, True)
                seconds += self.cost.decode_s(self.topology_kind, rows_work, 1)
            for why in self.cost.outside(work, decode, [_shape(m) for m in costs]):
                self.outside[why] = self.outside.get(why, 0) + 1
            self.calls_priced += 1
        start = max(dispatched, self.device_free_at)
        self.device_free_at = start + seconds
        self.busy_seconds += seconds
        steps = max(prog.spec.steps for _, prog in programs)
        outs = [np.full((steps, n * shape.slots), SIM_TOKEN, np.int32) for shape in shapes]
        return outs, placements, dispatched, self.device_free_at

    def _read(self, call: _Call) -> list[np.ndarray]:
        self.clock = max(self.clock, call.done_at if call.done_at is not None else self.clock)
        return list(call.outs)

    def _swap(self, plan: Any, to_host: bool) -> None:
        raise RuntimeError("the simulator has no host swap path")


def _busiest_tokens(sorted_rows: list[tuple[list[list], dict[str, int]]], idxs: list[int]) -> int:
    """Prefill query tokens of the lanes `idxs` on their busiest KV device."""
    per_dev: dict[int, int] = {}
    for i in idxs:
        for d, rows in enumerate(sorted_rows[i][0]):
            per_dev[d] = per_dev.get(d, 0) + sum(e0 - s0 for _, s0, e0, *_ in rows)
    return max(per_dev.values(), default=0)


def _shape(model: str) -> str:
    from benchmarks.workload.presets import model_shape

    return model_shape(model)
