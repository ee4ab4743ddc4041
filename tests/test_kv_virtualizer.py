"""Tests of the KV pool virtualizer: hand-checked layouts and a hypothesis state machine."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from crosspool_jax.memory.kv_virtualizer import (
    PAGE_SENTINEL,
    KVConfigError,
    KVGeometry,
    KVHostSwapFull,
    KVOutOfPages,
    KVPoolConfig,
    KVRequestStateError,
    KVVirtualizer,
    PhysicalPage,
    Residency,
    SwapDirection,
)

# page_bytes 4096 and three models of different KV geometry:
#   A: 2 layers x 256 B/token/layer -> 16 tokens/page
#   B: 4 layers x 512 B/token/layer ->  8 tokens/page
#   C: 3 layers x 1000 B/token/layer -> 4 tokens/page (96 B of each page unused)
GEOMETRIES = {"A": KVGeometry(2, 256), "B": KVGeometry(4, 512), "C": KVGeometry(3, 1000)}


def make_pool(num_devices: int = 2, pages_per_device: int = 32, host_swap_pages: int = 16) -> KVVirtualizer:
    kv = KVVirtualizer(KVPoolConfig(num_devices, pages_per_device, 4096, host_swap_pages))
    for model, geometry in GEOMETRIES.items():
        kv.register_model(model, geometry)
    return kv


# ---- geometry -----------------------------------------------------------------------------------


def test_tokens_per_page_and_page_counts() -> None:
    kv = make_pool()
    assert [kv.layout(m).tokens_per_page for m in "ABC"] == [16, 8, 4]
    assert kv.layout("C").used_bytes_per_page == 4000
    # 40 tokens: A ceil(40/16)=3 rows x 2 layers; B 5 x 4; C 10 x 3
    assert [kv.layout(m).pages_for(40) for m in "ABC"] == [6, 20, 30]
    assert kv.layout("A").pages_for(0) == 0
    # the whole empty pool: A 2 devices x 16 rows x 16 tokens; C 2 x 10 rows (30 of 32 pages) x 4
    assert kv.max_tokens("A") == 512
    assert kv.max_tokens("C") == 80


def test_token_align_rounds_down_and_too_wide_kv_is_refused() -> None:
    assert KVGeometry(3, 1000, token_align=3).tokens_per_page(4096) == 3
    assert KVGeometry(1, 100, token_align=16).tokens_per_page(4096) == 32  # 40 -> 32
    # fewer than token_align fit: keep what fits (the kernels' page_layout rule)
    assert KVGeometry(1, 1000, token_align=8).tokens_per_page(4096) == 4
    with pytest.raises(KVConfigError, match="no token fits"):
        KVGeometry(1, 5000).tokens_per_page(4096)


def test_tokens_per_page_override_is_used_when_it_fits() -> None:
    assert KVGeometry(2, 256, tokens_per_page_override=8).tokens_per_page(4096) == 8
    with pytest.raises(KVConfigError, match="do not fit"):
        KVGeometry(2, 256, tokens_per_page_override=17).tokens_per_page(4096)
    kv = KVVirtualizer(KVPoolConfig(1, 8, 4096))
    assert kv.register_model("m", KVGeometry(2, 256, tokens_per_page_override=8)).tokens_per_page == 8


def test_geometry_from_model_config_shape() -> None:
    class FakeConfig:  # the two attributes ModelConfig provides
        num_layers = 24
        kv_width = 2 * 8 * 128  # GQA: 8 kv heads x head_dim 128, K and V

    geometry = KVGeometry.from_model_config(FakeConfig(), dtype_bytes=2)
    assert geometry == KVGeometry(24, 4096)
    assert geometry.tokens_per_page(65536) == 16


def test_config_errors_are_clear() -> None:
    with pytest.raises(KVConfigError, match="page_bytes"):
        KVPoolConfig(1, 8, 0)
    kv = KVVirtualizer(KVPoolConfig(1, 8, 4096))
    with pytest.raises(KVConfigError, match="not one row"):
        kv.register_model("deep", KVGeometry(9, 16))
    kv.register_model("m", KVGeometry(2, 16))
    kv.register_model("m", KVGeometry(2, 16))  # same geometry: no-op
    with pytest.raises(KVConfigError, match="registered with"):
        kv.register_model("m", KVGeometry(3, 16))
    with pytest.raises(KVRequestStateError, match="not registered"):
        kv.add_request("r", "unknown")


# ---- allocation, hand-checked ---------------------------------------------------------------------


def test_three_models_exact_pages_and_stats() -> None:
    kv = make_pool()
    kv.add_request("a1", "A")
    assert kv.grow("a1", 40) == tuple(PhysicalPage(0, p) for p in range(6))
    # rows are allocated layer by layer: row i of layer l is page 2*i + l
    assert kv.layer_pages("a1", 0) == tuple(PhysicalPage(0, p) for p in (0, 2, 4))
    assert kv.layer_pages("a1", 1) == tuple(PhysicalPage(0, p) for p in (1, 3, 5))

    kv.add_request("b1", "B")  # device 1 has more free pages (32 > 26): it goes there
    assert len(kv.grow("b1", 20)) == 12
    assert {p.device for p in kv.request_pages("b1")} == {1}
    kv.add_request("c1", "C")  # device 0: 26 free > 20 free
    kv.grow("c1", 10)
    assert kv.layer_pages("c1", 2) == tuple(PhysicalPage(0, p) for p in (8, 11, 14))

    s0, s1 = kv.device_stats(0), kv.device_stats(1)
    assert (s0.pages_used, s0.pages_free, s0.tokens_held, s0.num_requests) == (15, 17, 50, 2)
    assert (s0.bytes_used, s0.bytes_free) == (15 * 4096, 17 * 4096)
    assert (s1.pages_used, s1.pages_free, s1.tokens_held, s1.num_requests) == (12, 20, 20, 1)
    stats_c = kv.model_stats("C")
    assert (stats_c.pages_used, stats_c.pages_used_per_device, stats_c.tokens_held) == (9, (9, 0), 10)
    pool = kv.pool_stats()
    assert (pool.pages_used, pool.pages_free, pool.num_requests) == (27, 37, 3)

    # growth inside the last page allocates nothing; one token more opens a row on the same device
    assert kv.grow("a1", 48) == ()
    assert kv.pages_to_grow("a1", 49) == 2
    assert kv.grow("a1", 49) == (PhysicalPage(0, 15), PhysicalPage(0, 16))
    assert kv.num_tokens("a1") == 49

    assert kv.free("b1") == 12
    assert kv.device_stats(1).pages_used == 0
    assert kv.model_stats("B").pages_used == 0
    kv.check_invariants()


def test_request_spans_devices_when_one_device_is_too_small() -> None:
    kv = make_pool()
    kv.add_request("a1", "A")
    kv.grow("a1", 40)  # dev0: 6 pages
    kv.add_request("c1", "C")
    kv.grow("c1", 10)  # dev1 (32 free > 26): 9 pages
    # B needs 4-page rows: dev0 has 26 free -> 6 rows, dev1 has 23 free -> 5 rows
    kv.add_request("b2", "B")
    kv.grow("b2", 60)  # 8 rows: 6 on the most free device (dev0), 2 on dev1
    segs = kv.segments("b2")
    assert [(s.device, s.token_start, s.token_end, s.pages_per_layer) for s in segs] == [
        (0, 0, 48, 6),
        (1, 48, 60, 2),
    ]
    # the last segment grows on its own device while it has room
    kv.grow("b2", 64)
    assert kv.segments("b2")[-1].token_end == 64
    kv.grow("b2", 65)
    assert [(s.device, s.token_start, s.token_end) for s in kv.segments("b2")] == [(0, 0, 48), (1, 48, 65)]
    assert kv.device_stats(1).tokens_held == 10 + 17
    kv.check_invariants()


def test_no_split_means_one_device_or_out_of_pages() -> None:
    kv = make_pool(pages_per_device=8, host_swap_pages=0)
    kv.add_request("r", "A")
    with pytest.raises(KVOutOfPages, match="on one device") as err:
        kv.grow("r", 80, allow_split=False)  # 5 rows of 2 pages; a device has 4 rows
    assert err.value.pages_needed == 10
    assert kv.can_grow("r", 80) and not kv.can_grow("r", 80, allow_split=False)
    kv.grow("r", 64, allow_split=False)
    assert kv.segments("r")[0].device == 0
    assert not kv.can_grow("r", 65, allow_split=False)  # device 0 is full; no migration
    assert kv.can_grow("r", 65)


def test_failed_grow_changes_nothing() -> None:
    kv = make_pool(num_devices=2, pages_per_device=8)
    kv.add_request("x", "B")
    kv.grow("x", 8)  # one row of 4 pages on dev0
    kv.add_request("y", "B")
    before = (kv.request_pages("x"), kv.pool_stats(), kv.num_tokens("y"))
    with pytest.raises(KVOutOfPages):
        kv.grow("y", 8 * 4)  # 4 rows; free rows: dev0 1 + dev1 2 = 3
    assert (kv.request_pages("x"), kv.pool_stats(), kv.num_tokens("y")) == before
    assert kv.request_pages("y") == ()
    with pytest.raises(KVRequestStateError, match="cannot grow"):
        kv.grow("x", 7)


def test_page_table_export_pads_with_sentinel() -> None:
    kv = make_pool()
    kv.add_request("b1", "B")
    kv.grow("b1", 20)  # dev0, 3 rows
    kv.add_request("b2", "B")
    kv.grow("b2", 9)  # dev1, 2 rows
    kv.add_request("b3", "B")
    kv.grow("b3", 3)  # dev1: 24 free > dev0's 20; 1 row
    table = kv.page_table(1, "B")
    assert table.request_ids == ("b2", "b3")
    assert table.page_indices.dtype == np.int32 and table.page_indices.shape == (2, 4, 2)
    assert table.num_tokens.tolist() == [9, 3] and table.token_start.tolist() == [0, 0]
    assert table.page_indices[1, :, 1].tolist() == [PAGE_SENTINEL] * 4
    for (rid, _seg, layer), pages in table.as_lists().items():
        assert [PhysicalPage(1, p) for p in pages] == list(kv.layer_pages(rid, layer))
    wide = kv.page_table(1, "B", max_pages=5)
    assert wide.page_indices.shape == (2, 4, 5)
    with pytest.raises(KVRequestStateError, match="max_pages"):
        kv.page_table(0, "B", max_pages=2)
    assert kv.page_table(0, "A").page_indices.shape[0] == 0


def test_evict_returns_what_was_freed() -> None:
    kv = make_pool()
    kv.add_request("c", "C")
    kv.grow("c", 9)  # 3 rows x 3 layers
    pages = kv.request_pages("c")
    evicted = kv.evict("c")
    assert (evicted.num_tokens, evicted.pages, evicted.num_bytes) == (9, pages, 9 * 4096)
    assert not kv.has_request("c")
    assert kv.pool_stats().pages_used == 0


def test_swap_out_and_in_round_trip() -> None:
    kv = make_pool(host_swap_pages=10)
    kv.add_request("c", "C")
    kv.grow("c", 10)  # 9 pages on dev0
    out = kv.swap_out("c")
    assert out.direction == SwapDirection.DEVICE_TO_HOST and out.num_pages == 9 and out.num_bytes == 9 * 4096
    assert kv.residency("c") == Residency.SWAPPED and kv.num_tokens("c") == 10
    assert kv.pool_stats().pages_used == 0 and kv.host_free_pages == 1
    assert kv.model_stats("C").host_pages_used == 9 and kv.model_stats("C").num_swapped == 1
    with pytest.raises(KVRequestStateError, match="swapped out"):
        kv.grow("c", 11)
    kv.add_request("d", "C")
    kv.grow("d", 4)
    with pytest.raises(KVHostSwapFull):
        kv.swap_out("d")  # 3 pages, 1 host slot free
    back = kv.swap_in("c")
    # every (layer, ordinal) goes back from the slot it went out to
    slots_out = {(c.layer, c.page_ordinal): c.host_slot for c in out.copies}
    assert {(c.layer, c.page_ordinal): c.host_slot for c in back.copies} == slots_out
    for c in back.copies:
        assert kv.layer_pages("c", c.layer)[c.page_ordinal] == PhysicalPage(c.device, c.device_page)
    assert kv.host_free_pages == 10 and kv.residency("c") == Residency.RESIDENT
    kv.check_invariants()


def test_free_of_swapped_request_releases_host_slots() -> None:
    kv = make_pool(host_swap_pages=8)
    kv.add_request("a", "A")
    kv.grow("a", 33)  # 3 rows x 2 layers
    kv.swap_out("a")
    assert kv.free("a") == 6
    assert kv.host_free_pages == 8
    kv.check_invariants()


def test_unregister_model_refused_while_in_use() -> None:
    kv = make_pool()
    kv.add_request("a", "A")
    with pytest.raises(KVRequestStateError, match="still has"):
        kv.unregister_model("A")
    kv.free("a")
    kv.unregister_model("A")
    assert kv.models == ("B", "C")


# ---- property test: a random sequence of operations on a random pool ------------------------------


class VirtualizerMachine(RuleBasedStateMachine):
    """Drives the virtualizer at random and simulates page contents to check every mapping.

    Each device page holds a label (request, layer, page ordinal) written when its tokens are
    computed; swaps copy labels between device and host through the returned copy lists. A page
    mapped twice, a wrong swap mapping or a page reused while live would show as a wrong label.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kv: KVVirtualizer
        self.expected_tokens: dict[str, int] = {}
        self.swapped: set[str] = set()
        self.device_mem: dict[PhysicalPage, tuple[str, int, int]] = {}
        self.host_mem: dict[int, tuple[str, int, int]] = {}
        self.next_id = 0

    @initialize(
        num_devices=st.integers(1, 4),
        pages_per_device=st.integers(4, 40),
        page_bytes=st.sampled_from([256, 1000, 4096]),
        host_swap_pages=st.integers(0, 96),
        geometries=st.lists(
            st.tuples(st.integers(1, 4), st.sampled_from([16, 48, 64, 100, 128]), st.sampled_from([1, 2, 8])),
            min_size=1,
            max_size=3,
        ),
    )
    def setup(self, num_devices, pages_per_device, page_bytes, host_swap_pages, geometries) -> None:
        self.kv = KVVirtualizer(KVPoolConfig(num_devices, pages_per_device, page_bytes, host_swap_pages))
        for i, (layers, width, align) in enumerate(geometries):
            geometry = KVGeometry(layers, width, align)
            if geometry.bytes_per_token_per_layer <= page_bytes and layers <= pages_per_device:
                self.kv.register_model(f"m{i}", geometry)
        if not self.kv.models:
            self.kv.register_model("fallback", KVGeometry(1, 16))

    def live(self) -> list[str]:
        return sorted(self.expected_tokens)

    def resident(self) -> list[str]:
        return [r for r in self.live() if r not in self.swapped]

    @rule(data=st.data(), allow_split=st.booleans())
    def add(self, data, allow_split) -> None:
        model = data.draw(st.sampled_from(self.kv.models))
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.kv.add_request(rid, model)
        self.expected_tokens[rid] = 0
        self.grow_by(rid, data.draw(st.integers(0, 4 * self.kv.layout(model).tokens_per_page)), allow_split)

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), allow_split=st.booleans())
    def grow(self, data, allow_split) -> None:
        rid = data.draw(st.sampled_from(self.resident()))
        tokens_per_page = self.kv.layout(self.kv.model_of(rid)).tokens_per_page
        self.grow_by(rid, data.draw(st.integers(0, 3 * tokens_per_page)), allow_split)

    def grow_by(self, rid: str, extra: int, allow_split: bool) -> None:
        new_len = self.expected_tokens[rid] + extra
        before = self.kv.request_pages(rid)
        could = self.kv.can_grow(rid, new_len, allow_split)
        try:
            new_pages = self.kv.grow(rid, new_len, allow_split)
        except KVOutOfPages:
            assert not could
            assert self.kv.request_pages(rid) == before  # all-or-nothing
            return
        assert could
        assert set(new_pages).isdisjoint(before)
        assert all(p not in self.device_mem for p in new_pages), "a page handed out while still holding data"
        self.write_labels(rid, self.expected_tokens[rid], new_len)
        self.expected_tokens[rid] = new_len

    def write_labels(self, rid: str, start: int, end: int) -> None:
        """Compute KV for tokens [start, end): label the pages that hold them."""
        layout = self.kv.layout(self.kv.model_of(rid))
        tpp = layout.tokens_per_page
        for layer in range(layout.num_layers):
            pages = self.kv.layer_pages(rid, layer)
            for ordinal in range(start // tpp, -(-end // tpp)):
                self.device_mem[pages[ordinal]] = (rid, layer, ordinal)

    def drop_labels(self, pages) -> None:
        for page in pages:
            del self.device_mem[page]

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def free(self, data) -> None:
        rid = data.draw(st.sampled_from(self.live()))
        pages = self.kv.request_pages(rid)
        host = [slot for slot, label in self.host_mem.items() if label[0] == rid]
        assert self.kv.free(rid) == len(pages) + len(host)
        self.drop_labels(pages)
        for slot in host:
            del self.host_mem[slot]
        del self.expected_tokens[rid]
        self.swapped.discard(rid)

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def evict(self, data) -> None:
        rid = data.draw(st.sampled_from(self.resident()))
        pages = self.kv.request_pages(rid)
        evicted = self.kv.evict(rid)
        assert evicted.pages == pages and evicted.num_tokens == self.expected_tokens[rid]
        self.drop_labels(pages)
        del self.expected_tokens[rid]

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def swap_out(self, data) -> None:
        rid = data.draw(st.sampled_from(self.resident()))
        pages = self.kv.request_pages(rid)
        if len(pages) > self.kv.host_free_pages:
            with pytest.raises(KVHostSwapFull):
                self.kv.swap_out(rid)
            assert self.kv.request_pages(rid) == pages
            return
        plan = self.kv.swap_out(rid)
        assert sorted(PhysicalPage(c.device, c.device_page) for c in plan.copies) == sorted(pages)
        for c in plan.copies:
            assert c.host_slot not in self.host_mem
            self.host_mem[c.host_slot] = self.device_mem.get(PhysicalPage(c.device, c.device_page))
        self.drop_labels(pages)
        self.swapped.add(rid)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data(), allow_split=st.booleans())
    def swap_in(self, data, allow_split) -> None:
        rid = data.draw(st.sampled_from(sorted(self.swapped)))
        if not self.kv.can_swap_in(rid, allow_split):
            with pytest.raises(KVOutOfPages):
                self.kv.swap_in(rid, allow_split)
            return
        plan = self.kv.swap_in(rid, allow_split)
        for c in plan.copies:
            page = PhysicalPage(c.device, c.device_page)
            assert page not in self.device_mem
            self.device_mem[page] = self.host_mem.pop(c.host_slot)
        self.swapped.discard(rid)

    @invariant()
    def books_are_consistent(self) -> None:
        kv = self.kv
        kv.check_invariants()
        cfg = kv.config
        seen: set[PhysicalPage] = set()
        for rid in self.live():
            assert kv.num_tokens(rid) == self.expected_tokens[rid]
            pages = kv.request_pages(rid)
            assert seen.isdisjoint(pages), "a page mapped twice"
            seen.update(pages)
            layout = kv.layout(kv.model_of(rid))
            if rid in self.swapped:
                assert pages == () and kv.segments(rid) == ()
                continue
            assert len(pages) == layout.pages_for(self.expected_tokens[rid])
            self.check_segments(rid, layout.tokens_per_page, layout.num_layers)
            for layer in range(layout.num_layers):
                for ordinal, page in enumerate(kv.layer_pages(rid, layer)):
                    assert self.device_mem.get(page) in (None, (rid, layer, ordinal))
                    if ordinal * layout.tokens_per_page < self.expected_tokens[rid]:
                        assert self.device_mem[page] == (rid, layer, ordinal), "KV content lost"
        for device in range(cfg.num_devices):
            stats = kv.device_stats(device)
            used = sum(1 for p in seen if p.device == device)
            assert stats.pages_used == used <= cfg.pages_per_device
            assert stats.pages_free == cfg.pages_per_device - used
        assert sum(kv.model_stats(m).pages_used for m in kv.models) == len(seen)
        assert kv.pool_stats().host_pages_used == len(self.host_mem) <= cfg.host_swap_pages

    def check_segments(self, rid: str, tokens_per_page: int, num_layers: int) -> None:
        """Segments cover [0, len) once, in order, each on its device with all its layers."""
        segments = self.kv.segments(rid)
        position = 0
        for i, seg in enumerate(segments):
            assert seg.token_start == position and seg.token_end > seg.token_start
            assert len(seg.layer_pages) == num_layers
            assert {len(p) for p in seg.layer_pages} == {-(-seg.num_tokens // tokens_per_page)}
            if i < len(segments) - 1:
                assert seg.num_tokens % tokens_per_page == 0  # only the last segment has a partial page
            position = seg.token_end
        assert position == self.expected_tokens[rid]
        # the page-table export says the same
        for seg_index, seg in enumerate(segments):
            table = self.kv.page_table(seg.device, self.kv.model_of(rid)).as_lists()
            for layer in range(num_layers):
                assert table[(rid, seg_index, layer)] == list(seg.layer_pages[layer])

    def teardown(self) -> None:
        if not hasattr(self, "kv"):
            return
        for rid in self.live():
            self.kv.free(rid)
        stats = self.kv.pool_stats()
        assert stats.pages_used == 0 and stats.host_pages_used == 0
        self.kv.check_invariants()


VirtualizerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestVirtualizerProperties = VirtualizerMachine.TestCase
