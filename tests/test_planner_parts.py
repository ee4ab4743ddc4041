"""Unit tests of the KV planner's parts on their own: floor arithmetic (`planner_config`), the request
book, the preemption decisions and the admission decisions, each against hand-computed results.

The planner as a whole (and through it these parts) is tested in tests/test_planner.py.
"""

from __future__ import annotations

import pytest

from crosspool_jax.memory.admission import (
    FirstStep,
    admission_tokens,
    find_starving,
    first_step,
    rejection_reason,
)
from crosspool_jax.memory.kv_virtualizer import KVGeometry, KVPoolConfig, KVVirtualizer
from crosspool_jax.memory.planner_config import (
    ModelLimits,
    PlannerConfig,
    PreemptionChoice,
    check_floors_fit,
    reserved_for_others,
)
from crosspool_jax.memory.planner_types import (
    Phase,
    PlannerError,
    PreemptionMode,
    RequestSpec,
    RequestStatus,
    ScheduledRequest,
)
from crosspool_jax.memory.preemption import (
    Shortfall,
    choose_preemption_mode,
    growth_shortfall,
    pick_victim,
    preemption_costs_s,
)
from crosspool_jax.memory.request_book import RequestBook, RequestRecord


def record(rid: str, model: str = "A", prompt_len: int = 10, max_new: int = 8, priority: int = 0,
           arrival: int = 0, **fields) -> RequestRecord:
    spec = RequestSpec(rid, model, tuple(range(prompt_len)), max_new, priority)
    return RequestRecord(spec, arrival, **fields)


def book_of(*specs: tuple[str, str, int]) -> RequestBook:
    """A book with (request id, model, priority) requests submitted in this order, all waiting."""
    book = RequestBook()
    for rid, model, priority in specs:
        book.open(book.new_record(RequestSpec(rid, model, (1, 2, 3), 4, priority), cap_pages=None))
    return book


# ---- floors -------------------------------------------------------------------------------------


def test_reserved_for_others_counts_unused_floors_of_live_models_only() -> None:
    config = PlannerConfig(model_limits={"A": ModelLimits(6), "B": ModelLimits(4), "C": ModelLimits(0)})
    live = {"A": 1, "B": 0, "C": 2}
    held = {"A": 2, "B": 0, "C": 5}.__getitem__
    assert reserved_for_others(config, "C", live, held) == 4  # A: 6 - 2; B has no live request
    assert reserved_for_others(config, "A", live, held) == 0  # its own floor is not reserved from it
    assert reserved_for_others(config, "D", {**live, "B": 1}, held) == 4 + 4
    assert reserved_for_others(config, "C", live, {"A": 9}.__getitem__) == 0  # A is past its floor


def test_check_floors_fit() -> None:
    config = PlannerConfig(model_limits={"A": ModelLimits(6), "B": ModelLimits(4)})
    check_floors_fit(config, 10)
    with pytest.raises(ValueError, match="floors add up to 10 pages, more than the pool's 9"):
        check_floors_fit(config, 9)


# ---- the request book ---------------------------------------------------------------------------


def test_book_queues_by_precedence_and_rotates_models_in_submission_order() -> None:
    book = book_of(("a1", "A", 0), ("b1", "B", 0), ("a2", "A", 1), ("a3", "A", 0))
    assert book.model_order == ["A", "B"]
    assert book.waiting_ids() == ("a2", "a1", "a3", "b1")  # priority 1 first, then arrival
    assert book.waiting_ids("B") == ("b1",) and book.live_per_model == {"A": 3, "B": 1}
    book.close(book.requests["a1"])
    assert book.waiting_ids("A") == ("a2", "a3") and book.live_per_model["A"] == 2
    with pytest.raises(PlannerError, match="already submitted"):
        book.new_record(RequestSpec("a1", "A", (1,), 1), cap_pages=None)
    with pytest.raises(PlannerError, match="unknown request"):
        book.get("zz")


def test_book_drops_idle_models_and_keeps_the_rotation_on_its_model() -> None:
    book = book_of(("a", "A", 0), ("b", "B", 0), ("c", "C", 0))
    for rid in ("a", "b", "c"):
        book.close(book.requests[rid])
    book.rr_next = 1  # B would start the next rotation; it is dropped, so C does
    book.drop_idle_models(registered=("A", "C"))
    assert book.model_order == ["A", "C"] and book.rr_next == 1 and "B" not in book.queues
    book.rr_next = 1  # C starts the next rotation; A is dropped: C is now at 0
    book.drop_idle_models(registered=("C",))
    assert book.model_order == ["C"] and book.rr_next == 0
    live = book_of(("a", "A", 0))
    live.drop_idle_models(registered=())  # a model with a live request stays
    assert live.model_order == ["A"]


