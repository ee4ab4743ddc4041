"""The KV virtualizer's per-request page tables, and what is exported from them (plain Python + numpy).

`RequestKV` is the virtualizer's mutable record of one request: its token count, residency, and
either its segments on devices (`SegmentPages`: a [layer, row] table of page indices on one device)
or its host swap slots. `RequestTable` holds the records by request id. `segment_views`,
`device_pages_of` and `build_page_table` read the records into the values the virtualizer hands out
(`KVSegment`, `PhysicalPage`, `ModelPageTable`). Which pages a record gets is decided in
`kv_allocation`; `KVVirtualizer` coordinates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from crosspool_jax.memory.kv_config import ModelKVLayout
from crosspool_jax.memory.kv_types import (
    PAGE_SENTINEL,
    KVRequestStateError,
    KVSegment,
    ModelPageTable,
    PhysicalPage,
    RequestId,
    Residency,
)


class SegmentPages:
    """One segment's pages: a [layers, capacity] int32 table grown by doubling; `rows` used.

    device: the KV device holding the segment; token_start: its first token; rows: pages per layer
    it holds (each row covers `tokens_per_page` tokens in all layers).
    """

    def __init__(self, device: int, token_start: int, num_layers: int):
        self.device = device
        self.token_start = token_start
        self.rows = 0
        self._table = np.empty((num_layers, 8), np.int32)

    @property
    def layer_pages(self) -> np.ndarray:
        """[layer, row] page indices in token order (a read-only view)."""
        view = self._table[:, : self.rows]
        view.flags.writeable = False
        return view

    def append_row(self, pages: list[int]) -> None:
        """Adds one row: `pages[layer]` for every layer."""
        if self.rows == self._table.shape[1]:
            grown = np.empty((self._table.shape[0], 2 * self.rows), np.int32)
            grown[:, : self.rows] = self._table
            self._table = grown
        self._table[:, self.rows] = pages
        self.rows += 1


@dataclasses.dataclass
class RequestKV:
    """The virtualizer's record of one request: `num_tokens` tokens of KV, on device or on host.

    RESIDENT: `segments` cover the tokens in order (none while it holds 0 tokens). SWAPPED: no
    segments; `host_slots[layer]` are the host slots of that layer's pages in token order.
    """

    request_id: RequestId
    layout: ModelKVLayout
    num_tokens: int = 0
    residency: Residency = Residency.RESIDENT
    segments: list[SegmentPages] = dataclasses.field(default_factory=list)
    host_slots: list[list[int]] = dataclasses.field(default_factory=list)  # [layer] -> slots, token order

    @property
    def rows(self) -> int:
        """Rows (pages per layer) held on devices."""
        return sum(s.rows for s in self.segments)

    @property
    def num_device_pages(self) -> int:
        """Device pages held, all layers."""
        return self.rows * self.layout.num_layers

    @property
    def num_host_pages(self) -> int:
        """Host slots held, all layers."""
        return sum(len(s) for s in self.host_slots)

    @property
    def last_device(self) -> int | None:
        """Device of the last segment (None while the request holds no device pages)."""
        return self.segments[-1].device if self.segments else None

    def check_new_len(self, new_len: int) -> None:
        """Raise KVRequestStateError if `new_len` tokens is fewer than the request holds (no shrinking)."""
        if new_len < self.num_tokens:
            raise KVRequestStateError(
                f"request {self.request_id!r} holds {self.num_tokens} tokens; cannot grow to {new_len}"
            )

    def segment_end(self, seg: SegmentPages) -> int:
        """Token end (exclusive) of `seg`: the end of its last row, or of the request if that is sooner."""
        return min(self.num_tokens, seg.token_start + seg.rows * self.layout.tokens_per_page)


class RequestTable(dict[RequestId, RequestKV]):
    """The virtualizer's request records by request id; its lookups raise KVRequestStateError."""

    def record(self, request_id: RequestId) -> RequestKV:
        """The record of `request_id`, resident or swapped."""
        try:
            return self[request_id]
        except KeyError:
            raise KVRequestStateError(f"request {request_id!r} is not in the KV pool") from None

    def resident(self, request_id: RequestId) -> RequestKV:
        """The record of `request_id`, which must be resident."""
        req = self.record(request_id)
        if req.residency != Residency.RESIDENT:
            raise KVRequestStateError(f"request {request_id!r} is swapped out; swap it in first")
        return req

    def swapped(self, request_id: RequestId) -> RequestKV:
        """The record of `request_id`, which must be swapped out."""
        req = self.record(request_id)
        if req.residency != Residency.SWAPPED:
            raise KVRequestStateError(f"request {request_id!r} is not swapped out")
        return req


def segment_views(req: RequestKV) -> tuple[KVSegment, ...]:
    """The request's segments in token order, as views of its tables (empty if it holds no pages)."""
    return tuple(
        KVSegment(seg.device, seg.token_start, req.segment_end(seg), seg.layer_pages) for seg in req.segments
    )


def device_pages_of(req: RequestKV) -> tuple[PhysicalPage, ...]:
    """Every device page the request holds: segment by segment, layer by layer, in token order."""
    return tuple(
        PhysicalPage(s.device, p) for s in req.segments for plist in s.layer_pages.tolist() for p in plist
    )


def build_page_table(
    requests: Iterable[RequestKV], device: int, layout: ModelKVLayout, max_pages: int | None
) -> ModelPageTable:
    """Page table of the resident requests of `layout.model` among `requests` on `device`.

    One row per segment on `device`, in the order of `requests` and then of the segments. The page
    axis is `max_pages` wide (None: the widest row's pages per layer); raises KVRequestStateError if
    a row is wider than `max_pages`.
    """
    model = layout.model
    rows: list[tuple[RequestId, int, int, int, np.ndarray]] = []
    for req in requests:
        if req.layout.model != model or req.residency != Residency.RESIDENT:
            continue
        for index, seg in enumerate(req.segments):
            if seg.device == device:
                end = req.segment_end(seg)
                rows.append((req.request_id, index, seg.token_start, end - seg.token_start, seg.layer_pages))
    widest = max((len(r[4][0]) for r in rows), default=0)
    width = widest if max_pages is None else max_pages
    if width < widest:
        raise KVRequestStateError(f"a row on device {device} has {widest} pages, more than max_pages={width}")
    pages = np.full((len(rows), layout.num_layers, max(width, 1)), PAGE_SENTINEL, dtype=np.int32)
    for r, (_, _, _, _, layer_pages) in enumerate(rows):
        pages[r, :, : layer_pages.shape[1]] = layer_pages
    return ModelPageTable(
        device=device,
        model=model,
        tokens_per_page=layout.tokens_per_page,
        request_ids=tuple(r[0] for r in rows),
        segment_index=np.array([r[1] for r in rows], dtype=np.int32),
        token_start=np.array([r[2] for r in rows], dtype=np.int32),
        num_tokens=np.array([r[3] for r in rows], dtype=np.int32),
        page_indices=pages,
    )
