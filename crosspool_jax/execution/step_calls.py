"""How a device group's planned step becomes program calls (`GroupRunner` inherits `StepCalls`):
each request's range of the step is cut at its KV segments' ends, the rows are grouped into lanes
(one per model class, or a class's two ping-pong lanes), each lane's shape is rounded to its
bucket and given a program (`StepPrograms._program_for`: its own, or a larger one padded), the
per-slot and per-row inputs are filled on the host (`lane_inputs.LaneInputs`), input tokens
still on the device are fed from the call that sampled them, and the calls are dispatched on the
arena.

`StepCalls` keeps no state of its own; it reads and updates the runner's store, virtualizer,
requests, buckets, counters and call clock. The device work is `pooled_step` /
`host_step`; everything here is host-side bookkeeping, not traced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from crosspool_jax.execution.pooled_step import LaneShape, StepSpec
from crosspool_jax.execution.prefill_cost import NO_WORK, PrefillWork, chunk_work, dense_flops_per_token
from crosspool_jax.execution.runner_records import PENDING, _Call, _Work
from crosspool_jax.execution.step_programs import _pow2
from crosspool_jax.memory.kv_virtualizer import KVSegment
from crosspool_jax.models.config import AttentionKind, ModelConfig

# Decode attention switches from the split grid to the persistent work list at this raggedness
# (longest tail / mean tail of the call's live slots). Measured on one H200 (benchmarks/
# schedule_rule.py, docs/kernels.md): at >= 8 persistent won all 8 batches measured (1.05-2.6x);
# from 1 to 4 either won (0.67-1.48x; 3.0x once), so split, the better on uniform long batches, stays.
PERSISTENT_RAGGEDNESS = 8.0


def attention_schedule(tail_lens: Sequence[np.ndarray], cfg: ModelConfig, eligible: bool) -> str:
    """"persistent" or "split" for a decode call of slots with these tail lengths (0: empty
    slot): persistent when the batch is ragged (`PERSISTENT_RAGGEDNESS`), for GQA models on GPU
    (`eligible`: a GPU decode call without split-KV extras). MLA stays split (its persistent
    kernel was slower even on uniform batches: docs/benchmarks.md case (d))."""
    if not eligible or cfg.attention != AttentionKind.GQA:
        return "split"
    lens = np.concatenate([np.asarray(t).reshape(-1) for t in tail_lens])
    lens = lens[lens > 0]
    if lens.size < 2:
        return "split"
    return "persistent" if lens.max() >= PERSISTENT_RAGGEDNESS * lens.mean() else "split"


def lane_placements(per_dev: Sequence[Sequence[tuple]], decode: bool
                    ) -> list[tuple[str, int, int, int, bool]]:
    """Where a lane's rows run: per row of `per_dev` (per KV device, its rows in slot order, each
    (work, start, end, segment, older segments, segment index)), (request id, KV device, slot,
    tokens computed, whether the row samples a token: every decode row, and a prefill row that
    ends its work's range with `samples`)."""
    return [(w.req.request_id, d, bi, e0 - s0, decode or (w.samples and e0 == w.end))
            for d, rows in enumerate(per_dev) for bi, (w, s0, e0, *_) in enumerate(rows)]


class StepCalls:
    """A step's work as program calls (module docstring); a base class of `GroupRunner`, not used
    alone."""

    # -- building one program call --
    def _segment_at(self, rid: str, pos: int) -> tuple[int, KVSegment, list[KVSegment]]:
        segs = self.kv.segments(rid)
        tpp = self.kv.layout(self.reqs[rid].model).tokens_per_page
        for i, s in enumerate(segs):
            cap_end = s.token_start + s.pages_per_layer * tpp
            if s.token_start <= pos < cap_end:
                return i, s, list(segs[:i])
        raise RuntimeError(f"request {rid}: no KV segment holds position {pos}: {segs}")

    def _run(self, items: list[_Work], decode: bool) -> list[_Work]:
        """Dispatches one program over `items` (its tokens enter `generated` as placeholders, read
        by `_collect`); returns the work left (ranges cut at segment ends). Dispatches nothing when
        every item's request has ended. Its compile (if any) lets other threads' cancels in
        (`_unlocked`): a request ended meanwhile still fills its rows (the page numbers read before,
        freed now, taken again only by a later launch), and its tokens are dropped."""
        items = [w for w in items if not w.req.done]
        if not items:
            return []
        by_model, rest = self._cut(items, decode)
        groups, lane_group = self._lanes(by_model, decode)
        # each lane's shape: the smallest bucket holding its rows
        wanted, sorted_rows, tail_lens, k_steps = [], [], [], 1
        for cls, names, rows in groups:
            shape, placed_rows, tails, k = self._lane_shape(cls, names, rows, decode)
            wanted.append(shape)
            sorted_rows.append(placed_rows)
            tail_lens.append(tails)
            k_steps = max(k_steps, k)
        steps = (self.steps_per_call if self.buckets.fixed_steps else _pow2(k_steps)) if decode else 1
        blocked_before, fallbacks_before = self.blocked_compiles, self.fallback_calls
        programs, lanes = self._lane_programs(wanted, lane_group, tail_lens, decode, steps)
        outs, placements, dispatched, done_at = self._execute(programs, groups, lanes, sorted_rows, decode)
        places = self._placeholders(lanes, placements, outs, decode)
        prefill_tokens = 0 if decode else sum(q for place in placements for _, _, _, q, _ in place)
        self._dispatches += 1
        self._inflight.append(_Call(tuple(outs), tuple(lanes), places, decode, prefill_tokens,
                                    NO_WORK if decode else self._call_work(groups, lanes),
                                    frozenset(w.req.model for w in items), dispatched,
                                    (self.blocked_compiles, self.fallback_calls)
                                    != (blocked_before, fallbacks_before), done_at,
                                    None if done_at is not None else self._call_clock.watch(outs),
                                    sum(len(rows) for _, _, rows in groups),
                                    sum(s0 for _, _, rows in groups for _, s0, *_ in rows),
                                    self.launches, self._step_decoding))
        return rest

    def _cut(self, items: list[_Work], decode: bool) -> tuple[dict[str, list], list[_Work]]:
        """`items`' rows of this call per model, (work, start, end, segment, older segments,
        segment index), each cut at its KV segment's end (and a prefill at `max_prefill_tokens`:
        a request's span of a step runs in one call); and the work cut off, left for later."""
        by_model: dict[str, list[tuple[_Work, int, int, KVSegment, list[KVSegment], int]]] = {}
        rest: list[_Work] = []
        for w in items:
            si, seg, older, = self._segment_at(w.req.request_id, w.start)
            tpp = self.geoms[w.req.model].tokens_per_page
            end = min(w.end, seg.token_start + seg.pages_per_layer * tpp)
            if not decode:
                end = min(end, w.start + self.max_prefill_tokens)
            if end < w.end:
                rest.append(_Work(w.req, end, w.end, w.decode, w.samples))
            by_model.setdefault(w.req.model, []).append((w, w.start, end, seg, older, si))
        return by_model, rest

    def _lanes(self, by_model: dict[str, list], decode: bool) -> tuple[list[tuple[Any, list[str], list]],
                                                                        list[int]]:
        """The call's lanes, (class, model names of its groups, rows), one per model class (MLA:
        per model), or `micro_batches` ping-pong lanes of a decode class; and per lane the index
        of its program (a class's lanes share one)."""
        by_class: dict[Any, tuple[list[str], list]] = {}
        for model, rows in sorted(by_model.items()):
            names, all_rows = by_class.setdefault(self._lane_key(model), ([], []))
            names.append(model)
            all_rows.extend(rows)
        placed = ({self._lane_key(names[0]): names for _, names in self.lane_keys()}
                  if self.buckets.groups == "placed" else {})
        groups: list[tuple[Any, list[str], list]] = []
        lane_group: list[int] = []
        mb = self.micro_batches
        for gi, ((cls, one), (names, rows)) in enumerate(by_class.items()):
            names = placed.get((cls, one), names)
            if decode and mb > 1 and len(rows) >= mb and not any(r[4] for r in rows):
                groups += [(cls, names, rows[i::mb]) for i in range(mb)]
                lane_group += [gi] * mb
            else:
                groups.append((cls, names, rows))
                lane_group.append(gi)
        return groups, lane_group

    def _lane_shape(self, cls: Any, names: list[str], rows: list, decode: bool
                    ) -> tuple[LaneShape, tuple[list[list], dict[str, int]], np.ndarray, int]:
        """A lane's wanted shape (the smallest buckets holding its rows), its rows per KV device
        (slots sorted by model) with each model's group index, its slots' tail lengths (the
        attention schedule's input) and its decode steps (1 for a prefill)."""
        n, n_kv, bk = self.store.num_devices, self.store.num_kv, self.buckets
        gidx = {m: i for i, m in enumerate(names)}
        per_dev: list[list] = [[] for _ in range(n_kv)]
        for row in sorted(rows, key=lambda r: gidx[r[0].req.model]):
            per_dev[row[3].device].append(row)
        b = bk.round(max(len(d) for d in per_dev), bk.slots_floor)
        k = max(r[2] - r[1] for r in rows) if decode else 1
        t = b if decode else self.token_bucket(max(sum(r[2] - r[1] for r in d) for d in per_dev))
        pages = bk.round(max(max(r[3].pages_per_layer for r in rows),
                             max((s.pages_per_layer for r in rows for s in r[4]), default=1)),
                         bk.pages_floor)
        n_extra_dev = [0] * n
        for row in rows:
            for s in row[4]:
                n_extra_dev[s.device] += 1
        x = _pow2(max(n_extra_dev)) if any(n_extra_dev) else 0
        c = 1 if decode or not x else _pow2(max(r[2] - r[1] for r in rows))  # only read with extras
        # one stop width: stop-id counts never select a program
        shape = LaneShape(cls, _pow2(len(names)), b, t, pages, x, c, self.stop_width)
        tails = np.array([(r[1] + 1 if decode else r[2]) - r[3].token_start for r in rows])
        return shape, (per_dev, gidx), tails, k

    def _lane_programs(self, wanted: list[LaneShape], lane_group: list[int], tail_lens: list[np.ndarray],
                       decode: bool, steps: int) -> tuple[list[tuple[list[int], Callable]], list[LaneShape]]:
        """Each lane group's program, its shape's or a compiled larger one (`_program_for`), with
        the indices of its lanes; and every lane's shape in the program that runs it (the inputs
        are built at those)."""
        programs: list[tuple[list[int], Callable]] = []
        shapes = list(wanted)
        for gi in dict.fromkeys(lane_group):  # one program per lane group, in order
            idxs = [i for i, g in enumerate(lane_group) if g == gi]
            sched = attention_schedule(
                [tail_lens[i] for i in idxs], wanted[idxs[0]].cls.config,
                decode and self.platform == "gpu" and not any(wanted[i].extras for i in idxs))
            spec, prog = self._program_for(StepSpec(tuple(wanted[i] for i in idxs), decode, steps,
                                                    self.backend, attention_schedule=sched,
                                                    attention_kernels=self.attention_kernels,
                                                    one_row_decode=self.mixed_steps and not decode))
            for i, shape in zip(idxs, spec.lanes, strict=True):
                shapes[i] = shape
            programs.append((idxs, prog))
        return programs, shapes

    def _placeholders(self, lanes: list[LaneShape], placements: list, outs: list, decode: bool
                      ) -> list[list[tuple[str, int, int, int, int]]]:
        """The call's tokens as placeholders in each request's `generated` (and the planner),
        until `_collect` reads them; per lane (request, KV device, slot, tokens, first index)."""
        n = self.store.num_devices
        places = []
        for lane, place, out in zip(lanes, placements, outs, strict=True):
            lane_places = []
            for rid, d, bi, q, samples in place:
                if not samples:
                    continue
                count = q if decode else 1  # a prefill samples one token, after its last row
                r = self.reqs.get(rid)
                if r is None or r.done:  # ended while the program compiled: tokens dropped
                    self.dropped_tokens += count
                    continue
                g0 = len(r.generated)
                r.generated.extend([PENDING] * count)
                r.pending += count
                last_step = count - 1 if decode else 0
                r.feed = (out, last_step * n * lane.slots + d * lane.slots + bi)
                self.planner.append_tokens(rid, [PENDING] * count)
                lane_places.append((rid, d, bi, count, g0))
            places.append(lane_places)
        return places

    def _call_work(self, groups: list[tuple[Any, list[str], list]], lanes: list[LaneShape]) -> PrefillWork:
        """A prefill call's `PrefillWork`: its lanes' tokens, and the rows their programs (the
        shapes that ran) compute beyond them."""
        n_kv = self.store.num_kv
        work = NO_WORK
        for (_, _, rows), lane in zip(groups, lanes, strict=True):
            costs = self._model_costs(rows[0][0].req.model)
            for _, s0, e0, *_ in rows:
                work = work + chunk_work(costs, s0, e0)
            padded = lane.tokens * n_kv - sum(e0 - s0 for _, s0, e0, *_ in rows)
            work = work + PrefillWork(0, 0.0, 0.0, max(0, padded) * dense_flops_per_token(costs))
        return work

    def _execute(self, programs: list[tuple[list[int], Callable]], groups: list[tuple[Any, list[str], list]],
                 shapes: list[LaneShape], sorted_rows: list[tuple[list[list], dict[str, int]]], decode: bool
                 ) -> tuple[list[Any], list[list[tuple[str, int, int, int, bool]]], float, float | None]:
        """Builds the lanes' inputs (at `shapes`, the shapes of the programs that run them) and calls
        each lane group's program on the arena. Returns per lane its output ([steps, N * slots]
        sampled tokens, on the device) and its placements (request id, KV device, slot, tokens
        computed, samples), the `_now()` at dispatch, and None (the calls' end is known by reading
        them; a simulated executor returns its virtual end time there instead)."""
        host_inputs: list[dict[str, np.ndarray]] = []
        placements: list[list[tuple[str, int, int, int, bool]]] = []
        feeds: list[list[tuple[int, Any, int]]] = []  # per lane: (tokens row, source, flat index)
        for (cls, names, _), shape, (per_dev, gidx) in zip(groups, shapes, sorted_rows, strict=True):
            arr, feed = self._lane_inputs(cls, names, shape, per_dev, gidx, decode)
            host_inputs.append(arr)
            placements.append(lane_placements(per_dev, decode))
            feeds.append(feed)
        outs, dispatched = self._dispatch(programs, host_inputs, feeds)
        return outs, placements, dispatched, None

    def _dispatch(self, programs: list[tuple[list[int], Callable]], host_inputs: list[dict[str, np.ndarray]],
                  feeds: list[list[tuple[int, Any, int]]]) -> tuple[list[Any], float]:
        """The device side of `_execute`: copies each lane's host inputs ([N, ...] per key) to the
        devices, feeds tokens still on the device (`feeds`: per lane, (flat tokens row, source
        call output, flat index into it)) and calls each lane group's program on the arena.
        Returns per lane its output and the `_now()` at dispatch. (A multi-process leader
        overrides it to send the same step to its followers first: crosspool_jax/distributed.)"""
        store = self.store
        sharding = store.sharding
        dev_feeds: list[dict[int, tuple[Any, list[int], list[int]]]] = []
        for arr, feed in zip(host_inputs, feeds, strict=True):
            by_src: dict[int, tuple[Any, list[int], list[int]]] = {}
            for row, src, idx in feed:
                if isinstance(src, np.ndarray):  # a host-scheduled call's tokens: already here
                    arr["tokens"].reshape(-1)[row] = src.reshape(-1)[idx]
                else:
                    _, rows, idxs = by_src.setdefault(id(src), (src, [], []))
                    rows.append(row)
                    idxs.append(idx)
            dev_feeds.append(by_src)
        dev_inputs = tuple({key: jax.device_put(v.reshape(-1, *v.shape[2:]), sharding)
                            for key, v in arr.items()} for arr in host_inputs)
        for inp, by_src in zip(dev_inputs, dev_feeds, strict=True):
            for src, rows, idx in by_src.values():
                m = _pow2(len(rows), 8)  # padded: out-of-range rows are dropped
                rows_a = np.full(m, inp["tokens"].shape[0], np.int32)
                rows_a[: len(rows)] = rows
                idx_a = np.zeros(m, np.int32)
                idx_a[: len(idx)] = idx
                inp["tokens"] = self._feed(inp["tokens"], rows_a, src, idx_a)
        dispatched = self._now()
        outs: list[Any] = [None] * len(host_inputs)
        for idxs, prog in programs:
            store.arena, group_outs = prog(store.arena, tuple(dev_inputs[i] for i in idxs))
            for i, o in zip(idxs, group_outs, strict=True):
                outs[i] = o
        return outs, dispatched
