"""Unit tests of the KV planner's parts on their own: floor arithmetic (`planner_config`) and the
request book, each against hand-computed results.

The planner as a whole (and through it these parts) is tested in tests/test_planner.py.
"""

from __future__ import annotations

import pytest

from crosspool_jax.memory.planner_config import (
    ModelLimits,
    PlannerConfig,
    check_floors_fit,
)
from crosspool_jax.memory.planner_types import (
    Phase,
    PlannerError,
    RequestSpec,
    RequestStatus,
    ScheduledRequest,
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
