"""The reading half of a device group's runner (`GroupRunner`, which inherits it): the calls in
flight and how their results come back. A step reads the calls before its last `launch()` (all
of them without `overlap`): waits for each call's device work, times it (the decode call EMA, the
prefill rates and cost fit, the call log), revises the planner's placeholders to the sampled
tokens and ends requests at a stop token or at max_new_tokens.

`StepReading` keeps its own state (`_init_reading`) and reads the runner's store, planner,
requests, state lock (`_unlocked`) and counters. Host-side only: nothing here is traced.
"""

from __future__ import annotations

import collections
import time
import weakref

import numpy as np

from crosspool_jax.execution.call_clock import CallClock
from crosspool_jax.execution.runner_records import CallRecord, StepResult, _Call, _Req
from crosspool_jax.execution.step_programs import describe_lane
from crosspool_jax.memory.planner import RequestStatus
from pallas_kernels.page_layout import PoolLayout, _np_dtype


class StepReading:
    """Calls in flight and their reading, for a `GroupRunner` (module docstring); a base class of
    it, not used alone."""

    def _init_reading(self, call_log: int, overlap: bool, layout: PoolLayout) -> None:
        """The calls in flight and their reading: the call log, overlap, the call clock, host-side
        accounting and the host swap space."""
        # the last calls read (`CallRecord`): what the benchmarks report of a run's calls
        self.call_log: collections.deque[CallRecord] = collections.deque(maxlen=call_log)
        # (start, end, decode) of the background compiles, `_now()` seconds (the last 1,024)
        self.compile_spans: collections.deque[tuple[float, float, bool]] = collections.deque(maxlen=1024)
        self.decode_call_seconds: float | None = None  # measured device time of a decode call (EMA)
        self.overlap = overlap
        self._inflight: collections.deque[_Call] = collections.deque()
        self._read_tokens: dict[str, list[int]] = {}  # read since the last StepResult
        self._read_finished: dict[str, tuple[str, str]] = {}
        self._launched: tuple[int, tuple[str, ...]] | None = None  # (calls, preempted) of launch()
        self._last_end = 0.0  # when the last read call's device work ended
        self._call_clock = CallClock()  # stamps each real call's end (`call_clock`)
        weakref.finalize(self, self._call_clock.close)
        # host-side accounting: seconds in launch() (planning, inputs, dispatch), seconds blocked
        # reading calls' tokens, tokens sampled for requests that had ended when read (a stop read
        # one call late with overlap, a cancel)
        self.launch_seconds = 0.0
        self.wait_seconds = 0.0
        self.dropped_tokens = 0
        hp = self.kv.config.host_swap_pages
        self._host_swap = (np.zeros((hp, layout.rows_per_page, layout.row_elems), _np_dtype(layout.dtype))
                           if hp else None)

    def result(self) -> StepResult:
        """Reads the calls before the last `launch()`'s (all calls without `overlap`): their tokens,
        and the requests that ended. Blocks until those calls' device work is done."""
        with self._state_lock:
            return self._result_locked()

    def _result_locked(self) -> StepResult:
        if self._launched is None:
            raise RuntimeError("result() without launch()")
        calls, preempted = self._launched
        self._launched = None
        self._collect(keep=calls if self.overlap else 0)
        if not self.reqs:  # the calls still in flight hold only ended requests' tokens: let go
            self.dropped_tokens += sum(p[3] for call in self._inflight for lane in call.places for p in lane)
            self._inflight.clear()
        tokens, finished = self._read_tokens, self._read_finished
        self._read_tokens, self._read_finished = {}, {}
        return StepResult(tokens, finished, calls, preempted)

    def _now(self) -> float:
        """The runner's clock in seconds (`time.perf_counter`; a simulated runner's virtual clock)."""
        return time.perf_counter()

    def _read(self, call: _Call) -> list[np.ndarray]:
        """A call's sampled tokens per lane ([steps, N * slots] int32), waiting for its device work."""
        return [np.asarray(o) for o in call.outs]

    def _collect(self, keep: int) -> None:
        """Reads the oldest calls in flight until `keep` are left: revises placeholders to the
        sampled tokens, ends requests at a stop token or (all tokens read) at max_new_tokens."""
        n = self.store.num_devices
        while len(self._inflight) > keep:
            call = self._inflight.popleft()
            t_wait = self._now()
            with self._unlocked():  # cancels from other threads free pages meanwhile
                got_lanes = self._read(call)  # waits for the call's device work
            ready = self._now()
            self.wait_seconds += ready - t_wait
            # the device started this call when it was dispatched or when the previous call ended,
            # whichever was later, and ended when the call clock saw its outputs ready
            end = call.done_at if call.done_at is not None else (
                call.end.get(timeout=5.0) if call.end is not None else ready)
            busy = None if end is None else end - max(call.dispatched, self._last_end)
            self._last_end = ready if end is None else end
            # a call that ran in a larger program than its shape's (or compiled its own) measures
            # that program, not its work
            if busy is not None and not call.compiled:
                if call.decode:
                    old = self.decode_call_seconds
                    self.decode_call_seconds = busy if old is None else 0.8 * old + 0.2 * busy
                else:
                    self._note_prefill(call.prefill_tokens, call.models, busy)
                    self.prefill_fit.observe(call.prefill_work, busy)
            if self.call_log.maxlen:
                self.call_log.append(CallRecord(
                    call.dispatched, ready, busy, call.decode,
                    " + ".join(describe_lane(ln) for ln in call.lanes), call.prefill_tokens,
                    call.prefill_work.dense_flops, call.prefill_work.attention_flops, call.compiled,
                    call.requests, call.kv_tokens, len(call.models), call.step, call.step_decoding,
                    call.prefill_work.padded_flops))
            for lane, place, got in zip(call.lanes, call.places, got_lanes, strict=True):
                got = got.reshape(got.shape[0], n, lane.slots)
                for rid, d, bi, count, g0 in place:
                    r = self.reqs.get(rid)
                    if r is None or r.done:  # ended since (cancel, stop read earlier, unload)
                        self.dropped_tokens += count
                        continue
                    seq = [int(v) for v in got[:, d, bi] if v >= 0][:count]
                    self._deliver(r, g0, count, seq)

    def _deliver(self, r: _Req, g0: int, count: int, seq: list[int]) -> None:
        """The `seq` sampled for placeholders generated[g0 : g0 + count] of `r`."""
        rid = r.request_id
        stop_at = next((i for i, t in enumerate(seq) if t in r.stop_ids), None)
        if stop_at is not None:
            seq = seq[: stop_at + 1]
        elif len(seq) != count:
            raise RuntimeError(f"request {rid}: the device sampled {len(seq)} of {count} tokens "
                               "without a stop token")
        r.generated[g0:g0 + len(seq)] = seq
        r.pending -= count
        self.planner.revise_tokens(rid, g0, seq)
        self._read_tokens.setdefault(rid, []).extend(seq)
        info = self.planner.info(rid)
        if stop_at is not None:
            del r.generated[g0 + len(seq):]  # placeholders of later calls: dropped
            if not info.status.is_terminal:
                info = self.planner.finish(rid, "stop token")
            self._read_finished[rid] = ("stop", info.message)
            self._end(r, "stop", info.message)
        elif r.pending == 0 and info.status == RequestStatus.FINISHED:
            self._read_finished[rid] = ("length", info.message)
            self._end(r, "length", info.message)

    def _note_prefill(self, total: int, models: frozenset[str], seconds: float) -> None:
        """Measured prefill throughput per model (EMA over calls) -> the planner's recompute cost."""
        for m in models:
            rate = total / max(seconds, 1e-9)  # tokens of all models per second of this call
            old = self.prefill_rate.get(m)
            self.prefill_rate[m] = rate if old is None else 0.8 * old + 0.2 * rate
        self.planner.update_costs(prefill_tokens_per_s=dict(self.prefill_rate))
