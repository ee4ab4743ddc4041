"""Occupancy statistics and invariant checks of the KV pool, recounted from the books (plain Python).

The statistics (`device_stats`, `model_stats`, `pool_stats`) count pages, bytes (pages x
`page_bytes`), tokens and requests from the request records and the free counts they are given.
`check_books` recounts every page and host slot from the request records and raises `KVPoolError`
where the free stacks, the page owners or the per-model page counts disagree with them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from crosspool_jax.memory.kv_allocation import DevicePages
from crosspool_jax.memory.kv_config import KVPoolConfig
from crosspool_jax.memory.kv_requests import RequestKV, device_pages_of
from crosspool_jax.memory.kv_swap import HostSlots
from crosspool_jax.memory.kv_types import (
    DeviceKVStats,
    KVPoolError,
    ModelId,
    ModelKVStats,
    PhysicalPage,
    PoolKVStats,
    RequestId,
    Residency,
)

# ---- statistics ---------------------------------------------------------------------------------


def device_stats(
    config: KVPoolConfig, device: int, free: int, requests: Iterable[RequestKV]
) -> DeviceKVStats:
    """Occupancy of `device`, which has `free` free pages; tokens and requests from the segments there."""
    total = config.pages_per_device
    tokens = 0
    num_requests = 0
    for req in requests:
        on_device = [s for s in req.segments if s.device == device]
        if on_device:
            num_requests += 1
            tokens += sum(req.segment_end(s) - s.token_start for s in on_device)
    pb = config.page_bytes
    return DeviceKVStats(
        device, total, total - free, free, (total - free) * pb, free * pb, tokens, num_requests
    )


def model_stats(
    config: KVPoolConfig, model: ModelId, used: int, requests: Iterable[RequestKV]
) -> ModelKVStats:
    """Occupancy of `model`, which holds `used` device pages; the rest is counted from `requests`."""
    per_device = [0] * config.num_devices
    tokens = resident = swapped = host = 0
    for req in requests:
        if req.layout.model != model:
            continue
        if req.residency == Residency.SWAPPED:
            swapped += 1
            host += req.num_host_pages
            continue
        resident += 1
        tokens += req.num_tokens
        for seg in req.segments:
            per_device[seg.device] += seg.rows * req.layout.num_layers
    return ModelKVStats(
        model, used, used * config.page_bytes, tuple(per_device), tokens, resident, swapped, host
    )


def pool_stats(
    config: KVPoolConfig, free: int, host_free: int, requests: Collection[RequestKV]
) -> PoolKVStats:
    """Occupancy of the pool with `free` free device pages and `host_free` free host slots."""
    swapped = sum(1 for r in requests if r.residency == Residency.SWAPPED)
    return PoolKVStats(
        pages_total=config.total_pages,
        pages_used=config.total_pages - free,
        pages_free=free,
        bytes_used=(config.total_pages - free) * config.page_bytes,
        bytes_free=free * config.page_bytes,
        host_pages_total=config.host_swap_pages,
        host_pages_used=config.host_swap_pages - host_free,
        num_requests=len(requests) - swapped,
        num_swapped=swapped,
    )


# ---- invariants ---------------------------------------------------------------------------------


def check_request_consistent(req: RequestKV) -> None:
    """Raise KVPoolError unless `req`'s segments and host slots fit its token count and residency.

    Segments must cover tokens from 0 in order, each with all layers and the same rows in each; a
    resident request holds exactly the rows its tokens need and no host slot; a swapped one holds no
    segment and one host slot per page its tokens need.
    """
    tpp = req.layout.tokens_per_page
    start = 0
    for seg in req.segments:
        if seg.token_start != start or len(seg.layer_pages) != req.layout.num_layers:
            raise KVPoolError(f"request {req.request_id!r}: segments not contiguous from 0")
        if seg.rows < 1 or any(len(p) != seg.rows for p in seg.layer_pages):
            raise KVPoolError(f"request {req.request_id!r}: a segment has uneven or empty layers")
        start += seg.rows * tpp
    rows = req.layout.rows_for(req.num_tokens)
    if req.residency == Residency.RESIDENT and (req.rows != rows or req.host_slots):
        raise KVPoolError(f"request {req.request_id!r}: {req.rows} rows for {req.num_tokens} tokens")
    if req.residency == Residency.SWAPPED and (
        req.segments or req.num_host_pages != rows * req.layout.num_layers
    ):
        raise KVPoolError(f"request {req.request_id!r}: swapped state inconsistent")


def check_books(
    config: KVPoolConfig,
    models: Iterable[ModelId],
    requests: Collection[RequestKV],
    pages: DevicePages,
    host: HostSlots,
    model_pages: Mapping[ModelId, int],
) -> None:
    """Recount everything from the request records; raise KVPoolError on any inconsistency.

    models: the registered models; model_pages: the device pages each holds by the books.
    """
    seen: dict[PhysicalPage, RequestId] = {}
    recount = dict.fromkeys(models, 0)
    for req in requests:
        check_request_consistent(req)
        for page in device_pages_of(req):
            if page in seen:
                raise KVPoolError(f"page {page} mapped by {seen[page]!r} and {req.request_id!r}")
            owner = pages.owners[page.device][page.page]
            if owner != req.request_id:
                raise KVPoolError(f"page {page} of {req.request_id!r} has owner {owner!r}")
            seen[page] = req.request_id
        recount[req.layout.model] += req.num_device_pages
    for device in range(config.num_devices):
        free = pages.free_stacks[device]
        if len(set(free)) != len(free) or any(pages.owners[device][p] is not None for p in free):
            raise KVPoolError(f"device {device}: free list has duplicates or owned pages")
        used = sum(1 for p in seen if p.device == device)
        if used + len(free) != config.pages_per_device:
            raise KVPoolError(f"device {device}: {used} used + {len(free)} free != {config.pages_per_device}")
    if recount != model_pages:
        raise KVPoolError(f"per-model page counts {model_pages} != recount {recount}")
    host_used = [s for r in requests for slots in r.host_slots for s in slots]
    if len(set(host_used)) != len(host_used) or set(host_used) & set(host.free_slots):
        raise KVPoolError("host slots mapped twice or both used and free")
    if len(host_used) + len(host) != config.host_swap_pages:
        raise KVPoolError(f"host slots: {len(host_used)} used + {len(host)} free != {config.host_swap_pages}")
