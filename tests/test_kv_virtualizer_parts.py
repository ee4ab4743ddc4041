"""Unit tests of the KV virtualizer's parts on their own: a model's layout in the pool (`kv_config`),
the per-request page tables (`kv_requests`),
the device pages with the split-KV placement (`kv_allocation`), the host swap slots with the swap
copies (`kv_swap`) and the statistics and invariant checks (`kv_accounting`), each against
hand-computed results.

The virtualizer as a whole (and through it these parts) is tested in tests/test_kv_virtualizer.py.
"""

from __future__ import annotations

import pytest

from crosspool_jax.memory.kv_accounting import (
    check_books,
    check_request_consistent,
    device_stats,
    model_stats,
    pool_stats,
)
from crosspool_jax.memory.kv_allocation import DevicePages, allocate_rows, place_rows, release_rows
from crosspool_jax.memory.kv_config import KVGeometry, KVPoolConfig, ModelKVLayout, resolve_layout
from crosspool_jax.memory.kv_requests import (
    RequestKV,
    RequestTable,
    SegmentPages,
    build_page_table,
    device_pages_of,
    segment_views,
)
from crosspool_jax.memory.kv_swap import HostSlots, swap_in_copies, swap_out_copies
from crosspool_jax.memory.kv_types import (
    PAGE_SENTINEL,
    DeviceKVStats,
    KVConfigError,
    KVOutOfPages,
    KVPoolError,
    KVRequestStateError,
    ModelKVStats,
    PageCopy,
    PhysicalPage,
    PoolKVStats,
    Residency,
)

# 2 layers x 256 B/token/layer in 1024-byte pages: 4 tokens a page
LAYOUT = ModelKVLayout("m", KVGeometry(2, 256), 1024, 4)


def split_request(pages: DevicePages) -> RequestKV:
    """Request "r" of 10 tokens: rows 0-1 on device 1 (tokens [0, 8)), row 2 on device 0 ([8, 12))."""
    req = RequestKV("r", LAYOUT)
    allocate_rows(pages, req, [(1, 2), (0, 1)])
    req.num_tokens = 10
    return req


# ---- layouts ------------------------------------------------------------------------------------


def test_resolve_layout_checks_a_token_and_a_row_fit() -> None:
    config = KVPoolConfig(num_devices=1, pages_per_device=8, page_bytes=4096)
    # 4096 B / 256 B per token per layer = 16 tokens a page
    assert resolve_layout(config, "m", KVGeometry(2, 256)) == ModelKVLayout("m", KVGeometry(2, 256), 4096, 16)
    with pytest.raises(KVConfigError, match="'deep' has 9 layers but a device holds only 8 pages"):
        resolve_layout(config, "deep", KVGeometry(9, 256))
    with pytest.raises(KVConfigError, match="no token fits"):  # checked before the layers
        resolve_layout(config, "wide", KVGeometry(9, 5000))


# ---- placement ----------------------------------------------------------------------------------


def test_place_rows_without_split_takes_one_device() -> None:
    free_rows = [3, 5, 5]
    # a new request: the device with the most free rows, ties to the lowest index
    assert place_rows(free_rows, None, 4, allow_split=False) == [(1, 4)]
    assert place_rows(free_rows, None, 6, allow_split=False) is None  # 13 rows free, 5 on any device
    # a request holding pages stays on its device: no migration
    assert place_rows(free_rows, 0, 3, allow_split=False) == [(0, 3)]
    assert place_rows(free_rows, 0, 4, allow_split=False) is None


def test_place_rows_with_split_fills_the_fullest_devices_first() -> None:
    free_rows = [3, 5, 5]
    # order by free rows: device 1 (5), device 2 (5, higher index), device 0 (3)
    assert place_rows(free_rows, None, 12, allow_split=True) == [(1, 5), (2, 5), (0, 2)]
    assert place_rows(free_rows, None, 13, allow_split=True) == [(1, 5), (2, 5), (0, 3)]
    assert place_rows(free_rows, None, 14, allow_split=True) is None
    # the last segment's device is extended first, whatever its free rows
    assert place_rows(free_rows, 0, 7, allow_split=True) == [(0, 3), (1, 4)]
    # a full last device: the rows open a segment on the next device
    assert place_rows([0, 2, 1], 0, 2, allow_split=True) == [(1, 2)]
    assert place_rows([0, 2, 1], 0, 3, allow_split=True) == [(1, 2), (2, 1)]