def test_live_requests_keep_the_larger_cap() -> None:
    book = RequestBook()
    caps = {"r4": 4, "r8": 8, "rnone": None, "ended": 4}
    for rid, cap in caps.items():
        book.new_record(RequestSpec(rid, "A", (1,), 1), cap_pages=cap)
    book.requests["ended"].status = RequestStatus.FINISHED
    book.keep_larger_caps(lambda model: 6)
    caps = {rid: r.cap_pages for rid, r in book.requests.items()}
    assert caps == {"r4": 6, "r8": 8, "rnone": None, "ended": 4}
    assert book.effective_cap("A", 5) is None  # a live request kept "no cap"
    book.requests["rnone"].status = RequestStatus.CANCELLED
    assert book.effective_cap("A", 5) == 8  # raised by the live requests' caps
    book.requests["r8"].cap_pages = 7
    assert book.effective_cap("A", 5) == 7 and book.effective_cap("B", 5) == 5
    book.keep_larger_caps(lambda model: None)
    assert book.requests["r4"].cap_pages is None and book.effective_cap("A", 5) is None


def test_record_next_length_and_schedule() -> None:
    req = record("r", prompt_len=10, max_new=8, status=RequestStatus.RUNNING, prefill_target=10)
    assert req.prefill_span() == (0, 10)
    assert req.next_length(None, 4) == (4, 4)  # a prefill chunk of the budget
    assert req.schedule(4) == ScheduledRequest("r", "A", Phase.PREFILL, 0, 4, False)
    assert req.next_length(None, None) == (10, 6)
    assert req.schedule(10) == ScheduledRequest("r", "A", Phase.PREFILL, 4, 10, True)  # samples a token
    with pytest.raises(PlannerError, match="append the tokens"):
        req.next_length(None, None)
    req.generated.append(7)
    assert req.prefill_span() is None
    assert req.next_length(None, 0) == (11, 0) and req.next_length(13, 0) == (13, 0)
    assert req.schedule(13) == ScheduledRequest("r", "A", Phase.DECODE, 10, 13, True)


# ---- preemption ---------------------------------------------------------------------------------


def test_preemption_costs_s() -> None:
    config = PlannerConfig(host_link_bytes_per_s=1e9, prefill_tokens_per_s=1000.0,
                           model_prefill_tokens_per_s={"A": 4000.0})
    swap_s, recompute_s = preemption_costs_s(config, 4096, "A", pages=10, kv_tokens=100)
    assert swap_s == pytest.approx(2 * 10 * 4096 / 1e9) and recompute_s == pytest.approx(100 / 4000)
    assert preemption_costs_s(config, 4096, "B", pages=10, kv_tokens=100)[1] == pytest.approx(0.1)


def test_choose_preemption_mode() -> None:
    auto, swap, never = PreemptionChoice.AUTO, PreemptionChoice.PREFER_SWAP, PreemptionChoice.ALWAYS_RECOMPUTE
    recompute, swap_mode = PreemptionMode.RECOMPUTE, PreemptionMode.SWAP
    assert choose_preemption_mode(swap, 0, 4, True, 9, (0.0, 1.0)) == (recompute, "nothing computed yet")
    assert choose_preemption_mode(swap, 16, 0, True, 9, (0.0, 1.0)) == (recompute, "nothing computed yet")
    assert choose_preemption_mode(never, 16, 2, True, 9, (0.0, 1.0)) == (
        recompute, "policy: always recompute")
    assert choose_preemption_mode(swap, 16, 2, False, 1, (0.0, 1.0)) == (
        recompute, "host swap space too small (1 slots free)")
    assert choose_preemption_mode(swap, 16, 2, True, 9, (2.0, 1.0)) == (swap_mode, "policy: prefer swap")
    assert choose_preemption_mode(auto, 16, 2, True, 9, (0.002, 0.001)) == (
        recompute, "recompute 1 ms < swap 2 ms")
    assert choose_preemption_mode(auto, 16, 2, True, 9, (0.001, 0.001)) == (
        swap_mode, "swap 1 ms <= recompute 1 ms")


def test_growth_shortfall() -> None:
    def never_asked() -> bool:
        raise AssertionError("the device placement is asked only when the page counts allow the growth")

    assert growth_shortfall("A", 0, held=9, cap=4, free=0, reserved=0, fits_devices=never_asked) is None
    assert growth_shortfall("A", 2, held=3, cap=4, free=10, reserved=0, fits_devices=never_asked) == (
        Shortfall(True, "model 'A' holds 3 of its 4-page cap, needs 2 more"))
    assert growth_shortfall("A", 3, held=0, cap=None, free=5, reserved=3, fits_devices=never_asked) == (
        Shortfall(False, "needs 3 pages, 5 free of which 3 are other models' floors"))
    assert growth_shortfall("A", 2, 2, 4, 5, 3, lambda: False) == Shortfall(
        False, "needs 2 pages, the free ones are too scattered over devices")
    assert growth_shortfall("A", 2, 2, 4, 5, 3, lambda: True) is None


