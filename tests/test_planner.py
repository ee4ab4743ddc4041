"""Tests of the KV planner: hand-checked scenarios and hypothesis-driven random workloads.

`SimEngine` plays the engine: it performs each plan's swaps, writes KV for the scheduled positions
into a simulated arena (one entry per token slot of each page: request, layer, position, token) and
samples deterministic tokens. Every check of the KV's content therefore goes through the page maps
the virtualizer exports, the copies the planner returns and the tokens the planner keeps.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from crosspool_jax.memory.admission import find_starving
from crosspool_jax.memory.kv_virtualizer import KVGeometry, KVPoolConfig, KVVirtualizer, PhysicalPage
from crosspool_jax.memory.planner import (
    BACKFILL_TRIES,
    KVPlanner,
    ModelLimits,
    Phase,
    PlannerConfig,
    PlannerError,
    PreemptionChoice,
    PreemptionMode,
    RequestRejected,
    RequestSpec,
    RequestStatus,
    StepInput,
    StepPlan,
)

# page_bytes 4096: A 2 layers x 16 tokens/page, B 4 layers x 8 tokens/page, C 3 layers x 4 tokens/page
GEOMETRIES = {"A": KVGeometry(2, 256), "B": KVGeometry(4, 512), "C": KVGeometry(3, 1000)}


def make_planner(
    num_devices: int = 1,
    pages_per_device: int = 8,
    host_swap_pages: int = 0,
    config: PlannerConfig | None = None,
    page_bytes: int = 4096,
    geometries: dict[str, KVGeometry] | None = None,
) -> KVPlanner:
    kv = KVVirtualizer(KVPoolConfig(num_devices, pages_per_device, page_bytes, host_swap_pages))
    for model, geometry in (geometries or GEOMETRIES).items():
        kv.register_model(model, geometry)
    return KVPlanner(kv, config)


def token(request_id: str, position: int) -> int:
    """The token a deterministic model samples for `position` of `request_id`."""
    return (sum(map(ord, request_id)) * 7919 + position * 31) % 32_000


def spec(rid: str, model: str, prompt_len: int, max_new: int, priority: int = 0) -> RequestSpec:
    prompt = tuple(token(rid + "/prompt", i) for i in range(prompt_len))
    return RequestSpec(rid, model, prompt, max_new, priority)


class SimEngine:
    """Executes step plans against a simulated KV arena and checks the KV of every running request."""

    def __init__(self, planner: KVPlanner) -> None:
        self.planner = planner
        self.kv = planner.virtualizer
        self.device_mem: dict[PhysicalPage, list[tuple | None]] = {}
        self.host_mem: dict[int, list[tuple | None]] = {}
        self.host_slots_of: dict[str, list[int]] = {}
        self.stopped: set[str] = set()

    def expected_token(self, rid: str, position: int) -> int:
        info = self.planner.info(rid)
        known = info.prompt + info.generated
        return known[position] if position < len(known) else token(rid, position)

    def execute(self, plan: StepPlan) -> None:
        assert not (plan.swap_outs and plan.swap_ins), "swap-outs and swap-ins in one step"
        run_ids = [s.request_id for s in plan.run]
        assert len(set(run_ids)) == len(run_ids)
        for p in plan.preempted:
            assert p.request_id not in run_ids
            if p.swap_out is not None:
                self.host_slots_of[p.request_id] = [c.host_slot for c in p.swap_out.copies]
                for c in p.swap_out.copies:
                    assert c.host_slot not in self.host_mem
                    self.host_mem[c.host_slot] = self.device_mem[PhysicalPage(c.device, c.device_page)]
            for page in p.pages_freed:
                self.device_mem.pop(page, None)
        for a in plan.admitted:
            assert a.request_id in run_ids, "an admitted request is not scheduled"
            if a.swap_in is not None:
                for c in a.swap_in.copies:
                    page = PhysicalPage(c.device, c.device_page)
                    assert page not in self.device_mem, "swap-in onto a page that holds live KV"
                    self.device_mem[page] = self.host_mem.pop(c.host_slot)
                del self.host_slots_of[a.request_id]
        for s in plan.run:
            self.compute(s.request_id, s.token_start, s.token_end)
        for s in plan.run:
            if s.samples_token:
                self.sample(s.request_id, s.phase, s.token_start, s.token_end)
        self.drop_finished()
        self.check_running_kv()

    def compute(self, rid: str, start: int, end: int) -> None:
        layout = self.kv.layout(self.kv.model_of(rid))
        tpp = layout.tokens_per_page
        for layer in range(layout.num_layers):
            pages = self.kv.layer_pages(rid, layer)
            for position in range(start, end):
                slots = self.device_mem.setdefault(pages[position // tpp], [None] * tpp)
                old = slots[position % tpp]
                assert old is None or old[0] == rid, f"page of {old[0]!r} overwritten by {rid!r}"
                slots[position % tpp] = (rid, layer, position, self.expected_token(rid, position))

    def sample(self, rid: str, phase: Phase, start: int, end: int) -> None:
        info = self.planner.info(rid)
        count = end - start if phase == Phase.DECODE else 1
        first = end - count + 1
        # the sampled positions follow the known tokens: nothing skipped, nothing repeated
        assert first == len(info.prompt) + len(info.generated)
        self.planner.append_tokens(rid, [token(rid, p) for p in range(first, first + count)])

    def check_running_kv(self) -> None:
        for rid in self.planner.running():
            info = self.planner.info(rid)
            layout = self.kv.layout(info.model)
            tpp = layout.tokens_per_page
            known = info.prompt + info.generated
            for layer in range(layout.num_layers):
                pages = self.kv.layer_pages(rid, layer)
                for position in range(info.kv_len):
                    got = self.device_mem[pages[position // tpp]][position % tpp]
                    assert got == (rid, layer, position, known[position]), f"{rid}: KV at {position} is {got}"

    def end(self, rid: str, how: str) -> None:
        """finish/cancel/fail a request and drop its simulated KV."""
        pages = self.kv.request_pages(rid) if self.kv.has_request(rid) else ()
        if how == "finish":
            self.planner.finish(rid, "stop token")
            self.stopped.add(rid)
        elif how == "cancel":
            self.planner.cancel(rid)
        else:
            self.planner.fail(rid, "engine error (simulated)")
        for page in pages:
            self.device_mem.pop(page, None)
        for slot in self.host_slots_of.pop(rid, []):
            del self.host_mem[slot]

    def step(self, step_input: StepInput | None = None) -> StepPlan:
        plan = self.planner.step(step_input)
        self.execute(plan)
        return plan

    def drop_finished(self) -> None:
        """Requests the planner finished itself (max_new_tokens) free their pages: forget their KV."""
        live_pages = {p for rid in self.kv.request_ids() for p in self.kv.request_pages(rid)}
        for page in list(self.device_mem):
            if page not in live_pages:
                del self.device_mem[page]


def run_until_idle(engine: SimEngine, max_steps: int = 500) -> int:
    for steps in range(max_steps):
        if not engine.planner.has_live_requests:
            return steps
        engine.step()
    raise AssertionError(f"not idle after {max_steps} steps: {engine.planner.running()} running")


# ---- admission ----------------------------------------------------------------------------------


def test_admission_by_aggregate_demand_exact_pages() -> None:
    planner = make_planner(num_devices=2, pages_per_device=16)
    engine = SimEngine(planner)
    planner.submit(spec("a1", "A", 100, 8))  # 7 rows x 2 layers = 14 pages
    planner.submit(spec("b1", "B", 30, 4))  # 4 rows x 4 layers = 16 pages
    planner.submit(spec("c1", "C", 10, 2))  # 3 rows x 3 layers = 9 pages
    plan = engine.step()
    assert [a.request_id for a in plan.admitted] == ["a1", "b1"]
    assert [(s.request_id, s.phase, s.token_start, s.token_end, s.samples_token) for s in plan.run] == [
        ("a1", Phase.PREFILL, 0, 100, True),
        ("b1", Phase.PREFILL, 0, 30, True),
    ]
    kv = planner.virtualizer
    assert [kv.device_stats(d).pages_used for d in (0, 1)] == [14, 16]
    assert planner.waiting() == ("c1",)  # 9 pages needed, 2 free
    engine.end("b1", "finish")
    plan = engine.step()
    assert [(s.request_id, s.phase, s.token_start, s.token_end) for s in plan.run] == [
        ("a1", Phase.DECODE, 100, 101),
        ("c1", Phase.PREFILL, 0, 10),
    ]
    assert kv.model_stats("C").pages_used_per_device == (0, 9)
    planner.check_invariants()


def test_admission_headroom_counts_decode_tokens_and_promised_pages() -> None:
    for headroom, admitted in [(0, ["r1", "r2"]), (8, ["r1"])]:
        planner = make_planner(pages_per_device=8, config=PlannerConfig(admission_headroom_tokens=headroom))
        planner.submit(spec("r1", "A", 16, 20))  # 1 row; with 8 tokens headroom 24 tokens: 2 rows
        planner.submit(spec("r2", "A", 40, 20))  # 3 rows; with headroom 48 tokens: still 3 rows
        plan = planner.step()
        # headroom 8: 8 pages - 2 held - 2 promised to r1 = 4 < 6 for r2
        assert [a.request_id for a in plan.admitted] == admitted


def test_chunked_prefill_with_token_budget() -> None:
    planner = make_planner(pages_per_device=32)
    engine = SimEngine(planner)
    planner.submit(spec("r1", "A", 100, 4))
    planner.submit(spec("r2", "A", 30, 4))
    budget = StepInput(prefill_token_budget=64)
    plan = engine.step(budget)
    assert [(s.request_id, s.token_start, s.token_end, s.samples_token) for s in plan.run] == [
        ("r1", 0, 64, False)
    ]
    assert planner.virtualizer.device_pages_held("r1") == 8  # 64 tokens = 4 rows
    plan = engine.step(budget)
    assert [(s.request_id, s.token_start, s.token_end, s.samples_token) for s in plan.run] == [
        ("r1", 64, 100, True),
        ("r2", 0, 28, False),
    ]
    plan = engine.step(budget)
    assert [(s.request_id, s.phase, s.token_start, s.token_end, s.samples_token) for s in plan.run] == [
        ("r1", Phase.DECODE, 100, 101, True),
        ("r2", Phase.PREFILL, 28, 30, True),
    ]
    assert run_until_idle(engine) > 0
    assert planner.info("r2").generated == tuple(token("r2", 30 + i) for i in range(4))


def test_fairness_round_robin_across_models() -> None:
    # 7 pages: FCFS would admit A1, A2, A3 and starve the cold model C behind the hot model A
    planner = make_planner(pages_per_device=7)
    for i in range(1, 5):
        planner.submit(spec(f"A{i}", "A", 16, 2))  # 2 pages each
    planner.submit(spec("C1", "C", 4, 2))  # 3 pages
    plan = planner.step()
    assert [a.request_id for a in plan.admitted] == ["A1", "C1", "A2"]
    assert planner.waiting() == ("A3", "A4")


def test_backfill_starts_a_later_request_of_a_blocked_model() -> None:
    for backfill, admitted in [(True, ["a3"]), (False, [])]:
        planner = make_planner(pages_per_device=8, config=PlannerConfig(admission_backfill=backfill))
        engine = SimEngine(planner)
        planner.submit(spec("a1", "A", 40, 4))  # 3 rows x 2 layers = 6 pages, also at 44 tokens
        engine.step()
        planner.submit(spec("a2", "A", 40, 4))  # 6 pages: 2 free
        planner.submit(spec("a3", "A", 10, 4))  # 2 pages
        plan = engine.step()
        assert [a.request_id for a in plan.admitted] == admitted
        assert planner.waiting() == (("a2",) if backfill else ("a2", "a3"))
        planner.check_invariants()
    # a fitting request behind more than BACKFILL_TRIES unfit ones is not looked at
    planner = make_planner(pages_per_device=8)
    engine = SimEngine(planner)
    planner.submit(spec("a1", "A", 40, 4))
    engine.step()
    for i in range(BACKFILL_TRIES + 1):
        planner.submit(spec(f"big{i}", "A", 40, 4))
    planner.submit(spec("small", "A", 10, 4))
    assert not engine.step().admitted


def test_a_starving_request_holds_its_pages_until_it_starts() -> None:
    """b2 (8 pages) does not fit while a1 runs; a later, smaller request of another model fits in
    the meantime and starts, until b2 has not fit for 2 rounds: then the 4 pages left are held
    for b2 and the next small request waits behind it, however often it would fit."""
    planner = make_planner(pages_per_device=12, config=PlannerConfig(starving_after_steps=2))
    engine = SimEngine(planner)
    planner.submit(spec("a1", "A", 64, 30))  # 4 rows x 2 layers = 8 pages
    engine.step()
    planner.submit(spec("b2", "B", 16, 2))  # 2 rows x 4 layers = 8 pages: 4 free
    planner.submit(spec("a2", "A", 16, 1))  # 2 pages
    plan = engine.step()  # round 1 for b2
    assert [a.request_id for a in plan.admitted] == ["a2"]
    engine.step()  # round 2: b2 is starving from the next round on; a2 has finished
    planner.submit(spec("a3", "A", 16, 1))  # 2 pages: fits the 4 free, but they are b2's
    for _ in range(3):
        plan = engine.step()
        assert not plan.admitted and planner.waiting() == ("a3", "b2")
    plan = engine.step(StepInput(held_models=frozenset({"B"})))  # b2 may not start this step:
    assert [a.request_id for a in plan.admitted] == ["a3"]  # nothing is held back for it
    engine.end("a1", "finish")
    plan = engine.step()
    assert plan.admitted[0].request_id == "b2"
    planner.check_invariants()


def test_starving_counts_only_the_pool() -> None:
    """A request held back by its model's cap or by the prefill budget is not starving: no pages
    are held back for it."""
    config = PlannerConfig(model_limits={"A": ModelLimits(cap_pages=4)}, starving_after_steps=1)
    planner = make_planner(pages_per_device=8, config=config)
    engine = SimEngine(planner)
    planner.submit(spec("a1", "A", 24, 8))  # 2 rows x 2 layers = 4 pages: A at its cap
    engine.step()
    planner.submit(spec("a2", "A", 16, 2))  # held by the cap
    engine.step()
    engine.step()
    planner.submit(spec("b1", "B", 8, 2))  # 1 row x 4 layers = 4 pages: the 4 free
    plan = engine.step()
    assert [a.request_id for a in plan.admitted] == ["b1"]  # nothing held back for a2
    planner.submit(spec("b2", "B", 8, 2))
    for _ in range(3):
        engine.step(StepInput(prefill_token_budget=0))  # the budget, not the pool
    after = planner.config.starving_after_steps
    assert find_starving(planner._book, after, frozenset(), frozenset()) is None
    planner.check_invariants()


# ---- rejection ----------------------------------------------------------------------------------


def test_requests_that_can_never_fit_are_rejected_at_submission() -> None:
    planner = make_planner(
        pages_per_device=8, config=PlannerConfig(model_limits={"B": ModelLimits(cap_pages=4)})
    )
    planner.submit(spec("ok", "A", 60, 5))  # 64 tokens of KV: the whole device (4 rows of 16)
    with pytest.raises(RequestRejected, match="whole pool holds 64") as err:
        planner.submit(spec("long", "A", 60, 6))
    assert err.value.request_id == "long"
    info = planner.info("long")
    assert info.status == RequestStatus.REJECTED and "64" in info.message
    with pytest.raises(RequestRejected, match="capped at 4 pages"):
        planner.submit(spec("capped", "B", 8, 2))  # 9 tokens: 2 rows x 4 layers = 8 pages
    with pytest.raises(RequestRejected, match="not registered"):
        planner.submit(spec("unknown", "Z", 4, 2))
    with pytest.raises(RequestRejected, match="max_new_tokens"):
        planner.submit(spec("zero", "A", 4, 0))
    with pytest.raises(PlannerError, match="already submitted"):
        planner.submit(spec("ok", "A", 4, 1))
    assert planner.waiting() == ("ok",)


def test_without_split_kv_one_device_bounds_a_request() -> None:
    planner = make_planner(num_devices=2, pages_per_device=8, config=PlannerConfig(allow_split_kv=False))
    with pytest.raises(RequestRejected, match="split-KV is off"):
        planner.submit(spec("r", "A", 60, 10))  # 69 tokens > 64 per device


def test_split_kv_lets_one_request_use_the_whole_pool() -> None:
    planner = make_planner(num_devices=2, pages_per_device=8)
    engine = SimEngine(planner)
    planner.submit(spec("r", "A", 100, 29))  # up to 128 tokens = both devices
    engine.step()
    segs = planner.virtualizer.segments("r")
    assert [(s.device, s.token_start, s.token_end) for s in segs] == [(0, 0, 64), (1, 64, 100)]
    run_until_idle(engine)
    assert planner.info("r").status == RequestStatus.FINISHED and len(planner.info("r").generated) == 29


# ---- preemption ---------------------------------------------------------------------------------


def run_two_requests_until_full(host_swap_pages: int, config: PlannerConfig | None = None):
    """One device of 8 pages (4 rows of A). r1: 40-token prompt (3 rows); r2: 8-token prompt (1 row).

    Both decode one token per step; at r1's 49th token (a 4th row) the pool is full.
    """
    planner = make_planner(pages_per_device=8, host_swap_pages=host_swap_pages, config=config)
    engine = SimEngine(planner)
    planner.submit(spec("r1", "A", 40, 19))
    planner.submit(spec("r2", "A", 8, 30))
    plan = engine.step()
    assert [a.request_id for a in plan.admitted] == ["r1", "r2"]
    for _ in range(8):  # r1: kv 40 -> 48, r2: kv 8 -> 16, no new pages
        plan = engine.step()
        assert not plan.preempted
    assert planner.virtualizer.pool_stats().pages_free == 0
    plan = engine.step()  # r1 needs a row for token 49: r2 (newer) gives its pages
    return planner, engine, plan


def test_preemption_swaps_the_newest_request_and_resumes_it_exactly() -> None:
    planner, engine, plan = run_two_requests_until_full(host_swap_pages=8)
    assert [(s.request_id, s.token_start, s.token_end) for s in plan.run] == [("r1", 48, 49)]
    (p,) = plan.preempted
    assert (p.request_id, p.mode, p.kv_len, len(p.pages_freed)) == ("r2", PreemptionMode.SWAP, 16, 2)
    assert p.swap_out is not None and p.swap_out.num_bytes == 2 * 4096
    info = planner.info("r2")
    assert info.status == RequestStatus.SWAPPED and info.kv_len == 16 and len(info.generated) == 9
    assert planner.waiting() == ("r2",)
    engine.end("r1", "finish")
    plan = engine.step()
    (a,) = plan.admitted
    assert a.request_id == "r2" and a.resumed and a.swap_in is not None and a.swap_in.num_pages == 2
    assert [(s.request_id, s.phase, s.token_start, s.token_end) for s in plan.run] == [
        ("r2", Phase.DECODE, 16, 17)
    ]
    run_until_idle(engine)
    info = planner.info("r2")
    assert info.status == RequestStatus.FINISHED and info.num_preemptions == 1
    assert info.generated == tuple(token("r2", 8 + i) for i in range(30))
    assert planner.virtualizer.pool_stats().host_pages_used == 0


def test_preemption_recomputes_when_host_swap_is_too_small() -> None:
    planner, engine, plan = run_two_requests_until_full(host_swap_pages=1)
    (p,) = plan.preempted
    assert (
        p.mode == PreemptionMode.RECOMPUTE and p.swap_out is None and "host swap space too small" in p.reason
    )
    info = planner.info("r2")
    assert info.status == RequestStatus.WAITING and info.kv_len == 0 and len(info.generated) == 9
    engine.end("r1", "finish")
    plan = engine.step()
    # recompute: re-prefill the prompt and the 9 generated tokens, then sample the 10th
    assert [(s.request_id, s.phase, s.token_start, s.token_end, s.samples_token) for s in plan.run] == [
        ("r2", Phase.PREFILL, 0, 17, True)
    ]
    assert plan.admitted[0].resumed and plan.admitted[0].swap_in is None
    run_until_idle(engine)
    assert planner.info("r2").generated == tuple(token("r2", 8 + i) for i in range(30))


def test_auto_preemption_picks_the_cheaper_mode() -> None:
    planner = make_planner(pages_per_device=8, host_swap_pages=8)
    swap_s, recompute_s = planner.preemption_costs_s("A", pages=10, kv_tokens=100)
    assert swap_s == pytest.approx(2 * 10 * 4096 / 25e9) and recompute_s == pytest.approx(100 / 10_000)
    # a model whose re-prefill is (implausibly) fast recomputes even with host room
    fast = PlannerConfig(model_prefill_tokens_per_s={"A": 1e12})
    _, _, plan = run_two_requests_until_full(host_swap_pages=8, config=fast)
    assert plan.preempted[0].mode == PreemptionMode.RECOMPUTE and "recompute" in plan.preempted[0].reason
    never = PlannerConfig(preemption=PreemptionChoice.ALWAYS_RECOMPUTE)
    _, _, plan = run_two_requests_until_full(host_swap_pages=8, config=never)
    assert plan.preempted[0].mode == PreemptionMode.RECOMPUTE


def test_growing_request_preempts_itself_when_it_is_the_lowest() -> None:
    planner = make_planner(pages_per_device=8)
    engine = SimEngine(planner)
    planner.submit(spec("old", "A", 40, 10))  # 3 rows
    planner.submit(spec("new", "A", 16, 10))  # 1 row, full; its 17th token needs a row
    engine.step()
    plan = engine.step()
    assert [s.request_id for s in plan.run] == ["old"]
    assert [p.request_id for p in plan.preempted] == ["new"]
    assert "no lower-precedence request" in plan.preempted[0].reason
    run_until_idle(engine)
    assert planner.info("new").status == RequestStatus.FINISHED


def test_priority_decides_the_victim() -> None:
    planner = make_planner(pages_per_device=8)
    engine = SimEngine(planner)
    planner.submit(spec("low", "A", 16, 10, priority=-1))  # older but low priority: 1 row
    planner.submit(spec("high", "A", 48, 10, priority=1))  # 3 rows; its 49th token needs a row
    engine.step()
    assert planner.running() == ("high", "low")
    plan = engine.step()
    assert [p.request_id for p in plan.preempted] == ["low"]
    assert [s.request_id for s in plan.run] == ["high"]


def test_floor_reserves_pages_for_a_model_with_demand() -> None:
    for floor_on, first, second in [(True, ["a1"], ["c1"]), (False, ["a1", "a2"], [])]:
        config = PlannerConfig(model_limits={"C": ModelLimits(floor_pages=6)} if floor_on else {})
        planner = make_planner(pages_per_device=12, config=config)
        engine = SimEngine(planner)
        planner.submit(spec("a1", "A", 48, 2))  # 3 rows x 2 layers = 6 pages
        planner.submit(spec("a2", "A", 32, 2))  # 4 pages
        planner.submit(spec("c1", "C", 12, 2))  # 3 rows x 3 layers = 9 pages
        plan = engine.step()
        # c1 does not fit the 6 free pages; with the floor, a2 may not take them either (C has demand)
        assert [a.request_id for a in plan.admitted] == first
        engine.end("a1", "finish")
        plan = engine.step()
        # without the floor a2 holds 4 pages and c1 (9 pages) still waits: the cold model is starved
        assert [a.request_id for a in plan.admitted] == second
        run_until_idle(engine)


def test_floor_protects_a_model_from_preemption() -> None:
    for floor_on, victim in [(True, "a1"), (False, "c1")]:
        config = PlannerConfig(model_limits={"C": ModelLimits(floor_pages=6)} if floor_on else {})
        planner = make_planner(pages_per_device=12, config=config)
        engine = SimEngine(planner)
        planner.submit(spec("a1", "A", 48, 10))  # 3 rows = 6 pages; token 49 needs 2 more
        planner.submit(spec("c1", "C", 8, 4))  # 2 rows x 3 layers = 6 pages: C at its floor
        engine.step()
        plan = engine.step()
        # without a floor the newer c1 loses its pages; with it, a1 must give way itself
        assert [p.request_id for p in plan.preempted] == [victim]
        run_until_idle(engine)
        assert all(planner.info(r).status == RequestStatus.FINISHED for r in ("a1", "c1"))


def test_cap_bounds_a_model_and_preempts_within_it() -> None:
    config = PlannerConfig(model_limits={"A": ModelLimits(cap_pages=4)})
    planner = make_planner(pages_per_device=16, config=config)
    engine = SimEngine(planner)
    planner.submit(spec("a1", "A", 16, 10))  # 2 pages
    planner.submit(spec("a2", "A", 16, 10))  # 2 pages: cap reached
    planner.submit(spec("b1", "B", 8, 10))  # 4 pages of another model, newest of all
    planner.submit(spec("a3", "A", 16, 10))
    plan = engine.step()
    assert sorted(a.request_id for a in plan.admitted) == ["a1", "a2", "b1"]
    assert planner.waiting() == ("a3",)  # 8 pages free, but A is at its cap
    plan = engine.step()  # a1's 17th token needs a row: over the cap, so a2 (not b1) gives way
    assert [p.request_id for p in plan.preempted] == ["a2"]
    assert "cap" in plan.preempted[0].reason
    assert planner.virtualizer.model_pages("A") <= 4
    run_until_idle(engine)


# ---- the step API and lifecycle -----------------------------------------------------------------


def test_multi_step_decode_lengths() -> None:
    planner = make_planner(pages_per_device=8)
    engine = SimEngine(planner)
    planner.submit(spec("r", "A", 10, 8))
    engine.step()
    plan = engine.step(StepInput(decode_lengths={"r": 14}))
    assert [(s.phase, s.token_start, s.token_end) for s in plan.run] == [(Phase.DECODE, 10, 14)]
    assert len(planner.info("r").generated) == 5
    with pytest.raises(PlannerError, match="outside"):
        planner.step(StepInput(decode_lengths={"r": 18}))  # at most 10 + 8 - 1 = 17 positions
    with pytest.raises(PlannerError, match="not a running decode request"):
        planner.step(StepInput(decode_lengths={"nope": 3}))
    planner.step()
    with pytest.raises(PlannerError, match="append the tokens"):
        planner.step()  # the previous step's token was not appended
    with pytest.raises(PlannerError, match="only 1 were sampled"):
        planner.append_tokens("r", [1, 2])


def test_cancel_fail_finish_and_messages() -> None:
    planner, engine, _ = run_two_requests_until_full(host_swap_pages=8)
    kv = planner.virtualizer
    assert kv.pool_stats().host_pages_used == 2
    engine.end("r2", "cancel")  # swapped: its host slots are freed
    assert kv.pool_stats().host_pages_used == 0
    assert planner.info("r2").status == RequestStatus.CANCELLED
    with pytest.raises(PlannerError, match="already ended"):
        planner.cancel("r2")
    planner.submit(spec("r3", "A", 4, 4))
    info = planner.fail("r3", "tokenizer error")
    assert info.status == RequestStatus.FAILED and info.message == "tokenizer error"
    with pytest.raises(PlannerError, match="already ended"):
        planner.finish("r3")
    planner.submit(spec("r4", "A", 4, 4))  # waiting: a stop learned late (planning ahead) ends it
    assert planner.finish("r4", "stop token").status == RequestStatus.FINISHED
    planner.forget("r4")
    engine.end("r1", "fail")
    assert not planner.has_live_requests and kv.pool_stats().pages_used == 0
    planner.forget("r3")
    with pytest.raises(PlannerError, match="unknown request"):
        planner.info("r3")
    planner.check_invariants()


def test_placeholder_tokens_are_revised() -> None:
    """Planning ahead: tokens still on the device are appended as placeholders (their count is what
    planning needs), then revised to their values; a request can end on placeholders."""
    planner = make_planner(pages_per_device=8)
    planner.submit(spec("r", "A", 5, 3))
    planner.step()  # prefill: samples one token
    planner.append_tokens("r", [-1])
    planner.step(StepInput(decode_lengths={"r": 7}))
    info = planner.append_tokens("r", [-1, -1])
    assert info.status == RequestStatus.FINISHED and info.generated == (-1, -1, -1)
    planner.revise_tokens("r", 0, [7])
    assert planner.revise_tokens("r", 1, [8, 9]).generated == (7, 8, 9)
    with pytest.raises(PlannerError, match="outside the 3 generated"):
        planner.revise_tokens("r", 2, [1, 2])


def test_max_new_tokens_finishes_and_frees() -> None:
    planner = make_planner(pages_per_device=8)
    engine = SimEngine(planner)
    planner.submit(spec("r", "A", 5, 1))
    engine.step()  # the prefill samples the only token
    info = planner.info("r")
    assert info.status == RequestStatus.FINISHED and "max_new_tokens" in info.message
    assert planner.virtualizer.pool_stats().pages_used == 0


# ---- property test: random workloads --------------------------------------------------------------


@dataclasses.dataclass
class Scenario:
    num_devices: int
    pages_per_device: int
    page_bytes: int
    host_swap_pages: int
    geometries: dict[str, KVGeometry]
    config: PlannerConfig


@st.composite
def scenarios(draw) -> Scenario:
    num_devices = draw(st.integers(1, 3))
    pages_per_device = draw(st.integers(6, 40))
    page_bytes = draw(st.sampled_from([256, 512, 1024]))
    geometries = {}
    for i in range(draw(st.integers(1, 3))):
        layers = draw(st.integers(1, min(4, pages_per_device)))
        width = draw(st.sampled_from([64, 100, 128, 256]))  # 1 to 16 tokens per page
        geometries[f"m{i}"] = KVGeometry(layers, width, draw(st.sampled_from([1, 2, 4])))
    total = num_devices * pages_per_device
    limits = {}
    floor_left = total // 2
    for model in geometries:
        floor = draw(st.integers(0, floor_left // 2)) if draw(st.booleans()) else 0
        floor_left -= floor
        cap = draw(st.one_of(st.none(), st.integers(max(floor, 1), total)))
        limits[model] = ModelLimits(floor, cap)
    config = PlannerConfig(
        admission_headroom_tokens=draw(st.integers(0, 8)),
        preemption=draw(st.sampled_from(list(PreemptionChoice))),
        prefill_tokens_per_s=draw(st.sampled_from([1e3, 1e5, 1e12])),
        allow_split_kv=draw(st.booleans()),
        model_limits=limits,
        admission_backfill=draw(st.booleans()),
        starving_after_steps=draw(st.sampled_from([None, 1, 3, 20])),
    )
    return Scenario(num_devices, pages_per_device, page_bytes, draw(st.integers(0, 48)), geometries, config)


def check_books(planner: KVPlanner) -> None:
    """Independent recount of the planner's and virtualizer's books."""
    planner.check_invariants()
    kv = planner.virtualizer
    cfg = kv.config
    owner: dict[PhysicalPage, str] = {}
    for rid in kv.request_ids():
        for page in kv.request_pages(rid):
            assert page not in owner, f"{page} mapped by {owner[page]} and {rid}"
            owner[page] = rid
    live = set(planner.running())
    assert set(owner.values()) <= live, "pages held by a request that is not running"
    for device in range(cfg.num_devices):
        used = sum(1 for p in owner if p.device == device)
        assert kv.device_stats(device).pages_used == used <= cfg.pages_per_device
    for model in kv.models:
        held = sum(1 for rid in owner.values() if kv.model_of(rid) == model)
        assert kv.model_pages(model) == held
        cap = planner.config.limits(model).cap_pages
        assert cap is None or held <= cap, f"model {model} holds {held} pages over its cap {cap}"
    for rid in planner.running():
        position = 0
        for seg in kv.segments(rid):
            assert seg.token_start == position
            position = seg.token_end
        assert position == planner.info(rid).kv_len, "segments do not cover [0, len) exactly once"


def expected_rejection(planner: KVPlanner, request: RequestSpec) -> bool:
    kv = planner.virtualizer
    layout = kv.layout(request.model)
    longest = len(request.prompt) + request.max_new_tokens - 1
    rows_per_device = kv.config.pages_per_device // layout.num_layers
    devices = kv.config.num_devices if planner.config.allow_split_kv else 1
    cap = planner.config.limits(request.model).cap_pages
    too_long = layout.rows_for(longest) > devices * rows_per_device
    return too_long or (cap is not None and layout.pages_for(longest) > cap)


def draw_request(data: st.DataObject, planner: KVPlanner, rid: str) -> RequestSpec:
    """A request sized against the pool: mostly fitting, a few too long; generations span pages."""
    kv = planner.virtualizer
    model = data.draw(st.sampled_from(kv.models), label="model")
    layout = kv.layout(model)
    tokens_per_page = layout.tokens_per_page
    pool_tokens = kv.max_tokens(model) // (1 if planner.config.allow_split_kv else kv.config.num_devices)
    cap = planner.config.limits(model).cap_pages
    if cap is not None:
        pool_tokens = min(pool_tokens, cap // layout.num_layers * tokens_per_page)
    if data.draw(st.integers(0, 9), label="oversized?") == 0:
        prompt_len = data.draw(st.integers(max(1, pool_tokens - 4), pool_tokens + 4), label="prompt")
    else:
        prompt_len = data.draw(st.integers(1, max(1, pool_tokens // 2)), label="prompt")
    room = max(1, min(pool_tokens - prompt_len, 3 * tokens_per_page + 2))
    max_new = data.draw(st.integers(1, room), label="max_new")
    return spec(rid, model, prompt_len, max_new, data.draw(st.integers(-1, 1), label="priority"))


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(scenario=scenarios(), data=st.data())
def test_random_workloads_keep_the_books_and_lose_nothing(scenario: Scenario, data: st.DataObject) -> None:
    planner = make_planner(
        scenario.num_devices,
        scenario.pages_per_device,
        scenario.host_swap_pages,
        scenario.config,
        scenario.page_bytes,
        scenario.geometries,
    )
    kv = planner.virtualizer
    engine = SimEngine(planner)
    submitted: dict[str, RequestSpec] = {}
    for op_index in range(data.draw(st.integers(1, 80), label="ops")):
        op = data.draw(st.sampled_from(["submit"] * 2 + ["step"] * 4 + ["end"]), label="op")
        if op == "submit":
            for burst_index in range(data.draw(st.integers(1, 3), label="burst")):
                request = draw_request(data, planner, f"q{op_index}.{burst_index}")
                submitted[request.request_id] = request
                try:
                    planner.submit(request)
                    assert not expected_rejection(planner, request)
                    event("submitted")
                except RequestRejected as err:
                    event("rejected at submission")
                    assert expected_rejection(planner, request), err
                    assert planner.info(request.request_id).status == RequestStatus.REJECTED
        elif op == "step":
            decode_lengths = {}
            for rid in planner.running():
                info = planner.info(rid)
                if info.phase == Phase.DECODE:
                    room = len(info.prompt) + submitted[rid].max_new_tokens - 1 - info.kv_len
                    decode_lengths[rid] = info.kv_len + data.draw(st.integers(1, max(1, min(3, room))))
            budget = data.draw(st.none() | st.integers(0, 64), label="budget")
            plan = engine.step(StepInput(decode_lengths, budget))
            for p in plan.preempted:
                event(f"preempted: {p.mode}")
            if plan.swap_ins:
                event("swap-in")
            if any(len(kv.segments(r)) > 1 for r in planner.running()):
                event("a running request spans devices")
            if budget is not None:
                assert sum(s.num_tokens for s in plan.run if s.phase == Phase.PREFILL) <= budget
        else:
            live = [r for r in submitted if not planner.info(r).status.is_terminal]
            if live:
                rid = data.draw(st.sampled_from(live), label="victim")
                how = data.draw(st.sampled_from(["finish", "cancel", "fail"]), label="how")
                if how == "finish" and planner.info(rid).status != RequestStatus.RUNNING:
                    how = "cancel"
                engine.end(rid, how)
        check_books(planner)
    # drain: the engine keeps stepping; every live request must end on its own
    run_until_idle(engine, max_steps=3000)
    check_books(planner)
    stats = kv.pool_stats()
    assert (
        stats.pages_used == 0 and stats.host_pages_used == 0 and not engine.device_mem and not engine.host_mem
    )
    for rid, request in submitted.items():
        info = planner.info(rid)
        assert info.status.is_terminal and info.message, f"{rid} ended without a clear status: {info}"
        event(f"ended: {info.status}")
        if info.num_preemptions:
            event(f"ended after preemption: {info.status}")
        if info.status == RequestStatus.FINISHED:
            assert info.generated == tuple(
                token(rid, len(request.prompt) + i) for i in range(len(info.generated))
            )
            assert rid in engine.stopped or len(info.generated) == request.max_new_tokens


def test_held_models_wait_in_place_while_others_are_admitted() -> None:
    """A held model's waiting requests are not admitted (its programs are compiling); the others'
    are, and the held ones are admitted first once the hold ends (they kept their place)."""
    planner = make_planner(pages_per_device=16)
    for rid, model in (("a1", "A"), ("b1", "B"), ("a2", "A")):
        planner.submit(spec(rid, model, 4, 2))
    plan = planner.step(StepInput(held_models=frozenset({"A"})))
    assert [a.request_id for a in plan.admitted] == ["b1"]
    assert planner.info("a1").status == RequestStatus.WAITING
    planner.cancel("b1")
    plan = planner.step(StepInput())
    assert [a.request_id for a in plan.admitted] == ["a1", "a2"]


def test_held_prefills_make_no_progress_and_the_rest_go_on() -> None:
    """A held running prefill gets no chunk (it keeps its pages); a held waiting request is passed
    over for the next request of its model; `prefill_span` says where each prefill stands; once
    the hold ends both go on from where they were."""
    planner = make_planner(pages_per_device=16)
    planner.submit(spec("long", "A", 40, 2))
    plan = planner.step(StepInput(prefill_token_budget=16))
    assert [(s.request_id, s.token_start, s.token_end) for s in plan.run] == [("long", 0, 16)]
    assert planner.prefill_span("long") == (16, 40)
    for rid in ("a1", "a2"):
        planner.submit(spec(rid, "A", 4, 2))
    assert planner.prefill_span("a1") == (0, 4)
    pages = planner.virtualizer.pool_stats().pages_used
    plan = planner.step(StepInput(prefill_token_budget=16, held_prefills=frozenset({"long", "a1"})))
    assert [s.request_id for s in plan.run] == ["a2"]  # a1 passed over, long paused
    assert planner.prefill_span("long") == (16, 40) and planner.info("a1").status == RequestStatus.WAITING
    assert planner.virtualizer.pool_stats().pages_used > pages  # long kept its pages, a2 took some
    planner.append_tokens("a2", [token("a2", 4)])
    plan = planner.step(StepInput(prefill_token_budget=64))
    assert {(s.request_id, s.token_start, s.token_end) for s in plan.run if s.phase == Phase.PREFILL} == {
        ("long", 16, 40), ("a1", 0, 4)}
    assert planner.prefill_span("a2") is None  # decoding