# ---- device pages -------------------------------------------------------------------------------


def test_fresh_device_pages_hand_out_the_lowest_index_first() -> None:
    pages = DevicePages(2, 5)
    assert pages.free_counts() == [5, 5] and pages.total_free == 10
    assert pages.free_rows(2) == [2, 2]
    assert pages.free_stacks[0][-1] == 0  # the top of the stack
    assert pages.owners == [[None] * 5, [None] * 5]
    error = pages.out_of_pages("request 'r' needs 12 pages", 12)
    assert isinstance(error, KVOutOfPages)
    assert str(error) == "request 'r' needs 12 pages; free pages per device: [5, 5]"
    assert (error.pages_needed, error.pages_free) == (12, 10)


def test_allocate_rows_fills_rows_layer_by_layer_and_extends_the_last_segment() -> None:
    pages = DevicePages(2, 6)
    req = RequestKV("r", LAYOUT)
    # row i of layer l on a fresh device is page 2 * i + l
    new = allocate_rows(pages, req, [(1, 2)])
    assert new == [PhysicalPage(1, 0), PhysicalPage(1, 1), PhysicalPage(1, 2), PhysicalPage(1, 3)]
    assert [(s.device, s.token_start, s.rows) for s in req.segments] == [(1, 0, 2)]
    assert req.segments[0].layer_pages.tolist() == [[0, 2], [1, 3]]
    assert pages.free_counts() == [6, 2] and pages.owners[1][:4] == ["r"] * 4
    # device 1 again extends the segment; device 0 opens one at token 3 rows x 4 tokens = 12
    new = allocate_rows(pages, req, [(1, 1), (0, 1)])
    assert new == [PhysicalPage(1, 4), PhysicalPage(1, 5), PhysicalPage(0, 0), PhysicalPage(0, 1)]
    assert [(s.device, s.token_start, s.rows) for s in req.segments] == [(1, 0, 3), (0, 12, 1)]
    assert (req.rows, req.num_device_pages, req.last_device) == (4, 8, 0)


def test_release_rows_restores_the_free_stacks_in_order() -> None:
    pages = DevicePages(2, 6)
    req = RequestKV("r", LAYOUT)
    allocate_rows(pages, req, [(1, 2), (0, 1)])
    allocate_rows(pages, req, [(0, 1)])
    release_rows(pages, req)
    assert pages.free_stacks == DevicePages(2, 6).free_stacks
    assert pages.owners == [[None] * 6, [None] * 6]
    assert req.segments == [] and req.last_device is None


# ---- per-request page tables --------------------------------------------------------------------


def test_segment_pages_grow_by_doubling_behind_a_read_only_view() -> None:
    seg = SegmentPages(device=0, token_start=0, num_layers=2)
    for row in range(9):  # one past the initial capacity of 8
        seg.append_row([10 * row, 10 * row + 1])
    assert seg.rows == 9
    assert seg.layer_pages.tolist() == [[10 * r for r in range(9)], [10 * r + 1 for r in range(9)]]
    assert not seg.layer_pages.flags.writeable


def test_request_table_lookups_check_presence_and_residency() -> None:
    table = RequestTable()
    table["r"] = RequestKV("r", LAYOUT, 10)
    table["s"] = RequestKV("s", LAYOUT, 5, Residency.SWAPPED)
    assert table.record("s") is table["s"] and table.resident("r") is table["r"]
    assert table.swapped("s") is table["s"]
    with pytest.raises(KVRequestStateError, match="request 'x' is not in the KV pool"):
        table.record("x")
    with pytest.raises(KVRequestStateError, match="request 's' is swapped out; swap it in first"):
        table.resident("s")
    with pytest.raises(KVRequestStateError, match="request 'r' is not swapped out"):
        table.swapped("r")
    table["r"].check_new_len(10)  # growing to the same length is allowed
    with pytest.raises(KVRequestStateError, match="request 'r' holds 10 tokens; cannot grow to 9"):
        table["r"].check_new_len(9)


