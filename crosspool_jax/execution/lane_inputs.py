"""One lane's host inputs for a program call (`GroupRunner` inherits `LaneInputs`): the per-slot
and per-row arrays of `pooled_step.input_shapes` ([N, ...] per key, N the group's devices) filled
from the lane's rows on each KV device: tokens and positions, page tables of each slot's tail
segment and of its older segments as extras, sampling parameters and stop ids, and the feeds of
input tokens still on the device (sampled by a call in flight).

`LaneInputs` keeps no state; it reads the runner's store (page offsets, model bases). Host-side
bookkeeping only: nothing here is traced.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crosspool_jax.execution.pooled_step import LaneShape, empty_lane_inputs
from crosspool_jax.execution.runner_records import PENDING, _Req
from crosspool_jax.execution.sampling import seed_words
from crosspool_jax.memory.topology import Role


def _device_feed(r: _Req, pos: int, row: int) -> tuple[int, Any, int]:
    """(flat tokens row, source call output, flat index) feeding `r`'s input token at `pos` from the
    call still in flight that sampled it (`r.feed`); RuntimeError unless it is the request's last."""
    if r.feed is None or pos != len(r.prompt) + len(r.generated) - 1:
        raise RuntimeError(f"request {r.request_id}: input token at {pos} is on the device but not its last")
    return (row, *r.feed)


def _tokens_at(r: _Req, new: list[int], start: int, end: int) -> list[int]:
    """The request's tokens at positions [start, end) of prompt + generated + `new` (this step's),
    without building the whole sequence (a long prompt would be copied every step)."""
    p, g = len(r.prompt), len(r.generated)
    out = list(r.prompt[start:min(end, p)]) if start < p else []
    if end > p:
        a, b = max(start, p) - p, end - p
        out += r.generated[a:min(b, g)]
        if b > g:
            out += new[max(a - g, 0):b - g]
    if len(out) != end - start:
        raise RuntimeError(f"request {r.request_id}: positions [{start}, {end}) past its "
                           f"{p + g + len(new)} known tokens")
    return out


class LaneInputs:
    """One lane's host inputs (module docstring); a base class of `GroupRunner`, not used alone."""

    def _lane_inputs(self, cls: Any, names: list[str], shape: LaneShape, per_dev: list[list],
                     gidx: dict[str, int], decode: bool
                     ) -> tuple[dict[str, np.ndarray], list[tuple[int, Any, int]]]:
        """One lane's host inputs at `shape` ([N, ...] per key: `pooled_step.input_shapes`) from its
        rows per KV device, and its feeds: tokens still on the device, (flat tokens row, source
        call output, flat index into it)."""
        store = self.store
        n, n_kv = store.num_devices, store.num_kv
        g_count, b, t, pages = shape.groups, shape.slots, shape.tokens, shape.max_pages
        arr = empty_lane_inputs(n, b, t, cls.config.num_layers, pages, shape.stop_width, decode,
                                shape.extras, shape.extra_rows)
        a_base = [store.models[m].base[Role.KV] for m in names]
        f_base = [store.models[m].base[Role.WEIGHTS] for m in names]
        arr["a_base"] = np.tile(np.array(a_base + a_base[:1] * (g_count - len(names)), np.int32), (n, 1))
        arr["f_base"] = np.tile(np.array(f_base + f_base[:1] * (g_count - len(names)), np.int32), (n, 1))
        arr["grp_rows"] = np.zeros((n, g_count), np.int32)
        arr["grp_slots"] = np.zeros((n, g_count), np.int32)
        arr["tok_grp"] = np.zeros((n, t), np.int32)
        arr["slot_grp"] = np.zeros((n, b), np.int32)
        feed: list[tuple[int, Any, int]] = []
        x_fill = [0] * n
        for d in range(n_kv):
            row_ptr = 0
            for bi, row in enumerate(per_dev[d]):
                row_ptr = self._fill_slot(arr, feed, x_fill, d, bi, row_ptr, row, gidx, t, decode)
            if not decode:
                arr["cu_q"][d, len(per_dev[d]) + 1:] = row_ptr
        return arr, feed

    def _fill_slot(self, arr: dict[str, np.ndarray], feed: list[tuple[int, Any, int]], x_fill: list[int],
                   d: int, bi: int, row_ptr: int, row: tuple, gidx: dict[str, int], t: int,
                   decode: bool) -> int:
        """Writes slot `bi` of KV device `d` into `arr` (its token rows from `row_ptr` for a
        prefill, row `bi` for a decode; its pages, sampling and older segments as extras, counted
        per device in `x_fill`); returns the next free token row."""
        w, s0, e0, seg, older, _ = row
        r = w.req
        base = self.store.kv_first_page
        q = e0 - s0
        rows_idx = (np.arange(q) + row_ptr) if not decode else np.array([bi])
        gi = gidx[r.model]
        arr["grp_rows"][d, gi] += len(rows_idx)
        arr["grp_slots"][d, gi] += 1
        arr["tok_grp"][d, rows_idx] = gi
        arr["slot_grp"][d, bi] = gi
        if decode:
            tok = _tokens_at(r, [], s0, s0 + 1)[0]
            if tok == PENDING:  # sampled by a call still in flight: read on device
                feed.append(_device_feed(r, s0, d * t + bi))
            arr["tokens"][d, bi] = tok
            arr["positions"][d, bi] = s0
            arr["tok_slot"][d, bi] = bi
            arr["sample_row"][d, bi] = bi
            arr["tail_len"][d, bi] = s0 - seg.token_start + 1
            arr["remaining"][d, bi] = e0 - s0
        else:
            toks = _tokens_at(r, [], s0, e0)
            if PENDING in toks:
                # a mixed step's decode row (`mixed_steps`): its one input token, the last one
                # sampled, is read on the device as a decode call's is
                if q != 1:
                    raise RuntimeError(f"request {r.request_id}: prefill of positions "
                                       f"[{s0}, {e0}) reads tokens still on the device")
                feed.append(_device_feed(r, s0, d * t + row_ptr))
                toks = [0]
            arr["tokens"][d, rows_idx] = toks
            arr["positions"][d, rows_idx] = np.arange(s0, e0)
            arr["tok_slot"][d, rows_idx] = bi
            arr["cu_q"][d, bi + 1:] = row_ptr + q
            arr["tail_len"][d, bi] = e0 - seg.token_start
            if w.samples and e0 == w.end:
                arr["sample_row"][d, bi] = row_ptr + q - 1
            arr["remaining"][d, bi] = 1
            row_ptr += q
        lp = seg.layer_pages  # [L, pages]
        arr["tail_pages"][d, bi, :, : lp.shape[1]] = lp + base
        arr["tail_start"][d, bi] = seg.token_start
        sp = r.sampling
        arr["temperature"][d, bi] = sp.temperature
        arr["top_k"][d, bi] = sp.top_k
        arr["top_p"][d, bi] = sp.top_p
        arr["seed"][d, bi] = seed_words(sp.seed)
        arr["stop_ids"][d, bi, : len(r.stop_ids)] = r.stop_ids
        for s in older:
            xd = s.device
            xi = x_fill[xd]
            x_fill[xd] += 1
            arr["x_rows"][xd, xi, : len(rows_idx)] = d * t + rows_idx
            lp = s.layer_pages
            arr["x_pages"][xd, xi, :, : lp.shape[1]] = lp + base
            arr["x_len"][xd, xi] = s.num_tokens
        return row_ptr
