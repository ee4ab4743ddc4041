"""Host-side page allocator and virtualizer for the shared KV pool.

The KV pool is `num_devices` KV devices, each owning an arena of `pages_per_device` pages of
`page_bytes` bytes. A physical page is `(device, page index)`. Every model registers a `KVGeometry`
(layers, bytes of KV per token per layer); the pool's page size then fixes how many tokens one page
holds for that model (`tokens_per_page`), so models of different KV widths share one arena.

A page holds ONE layer's KV for `tokens_per_page` consecutive tokens of ONE request. A request of
`n` tokens therefore needs `ceil(n / tokens_per_page)` pages per layer. We call the `num_layers`
pages that cover the same token range a *row*; rows are the unit of allocation, and all pages of a
row live on one device.

A request's rows normally live on one device (attention stays local to its KV). When the device
cannot hold it, the request is cut into *segments*: contiguous token ranges, each on one device with
all its layers, so the engine can run split-KV decode per segment and combine the partial softmaxes.

This module is plain Python bookkeeping (numpy only for the exported page tables): no JAX, no
copies. Swap-out / swap-in return the list of page copies for the engine to perform.

`KVVirtualizer` coordinates; the pieces are modules of their own, each plain Python: `kv_types`
(ids, errors, pages, segments, swap plans, statistics, page tables), `kv_config` (pool shape, model
geometry, tokens per page), `kv_requests` (each request's segments and host slots, and the segment
views and page tables read from them), `kv_allocation` (free pages and owners per device, the
split-KV placement of new rows), `kv_swap` (host swap slots, the copies of a swap-out or swap-in)
and `kv_accounting` (statistics, invariant checks). The public names of `kv_types` and `kv_config`
are importable from here too.
"""

from __future__ import annotations

from crosspool_jax.memory.kv_accounting import check_books, device_stats, model_stats, pool_stats
from crosspool_jax.memory.kv_allocation import (
    DevicePages,
    Placement,
    allocate_rows,
    place_rows,
    release_rows,
)
from crosspool_jax.memory.kv_config import KVGeometry, KVPoolConfig, ModelKVLayout, resolve_layout
from crosspool_jax.memory.kv_requests import (
    RequestKV,
    RequestTable,
    build_page_table,
    device_pages_of,
    segment_views,
)
from crosspool_jax.memory.kv_swap import HostSlots, swap_in_copies, swap_out_copies
from crosspool_jax.memory.kv_types import (
    PAGE_SENTINEL,
    DeviceKVStats,
    EvictedKV,
    KVConfigError,
    KVHostSwapFull,
    KVOutOfPages,
    KVPoolError,
    KVRequestStateError,
    KVSegment,
    ModelId,
    ModelKVStats,
    ModelPageTable,
    PageCopy,
    PhysicalPage,
    PoolKVStats,
    RequestId,
    Residency,
    SwapDirection,
    SwapPlan,
)

__all__ = [
    "PAGE_SENTINEL",
    "DeviceKVStats",
    "EvictedKV",
    "KVConfigError",
    "KVGeometry",
    "KVHostSwapFull",
    "KVOutOfPages",
    "KVPoolConfig",
    "KVPoolError",
    "KVRequestStateError",
    "KVSegment",
    "KVVirtualizer",
    "ModelId",
    "ModelKVLayout",
    "ModelKVStats",
    "ModelPageTable",
    "PageCopy",
    "PhysicalPage",
    "PoolKVStats",
    "RequestId",
    "Residency",
    "SwapDirection",
    "SwapPlan",
]


# ---- the virtualizer ----------------------------------------------------------------------------