def test_segments_and_pages_of_a_split_request() -> None:
    pages = DevicePages(2, 6)
    req = split_request(pages)
    views = segment_views(req)
    assert [(s.device, s.token_start, s.token_end, s.pages_per_layer) for s in views] == [
        (1, 0, 8, 2),
        (0, 8, 10, 1),  # the last segment ends inside its page
    ]
    assert views[0].layer_pages.tolist() == [[0, 2], [1, 3]]
    assert [req.segment_end(s) for s in req.segments] == [8, 10]
    # segment by segment, layer by layer, in token order
    assert device_pages_of(req) == (
        PhysicalPage(1, 0), PhysicalPage(1, 2), PhysicalPage(1, 1), PhysicalPage(1, 3),
        PhysicalPage(0, 0), PhysicalPage(0, 1),
    )
    swapped = RequestKV("s", LAYOUT, 5, Residency.SWAPPED, host_slots=[[3, 4], [5, 6]])
    assert segment_views(swapped) == () and device_pages_of(swapped) == ()
    assert (swapped.num_device_pages, swapped.num_host_pages) == (0, 4)


def test_build_page_table_one_row_per_segment_on_the_device() -> None:
    pages = DevicePages(2, 8)
    req = split_request(pages)
    other_model = RequestKV("o", ModelKVLayout("n", KVGeometry(2, 256), 1024, 4))
    allocate_rows(pages, other_model, [(1, 1)])
    swapped = RequestKV("s", LAYOUT, 5, Residency.SWAPPED, host_slots=[[0, 1], [2, 3]])
    requests = [req, other_model, swapped]

    table = build_page_table(requests, 1, LAYOUT, None)
    assert (table.device, table.model, table.tokens_per_page, table.request_ids) == (1, "m", 4, ("r",))
    assert table.segment_index.tolist() == [0] and table.token_start.tolist() == [0]
    assert table.num_tokens.tolist() == [8]
    assert table.page_indices.tolist() == [[[0, 2], [1, 3]]]

    table = build_page_table(requests, 0, LAYOUT, 3)
    assert table.segment_index.tolist() == [1] and table.token_start.tolist() == [8]
    assert table.num_tokens.tolist() == [2]
    pad = PAGE_SENTINEL
    assert table.page_indices.tolist() == [[[0, pad, pad], [1, pad, pad]]]

    with pytest.raises(KVRequestStateError, match="has 2 pages, more than max_pages=1"):
        build_page_table(requests, 1, LAYOUT, 1)
    empty = build_page_table([swapped], 0, LAYOUT, None)
    assert empty.request_ids == () and empty.page_indices.shape == (0, 2, 1)


# ---- swap ---------------------------------------------------------------------------------------


def test_host_slots_are_a_stack() -> None:
    host = HostSlots(4)
    assert host.take(3) == [0, 1, 2] and len(host) == 1
    assert host.take(0) == [] and host.free_slots == [3]
    host.give_back([[0, 2], [1]])  # layer by layer, each reversed: taken again in the same order
    assert host.free_slots == [3, 2, 0, 1]
    assert host.take(2) == [1, 0]


def test_swap_out_copies_go_layer_by_layer_in_token_order() -> None:
    req = split_request(DevicePages(2, 6))  # layer 0: (1, 0) (1, 2) (0, 0); layer 1: (1, 1) (1, 3) (0, 1)
    host_slots, copies = swap_out_copies(req, [10, 11, 12, 13, 14, 15])
    assert host_slots == [[10, 11, 12], [13, 14, 15]]
    assert copies == (
        PageCopy(layer=0, page_ordinal=0, device=1, device_page=0, host_slot=10),
        PageCopy(0, 1, 1, 2, 11),
        PageCopy(0, 2, 0, 0, 12),
        PageCopy(1, 0, 1, 1, 13),
        PageCopy(1, 1, 1, 3, 14),
        PageCopy(1, 2, 0, 1, 15),
    )
    assert [(s.device, s.rows) for s in req.segments] == [(1, 2), (0, 1)]  # nothing changed


