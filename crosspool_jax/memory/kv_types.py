"""Data types of the KV virtualizer: ids, errors, pages, segments, swap plans, statistics, page tables.

Units: a page is one layer's KV for `tokens_per_page` consecutive tokens of one request, `page_bytes`
bytes; page indices count pages of one device's arena; host slots count `page_bytes` host buffers;
token positions and lengths count tokens. Plain Python (numpy only for the exported page tables).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable
from typing import NamedTuple

import numpy as np

ModelId = str
RequestId = Hashable

PAGE_SENTINEL = -1
"""Value that pads the page-index arrays of `ModelPageTable` (no page)."""


# ---- errors -------------------------------------------------------------------------------------


class KVPoolError(Exception):
    """Base class of every error raised by the KV virtualizer."""


class KVConfigError(KVPoolError, ValueError):
    """A pool configuration or model geometry that cannot work (e.g. not one token fits a page)."""


class KVOutOfPages(KVPoolError):
    """An allocation that does not fit the free device pages; nothing was allocated."""

    def __init__(self, message: str, pages_needed: int, pages_free: int) -> None:
        super().__init__(message)
        self.pages_needed = pages_needed
        self.pages_free = pages_free


class KVHostSwapFull(KVPoolError):
    """A swap-out that does not fit the free host swap slots; nothing was changed."""


class KVRequestStateError(KVPoolError, ValueError):
    """An operation on a request in the wrong state (unknown, swapped when it must be resident, ...)."""


# ---- pages, segments, swaps, statistics, page tables --------------------------------------------


class PhysicalPage(NamedTuple):
    """One page of the pool: `page` is its index in `device`'s arena."""

    device: int
    page: int


@dataclasses.dataclass(frozen=True)
class KVSegment:
    """A contiguous token range of one request whose KV (all layers) lives on one device.

    Tokens [token_start, token_end) are held; `layer_pages[l][i]` is the page index (on `device`) of
    layer l for tokens [token_start + i*tokens_per_page, token_start + (i+1)*tokens_per_page).
    The last page may be partly filled.
    """

    device: int
    token_start: int
    token_end: int
    # [layers, pages_per_layer] int32, read-only: a view of the virtualizer's table as of the call
    # (rows added later are not in it), so building a step's page tables copies no Python lists
    layer_pages: np.ndarray = dataclasses.field(compare=False)

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def pages_per_layer(self) -> int:
        return int(self.layer_pages.shape[1]) if self.layer_pages.ndim == 2 else 0


class Residency(enum.StrEnum):
    RESIDENT = "resident"  # pages on KV devices (possibly none yet)
    SWAPPED = "swapped"  # pages copied to host slots; no device pages


class SwapDirection(enum.StrEnum):
    DEVICE_TO_HOST = "device_to_host"
    HOST_TO_DEVICE = "host_to_device"


@dataclasses.dataclass(frozen=True)
class PageCopy:
    """Copy one page between a device arena and a host swap slot.

    layer and page_ordinal say which page of the request it is: page_ordinal i of a layer holds the
    request's tokens [i*tokens_per_page, (i+1)*tokens_per_page).
    """

    layer: int
    page_ordinal: int
    device: int
    device_page: int
    host_slot: int


@dataclasses.dataclass(frozen=True)
class SwapPlan:
    """The copies of one swap-out or swap-in; the engine performs them, in any order.

    Ordering rule for the engine: perform every swap-out's copies before any step writes KV (the
    device pages are already free in the books), and every swap-in's copies before the step that
    reads them.
    """

    request_id: RequestId
    model: ModelId
    direction: SwapDirection
    num_tokens: int
    page_bytes: int
    copies: tuple[PageCopy, ...]

    @property
    def num_pages(self) -> int:
        return len(self.copies)

    @property
    def num_bytes(self) -> int:
        """Bytes moved between host and device."""
        return len(self.copies) * self.page_bytes


@dataclasses.dataclass(frozen=True)
class EvictedKV:
    """What `evict` freed: the request's token count and its device pages (now free)."""

    request_id: RequestId
    model: ModelId
    num_tokens: int
    page_bytes: int
    pages: tuple[PhysicalPage, ...]

    @property
    def num_bytes(self) -> int:
        return len(self.pages) * self.page_bytes


@dataclasses.dataclass(frozen=True)
class DeviceKVStats:
    """Occupancy of one KV device. tokens_held counts tokens (not token-layers) stored there."""

    device: int
    pages_total: int
    pages_used: int
    pages_free: int
    bytes_used: int
    bytes_free: int
    tokens_held: int
    num_requests: int


@dataclasses.dataclass(frozen=True)
class ModelKVStats:
    """Occupancy of one model across the pool and host swap."""

    model: ModelId
    pages_used: int
    bytes_used: int
    pages_used_per_device: tuple[int, ...]
    tokens_held: int
    num_requests: int  # resident requests
    num_swapped: int
    host_pages_used: int


@dataclasses.dataclass(frozen=True)
class PoolKVStats:
    """Occupancy of the whole pool and host swap."""

    pages_total: int
    pages_used: int
    pages_free: int
    bytes_used: int
    bytes_free: int
    host_pages_total: int
    host_pages_used: int
    num_requests: int
    num_swapped: int


@dataclasses.dataclass(frozen=True, eq=False)
class ModelPageTable:
    """One model's page table on one device, for the attention kernels.

    Row r is one segment of one request (normally the whole request): `page_indices[r, l, i]` is the
    page (on `device`) of layer l holding the row's tokens [token_start[r] + i*tokens_per_page, ...),
    padded with PAGE_SENTINEL. num_tokens[r] is the tokens of the row. All arrays are int32.
    """

    device: int
    model: ModelId
    tokens_per_page: int
    request_ids: tuple[RequestId, ...]
    segment_index: np.ndarray  # [rows]
    token_start: np.ndarray  # [rows]
    num_tokens: np.ndarray  # [rows]
    page_indices: np.ndarray  # [rows, num_layers, max_pages]

    def as_lists(self) -> dict[tuple[RequestId, int, int], list[int]]:
        """{(request, segment index, layer): page indices on this device}, without padding."""
        out: dict[tuple[RequestId, int, int], list[int]] = {}
        for r, request_id in enumerate(self.request_ids):
            for layer in range(self.page_indices.shape[1]):
                row = self.page_indices[r, layer]
                out[(request_id, int(self.segment_index[r]), layer)] = [
                    int(p) for p in row if p != PAGE_SENTINEL
                ]
        return out