class KVVirtualizer:
    """Allocator of the shared KV pool: maps (model, request, layer) to physical pages.

    All operations are all-or-nothing: one that raises changes nothing.
    """

    def __init__(self, config: KVPoolConfig) -> None:
        self._config = config
        self._pages = DevicePages(config.num_devices, config.pages_per_device)
        self._host = HostSlots(config.host_swap_pages)
        self._layouts: dict[ModelId, ModelKVLayout] = {}
        self._requests = RequestTable()
        self._model_pages: dict[ModelId, int] = {}

    # -- models --

    @property
    def config(self) -> KVPoolConfig:
        return self._config

    def register_model(self, model: ModelId, geometry: KVGeometry) -> ModelKVLayout:
        """Make `model` known to the pool. Re-registering the same geometry is a no-op."""
        existing = self._layouts.get(model)
        if existing is not None:
            if existing.geometry != geometry:
                raise KVConfigError(f"model {model!r} is registered with {existing.geometry}, not {geometry}")
            return existing
        layout = resolve_layout(self._config, model, geometry)
        self._layouts[model] = layout
        self._model_pages[model] = 0
        return layout

    def unregister_model(self, model: ModelId) -> None:
        """Forget `model`; refused while it has requests."""
        self.layout(model)
        live = [r.request_id for r in self._requests.values() if r.layout.model == model]
        if live:
            raise KVRequestStateError(f"model {model!r} still has {len(live)} requests, e.g. {live[0]!r}")
        del self._layouts[model]
        del self._model_pages[model]

    def layout(self, model: ModelId) -> ModelKVLayout:
        """`model`'s layout; raises KVRequestStateError if it is not registered."""
        try:
            return self._layouts[model]
        except KeyError:
            raise KVRequestStateError(f"model {model!r} is not registered with the KV pool") from None

    @property
    def models(self) -> tuple[ModelId, ...]:
        return tuple(self._layouts)

    def max_tokens(self, model: ModelId) -> int:
        """Longest request of `model` the empty pool could hold (split over every device)."""
        layout = self.layout(model)
        rows = self._config.num_devices * (self._config.pages_per_device // layout.num_layers)
        return rows * layout.tokens_per_page

    # -- requests --

    def add_request(self, request_id: RequestId, model: ModelId) -> None:
        """Start tracking `request_id` of `model`, holding 0 tokens."""
        if request_id in self._requests:
            raise KVRequestStateError(f"request {request_id!r} is already in the KV pool")
        self._requests[request_id] = RequestKV(request_id, self.layout(model))

    def has_request(self, request_id: RequestId) -> bool:
        return request_id in self._requests

    def request_ids(self) -> tuple[RequestId, ...]:
        return tuple(self._requests)

    def model_of(self, request_id: RequestId) -> ModelId:
        return self._requests.record(request_id).layout.model

    def num_tokens(self, request_id: RequestId) -> int:
        """Tokens whose KV the request holds (on device or, if swapped, on host)."""
        return self._requests.record(request_id).num_tokens

    def residency(self, request_id: RequestId) -> Residency:
        return self._requests.record(request_id).residency

    def pages_to_grow(self, request_id: RequestId, new_len: int) -> int:
        """Device pages a `grow(request_id, new_len)` would allocate."""
        req = self._requests.resident(request_id)
        req.check_new_len(new_len)
        return max(0, req.layout.rows_for(new_len) - req.rows) * req.layout.num_layers

    def can_grow(self, request_id: RequestId, new_len: int, allow_split: bool = True) -> bool:
        """Whether `grow(request_id, new_len, allow_split)` fits the free pages now."""
        req = self._requests.resident(request_id)
        req.check_new_len(new_len)
        extra_rows = req.layout.rows_for(new_len) - req.rows
        if extra_rows <= 0:
            return True
        return self._place(req.layout, req.last_device, extra_rows, allow_split) is not None

    def can_fit(self, model: ModelId, num_tokens: int, allow_split: bool = True) -> bool:
        """Whether a new request of `model` with `num_tokens` tokens fits the free pages now."""
        layout = self.layout(model)
        rows = layout.rows_for(num_tokens)
        return rows == 0 or self._place(layout, None, rows, allow_split) is not None

    def grow(self, request_id: RequestId, new_len: int, allow_split: bool = True) -> tuple[PhysicalPage, ...]:
        """Hold `new_len` tokens of KV for the request; returns the newly allocated pages.

        Extends the request's last segment on its device while that device has room, then opens
        segments on other devices (most free pages first) if `allow_split`. Raises KVOutOfPages and
        changes nothing if the growth does not fit.
        """
        req = self._requests.resident(request_id)
        req.check_new_len(new_len)
        extra_rows = req.layout.rows_for(new_len) - req.rows
        new_pages: list[PhysicalPage] = []
        if extra_rows > 0:
            placement = self._place(req.layout, req.last_device, extra_rows, allow_split)
            if placement is None:
                need = extra_rows * req.layout.num_layers
                raise self._pages.out_of_pages(
                    f"request {request_id!r} of model {req.layout.model!r}: growing to {new_len} tokens "
                    f"needs {need} more pages ({extra_rows} rows of {req.layout.num_layers} layers) "
                    f"{'split over devices' if allow_split else 'on one device'}",
                    need,
                )
            new_pages = self._allocate_rows(req, placement)
        req.num_tokens = new_len
        return tuple(new_pages)

    def free(self, request_id: RequestId) -> int:
        """Release everything the request holds (device pages and host slots) and forget it.

        Returns the number of pages released (device + host).
        """
        req = self._requests.record(request_id)
        released = req.num_device_pages + req.num_host_pages
        self._release_device_pages(req)
        self._host.give_back(req.host_slots)
        del self._requests[request_id]
        return released

    def evict(self, request_id: RequestId) -> EvictedKV:
        """Drop a resident request's KV (to be recomputed later) and forget it; returns what was freed."""
        req = self._requests.resident(request_id)
        evicted = EvictedKV(
            request_id, req.layout.model, req.num_tokens, self._config.page_bytes, device_pages_of(req)
        )
        self._release_device_pages(req)
        del self._requests[request_id]
        return evicted

    # -- swap --

    @property
    def host_free_pages(self) -> int:
        """Free host swap slots (one page each)."""
        return len(self._host)

    def can_swap_out(self, request_id: RequestId) -> bool:
        """Whether the free host slots can take every device page of the resident request."""
        return self._requests.resident(request_id).num_device_pages <= len(self._host)

    def swap_out(self, request_id: RequestId) -> SwapPlan:
        """Move a resident request's pages to host slots (in the books); returns the copies to do.

        The device pages are free on return. Raises KVHostSwapFull and changes nothing if the host
        swap space is too small.
        """
        req = self._requests.resident(request_id)
        need = req.num_device_pages
        if need > len(self._host):
            raise KVHostSwapFull(
                f"request {request_id!r}: swap-out needs {need} host slots, {len(self._host)} free"
            )
        host_slots, copies = swap_out_copies(req, self._host.take(need))
        self._release_device_pages(req)
        req.host_slots = host_slots
        req.residency = Residency.SWAPPED
        page_bytes = self._config.page_bytes
        return SwapPlan(
            request_id, req.layout.model, SwapDirection.DEVICE_TO_HOST, req.num_tokens, page_bytes, copies
        )

    def can_swap_in(self, request_id: RequestId, allow_split: bool = True) -> bool:
        """Whether `swap_in(request_id, allow_split)` fits the free pages now."""
        req = self._requests.swapped(request_id)
        rows = req.layout.rows_for(req.num_tokens)
        return rows == 0 or self._place(req.layout, None, rows, allow_split) is not None

    def swap_in(self, request_id: RequestId, allow_split: bool = True) -> SwapPlan:
        """Bring a swapped request back onto device pages (placed like a new request); returns copies.

        The host slots are free on return. Raises KVOutOfPages and changes nothing if it does not fit.
        """
        req = self._requests.swapped(request_id)
        rows = req.layout.rows_for(req.num_tokens)
        placement = self._place(req.layout, None, rows, allow_split) if rows else []
        if placement is None:
            need = rows * req.layout.num_layers
            raise self._pages.out_of_pages(
                f"request {request_id!r}: swap-in of {req.num_tokens} tokens needs {need} pages", need
            )
        req.residency = Residency.RESIDENT
        self._allocate_rows(req, placement)
        copies = swap_in_copies(req)
        self._host.give_back(req.host_slots)
        req.host_slots = []
        page_bytes = self._config.page_bytes
        return SwapPlan(
            request_id, req.layout.model, SwapDirection.HOST_TO_DEVICE, req.num_tokens, page_bytes, copies
        )

    # -- maps and tables --

    def segments(self, request_id: RequestId) -> tuple[KVSegment, ...]:
        """The request's segments in token order (empty if it holds no pages or is swapped)."""
        return segment_views(self._requests.record(request_id))

    def layer_pages(self, request_id: RequestId, layer: int) -> tuple[PhysicalPage, ...]:
        """Physical pages of one layer of the request, in token order."""
        req = self._requests.resident(request_id)
        if not 0 <= layer < req.layout.num_layers:
            raise KVRequestStateError(f"layer {layer} out of range for model {req.layout.model!r}")
        return tuple(PhysicalPage(s.device, int(p)) for s in req.segments for p in s.layer_pages[layer])

    def device_pages_held(self, request_id: RequestId) -> int:
        """Device pages the request holds (0 when swapped)."""
        return self._requests.record(request_id).num_device_pages

    def request_pages(self, request_id: RequestId) -> tuple[PhysicalPage, ...]:
        """All device pages the request holds."""
        return device_pages_of(self._requests.record(request_id))

    def page_table(self, device: int, model: ModelId, max_pages: int | None = None) -> ModelPageTable:
        """Page table of `model`'s resident requests on `device` (one row per segment there).

        max_pages: width of the page axis (for a fixed kernel shape); default: the widest row.
        """
        self._check_device(device)
        return build_page_table(self._requests.values(), device, self.layout(model), max_pages)

    # -- statistics --

    @property
    def total_free_pages(self) -> int:
        """Free pages on all devices."""
        return self._pages.total_free

    def model_pages(self, model: ModelId) -> int:
        """Device pages `model`'s requests hold now."""
        self.layout(model)
        return self._model_pages[model]

    def pages_free(self, device: int) -> int:
        """Free pages on `device`: one length read, safe to call from another thread while the
        owner of the pool mutates it (device_stats iterates the requests and is not)."""
        self._check_device(device)
        return len(self._pages.free_stacks[device])

    def device_stats(self, device: int) -> DeviceKVStats:
        self._check_device(device)
        free = len(self._pages.free_stacks[device])
        return device_stats(self._config, device, free, self._requests.values())

    def model_stats(self, model: ModelId) -> ModelKVStats:
        self.layout(model)
        return model_stats(self._config, model, self._model_pages[model], self._requests.values())

    def pool_stats(self) -> PoolKVStats:
        return pool_stats(self._config, self.total_free_pages, len(self._host), self._requests.values())

    def check_invariants(self) -> None:
        """Recount everything from the request maps; raise KVPoolError on any inconsistency."""
        check_books(
            self._config, self._layouts, self._requests.values(), self._pages, self._host, self._model_pages
        )

    # -- internals --

    def _check_device(self, device: int) -> None:
        if not 0 <= device < self._config.num_devices:
            raise KVRequestStateError(f"device {device} out of range [0, {self._config.num_devices})")


    def _place(
        self, layout: ModelKVLayout, last_device: int | None, rows: int, allow_split: bool
    ) -> Placement | None:
        """Where `rows` new rows of `layout`'s model go now (`place_rows` on the free rows)."""
        return place_rows(self._pages.free_rows(layout.num_layers), last_device, rows, allow_split)

    def _allocate_rows(self, req: RequestKV, placement: Placement) -> list[PhysicalPage]:
        """`allocate_rows`, counting the new pages to the request's model."""
        new_pages = allocate_rows(self._pages, req, placement)
        self._model_pages[req.layout.model] += len(new_pages)
        return new_pages

    def _release_device_pages(self, req: RequestKV) -> None:
        """`release_rows`, taking the pages off the request's model's count."""
        self._model_pages[req.layout.model] -= req.num_device_pages
        release_rows(self._pages, req)