def test_swap_in_copies_pair_each_slot_with_the_new_page_of_its_ordinal() -> None:
    req = RequestKV("r", LAYOUT, 10, host_slots=[[10, 11, 12], [13, 14, 15]])
    allocate_rows(DevicePages(1, 6), req, [(0, 3)])  # layer 0: pages 0 2 4; layer 1: 1 3 5
    assert swap_in_copies(req) == (
        PageCopy(0, 0, 0, 0, 10),
        PageCopy(0, 1, 0, 2, 11),
        PageCopy(0, 2, 0, 4, 12),
        PageCopy(1, 0, 0, 1, 13),
        PageCopy(1, 1, 0, 3, 14),
        PageCopy(1, 2, 0, 5, 15),
    )
    assert req.host_slots == [[10, 11, 12], [13, 14, 15]]  # nothing changed


# ---- statistics and invariants ------------------------------------------------------------------

CONFIG = KVPoolConfig(num_devices=2, pages_per_device=6, page_bytes=1024, host_swap_pages=4)


def books() -> tuple[DevicePages, HostSlots, RequestKV, RequestKV]:
    """The split request "r" (10 tokens, 6 pages) and "s" swapped out with 5 tokens to host slots 0-3."""
    pages, host = DevicePages(2, 6), HostSlots(4)
    req = split_request(pages)
    slots = host.take(4)
    swapped = RequestKV("s", LAYOUT, 5, Residency.SWAPPED, host_slots=[slots[:2], slots[2:]])
    return pages, host, req, swapped


def test_stats_count_pages_bytes_tokens_and_requests() -> None:
    _, _, req, swapped = books()
    # device 1: rows 0-1 (4 pages, tokens [0, 8)); device 0: row 2 (2 pages, tokens [8, 10))
    assert device_stats(CONFIG, 1, 2, [req, swapped]) == DeviceKVStats(1, 6, 4, 2, 4096, 2048, 8, 1)
    assert device_stats(CONFIG, 0, 4, [req, swapped]) == DeviceKVStats(0, 6, 2, 4, 2048, 4096, 2, 1)
    assert model_stats(CONFIG, "m", 6, [req, swapped]) == ModelKVStats("m", 6, 6144, (2, 4), 10, 1, 1, 4)
    assert model_stats(CONFIG, "n", 0, [req, swapped]) == ModelKVStats("n", 0, 0, (0, 0), 0, 0, 0, 0)
    assert pool_stats(CONFIG, 6, 0, [req, swapped]) == PoolKVStats(12, 6, 6, 6144, 6144, 4, 4, 1, 1)


def test_check_request_consistent() -> None:
    _, _, req, swapped = books()
    check_request_consistent(req)
    check_request_consistent(swapped)
    req.num_tokens = 13  # 4 rows needed, 3 held
    with pytest.raises(KVPoolError, match="3 rows for 13 tokens"):
        check_request_consistent(req)
    swapped.host_slots[1].pop()  # 3 slots for 2 rows x 2 layers
    with pytest.raises(KVPoolError, match="swapped state inconsistent"):
        check_request_consistent(swapped)


def test_check_books_finds_each_kind_of_disagreement() -> None:
    pages, host, req, swapped = books()
    check_books(CONFIG, ["m"], [req, swapped], pages, host, {"m": 6})
    with pytest.raises(KVPoolError, match=r"per-model page counts \{'m': 5\} != recount \{'m': 6\}"):
        check_books(CONFIG, ["m"], [req, swapped], pages, host, {"m": 5})
    pages.owners[1][2] = "x"
    with pytest.raises(KVPoolError, match=r"page PhysicalPage\(device=1, page=2\) of 'r' has owner 'x'"):
        check_books(CONFIG, ["m"], [req, swapped], pages, host, {"m": 6})
    pages.owners[1][2] = "r"
    pages.free_stacks[0].pop()  # page 2 of device 0 lost
    with pytest.raises(KVPoolError, match=r"device 0: 2 used \+ 3 free != 6"):
        check_books(CONFIG, ["m"], [req, swapped], pages, host, {"m": 6})
    pages.free_stacks[0].append(2)
    host.free_slots.append(3)  # slot 3 is swapped's
    with pytest.raises(KVPoolError, match="host slots mapped twice or both used and free"):
        check_books(CONFIG, ["m"], [req, swapped], pages, host, {"m": 6})