def test_pick_victim_takes_the_lowest_precedence_request_that_can_help() -> None:
    grower = record("g", "A", arrival=1)
    high = record("high", "A", priority=1, arrival=5)  # runs before the grower: never a victim
    a_old, a_new = record("a_old", "A", arrival=2), record("a_new", "A", arrival=3)
    b_new = record("b_new", "B", arrival=4)
    empty = record("empty", "A", arrival=9)  # holds no KV yet
    running = [grower, high, a_old, a_new, b_new, empty]
    tokens = {"g": 5, "high": 5, "a_old": 5, "a_new": 5, "b_new": 5, "empty": 0}.__getitem__
    above = {"A": True, "B": True}.__getitem__
    assert pick_victim(grower, running, False, tokens, above) is b_new
    assert pick_victim(grower, running, True, tokens, above) is a_new  # the cap: only its own model helps
    at_floor = {"A": False, "B": False}.__getitem__  # the grower's own model's floor does not protect
    assert pick_victim(grower, running, False, tokens, at_floor) is a_new
    assert pick_victim(a_new, running, False, tokens, at_floor) is None


# ---- admission ----------------------------------------------------------------------------------


def test_rejection_reason() -> None:
    kv = KVVirtualizer(KVPoolConfig(2, 8, 4096, 0))  # A: 2 layers x 16 tokens/page, 4 rows a device
    kv.register_model("A", KVGeometry(2, 256))
    config = PlannerConfig(model_limits={"A": ModelLimits(cap_pages=10)})

    def reason(prompt_len: int, max_new: int, model: str = "A", config: PlannerConfig = config) -> str | None:
        return rejection_reason(RequestSpec("r", model, tuple(range(prompt_len)), max_new), kv, config)

    assert reason(60, 20) is None  # 79 tokens: 5 rows x 2 layers = 10 pages, split over 2 devices
    assert reason(60, 22) == "needs up to 12 pages of KV; model 'A' is capped at 10 pages"  # 81 tokens
    assert reason(100, 30) == ("needs up to 129 tokens of KV (prompt 100 + max_new_tokens 30 - 1); "
                               "the whole pool holds 128 for model 'A'")
    assert reason(60, 20, config=PlannerConfig(allow_split_kv=False)) == (
        "needs up to 79 tokens of KV; one KV device holds 64 and split-KV is off")
    assert reason(0, 2) == "empty prompt"
    assert reason(4, 0) == "max_new_tokens must be >= 1, got 0"
    assert reason(4, 2, model="Z") == "model 'Z' is not registered with the KV pool"


def test_admission_tokens_and_first_step() -> None:
    waiting = record("w", prompt_len=10, max_new=8, generated=[1, 2])  # 12 tokens known; at most 17
    assert admission_tokens(waiting, step_len=5, headroom=3) == 15  # the prefill, 12, + 3
    assert admission_tokens(waiting, step_len=5, headroom=10) == 17  # capped at max_kv_tokens
    assert admission_tokens(waiting, step_len=20, headroom=0) == 20  # at least what the step holds
    assert first_step(waiting, None) == FirstStep(prefill_target=12, step_len=12, chunk=12)
    assert first_step(waiting, 5) == FirstStep(12, 5, 5)
    assert first_step(waiting, 0) is None  # the budget is spent
    # swapped while decoding: resumes at 14 with one decode token, whatever the budget
    decoding = record("d", prompt_len=10, max_new=8, generated=[1, 2, 3, 4, 5],
                      status=RequestStatus.SWAPPED, kv_len=14, prefill_target=10)
    assert admission_tokens(decoding, step_len=15, headroom=2) == 16
    assert first_step(decoding, 0) == FirstStep(10, 15, 0)
    # swapped within its prefill: the rest of it, within the budget
    prefilling = record("p", prompt_len=10, status=RequestStatus.SWAPPED, kv_len=4, prefill_target=10)
    assert first_step(prefilling, 3) == FirstStep(10, 7, 3)
    assert admission_tokens(prefilling, step_len=7, headroom=0) == 10


def test_find_starving_takes_the_best_precedence_that_may_start() -> None:
    book = book_of(("a1", "A", 0), ("b1", "B", 0), ("b2", "B", 1), ("a2", "A", 0))
    rounds = {"a1": 1, "b1": 3, "b2": 2, "a2": 5}
    for rid, n in rounds.items():
        book.requests[rid].unfit_rounds = n
    none: frozenset = frozenset()
    assert find_starving(book, 2, none, none) is book.requests["b2"]  # priority 1
    assert find_starving(book, 3, none, none) is book.requests["b1"]  # b2 not starving yet
    assert find_starving(book, 3, frozenset({"B"}), none) is book.requests["a2"]
    assert find_starving(book, 3, none, frozenset({"b1"})) is book.requests["a2"]
    assert find_starving(book, 6, none, none) is None
    assert find_starving(book, None, none, none) is None  # the policy is off
