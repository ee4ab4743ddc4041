"""Limits that change while requests run (mode static adding or removing a model next to live
requests): the planner's rule (`KVPlanner.set_model_limits`: nothing is preempted, a request live at
the change keeps the larger cap, later ones are held to the new cap) and the engine loading and
unloading a model while another model's request streams on the same device."""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import pytest

from crosspool_jax.demo import demo_models
from crosspool_jax.engine import EngineConfig, PooledEngine
from crosspool_jax.engine_api import FINISH_ERROR, make_request
from crosspool_jax.memory.planner import ModelLimits, PlannerConfig, RequestRejected, RequestStatus
from crosspool_jax.models.reference import ReferenceGenerator
from tests.test_planner import SimEngine, make_planner, spec

# ---- the planner ---------------------------------------------------------------------------------


def _step_checked(engine: SimEngine, preempted: list[str]) -> None:
    plan = engine.step()
    preempted += [p.request_id for p in plan.preempted]
    engine.planner.check_invariants()


def test_live_limit_change_preempts_nothing_and_holds_later_requests_to_the_new_cap() -> None:
    # A: 2 layers x 16 tokens a page (a row = 2 pages); B: 4 layers x 8 tokens (a row = 4 pages)
    planner = make_planner(pages_per_device=32,
                           config=PlannerConfig(model_limits={"A": ModelLimits(32, 32)}))
    engine = SimEngine(planner)
    kv = planner.virtualizer
    planner.submit(spec("a1", "A", 100, 20))  # 14 pages after its prefill, 16 at its end
    planner.submit(spec("a0", "A", 250, 2))  # 32 pages: waits (submitted before the change)
    preempted: list[str] = []
    _step_checked(engine, preempted)
    assert kv.model_pages("A") == 14 and planner.waiting() == ("a0",)

    planner.set_model_limits({"A": ModelLimits(8, 8), "B": ModelLimits(24, 24)})  # A holds 14 > 8
    assert planner.config.limits("A").cap_pages == 8
    with pytest.raises(RequestRejected, match="capped at 8"):  # held to the new cap from now on
        planner.submit(spec("a-big", "A", 100, 2))
    planner.submit(spec("a2", "A", 8, 2))  # 2 pages; A is over its new cap: waits
    planner.submit(spec("b1", "B", 20, 4))  # 12 pages inside B's new floor
    held = [kv.model_pages("A")]
    while planner.info("a1").status == RequestStatus.RUNNING:
        _step_checked(engine, preempted)
        held.append(kv.model_pages("A"))
        if planner.info("a1").status == RequestStatus.RUNNING:
            assert planner.info("a2").status == RequestStatus.WAITING  # not while A is over 8
    assert max(held) == 16  # a1 kept growing past the new cap, out of free pages
    assert planner.info("b1").status != RequestStatus.WAITING  # B got its share meanwhile
    for _ in range(200):
        if not planner.has_live_requests:
            break
        _step_checked(engine, preempted)
    assert not preempted, preempted  # the change preempted nothing, and nothing else had to
    assert all(planner.info(r).status == RequestStatus.FINISHED for r in ("a0", "a1", "a2", "b1"))
    assert kv.pool_stats().pages_used == 0


def test_live_limit_change_refuses_floors_over_the_pool_and_raises_caps_of_live_requests() -> None:
    planner = make_planner(pages_per_device=32,
                           config=PlannerConfig(model_limits={"A": ModelLimits(0, 6)}))
    engine = SimEngine(planner)
    planner.submit(spec("a1", "A", 20, 12))  # 2 rows = 4 pages, all its life
    engine.step()
    with pytest.raises(ValueError, match="floors add up to 40"):
        planner.set_model_limits({"A": ModelLimits(20), "B": ModelLimits(20)})
    assert planner.config.limits("A").cap_pages == 6  # unchanged
    planner.set_model_limits({"A": ModelLimits(0, 2)})  # lower: a1 (live) keeps 6, holds 4
    planner.submit(spec("a2", "A", 4, 1))  # 2 pages, held to the cap of 2: waits
    engine.step()
    planner.check_invariants()
    assert planner.info("a1").status == RequestStatus.RUNNING
    assert planner.info("a2").status == RequestStatus.WAITING
    planner.set_model_limits({"A": ModelLimits(0, 16)})  # raise: both live requests get 16
    plan = engine.step()
    assert [a.request_id for a in plan.admitted] == ["a2"]
    for _ in range(100):
        if not planner.has_live_requests:
            break
        engine.step()
        planner.check_invariants()
    assert [planner.info(r).status for r in ("a1", "a2")] == [RequestStatus.FINISHED] * 2


def test_models_gone_from_the_pool_leave_the_round_robin() -> None:
    planner = make_planner(pages_per_device=32)
    engine = SimEngine(planner)
    for rid, model in (("a1", "A"), ("b1", "B"), ("c1", "C")):
        planner.submit(spec(rid, model, 4, 1))
    engine.step()
    assert not planner.has_live_requests
    planner.virtualizer.unregister_model("B")
    planner.set_model_limits({})
    book = planner._book
    assert planner.waiting() == () and "B" not in book.queues and book.model_order == ["A", "C"]
    planner.submit(spec("c2", "C", 4, 1))
    engine.step()
    assert planner.info("c2").status == RequestStatus.FINISHED


# ---- the engine ----------------------------------------------------------------------------------

MODELS = demo_models()
A, B = "demo-mixtral", "demo-qwen3-moe"
PA, PB = [5, 9, 33, 7], [6, 10, 33, 7, 2, 100]


def _reference(name: str, prompt: list[int], n: int) -> list[int]:
    m = MODELS[name]
    w = jax.tree.map(lambda a: a.astype(jnp.float32), m.weights)
    return list(ReferenceGenerator(m.config, w).generate(prompt, n).token_ids)


def _tokens(h) -> list[int]:
    return [ev.token_id for ev in h.events() if ev.token_id is not None]


def _pages_used(eng: PooledEngine) -> int:
    return sum(used for _, used, _ in eng.stats().kv_pages)


def test_static_loads_and_unloads_a_model_next_to_a_live_request() -> None:
    """One device, 48 KV pages (a mixtral row of 16 tokens = 2 pages). "a" alone has all 48; while
    its 215-token request holds 26-28 pages, "b" is loaded (floor = cap = 24 each): "a"'s request
    keeps its pages and finishes, "b"'s runs beside it, a new "a" request needing more than 24 pages
    is refused. Then "b" is unloaded with requests of both live: "a"'s finishes."""
    eng = PooledEngine(mode="static", pools="1",
                       config=EngineConfig(arena_bytes=160 * 16384, weights_fraction=0.7,
                                           attention_backend="reference", steps_per_call=2))
    try:
        eng.add_model("a", MODELS[A].config, MODELS[A].weights)
        group = eng.groups[0]
        total = group.kv.config.total_pages
        assert total == 48
        held_at_change: list[int] = []  # pages "a" holds when the limits change
        set_limits = group.set_limits
        group.set_limits = lambda lim: (held_at_change.append(group.kv.model_pages("a")), set_limits(lim))
        long_prompt = [int(t) for t in jnp.arange(200) * 7 % 240 + 3]
        # the worker's steps are gated while "b" is placed (placement no longer holds the worker,
        # so "a"'s request could otherwise finish before the limits change)
        gate, step = threading.Event(), eng._step_groups
        gate.set()
        eng._step_groups = lambda: (gate.wait(), step())[1]
        ha = eng.submit(make_request("a", long_prompt, 16))
        first = ha.next_event(timeout=300)
        assert first is not None and first.token_id is not None and not first.final
        gate.clear()
        eng.add_model("b", MODELS[B].config, MODELS[B].weights)  # "a" is generating on this device
        gate.set()
        assert held_at_change[0] > total // 2  # "a" held more than its new cap
        limits = group.planner.config.model_limits
        assert limits == {n: ModelLimits(total // 2, total // 2) for n in ("a", "b")}
        hb = eng.submit(make_request("b", PB, 6))
        assert _tokens(hb) == _reference(B, PB, 6)
        refused = eng.submit(make_request("a", long_prompt, 16))  # 28 pages > the new cap of 24
        assert "capped at 24 pages" in [ev for ev in refused.events()][-1].error
        assert [first.token_id, *_tokens(ha)] == _reference(A, long_prompt, 16)
        group.planner.check_invariants()

        # unload "b" while requests of both models are live: "b"'s fails, "a"'s runs to its end
        ha = eng.submit(make_request("a", PA, 16))
        hb = eng.submit(make_request("b", PB, 64))
        firsts = [h.next_event(timeout=300) for h in (ha, hb)]
        assert all(ev is not None and ev.token_id is not None and not ev.final for ev in firsts)
        assert eng.unload_model("b") == 1
        assert [ev for ev in hb.events()][-1].finish_reason == FINISH_ERROR
        assert [firsts[0].token_id, *_tokens(ha)] == _reference(A, PA, 16)
        deadline = time.monotonic() + 60
        while (_pages_used(eng) or "b" in eng.groups[0].geoms) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pages_used(eng) == 0
        assert group.planner.config.model_limits == {"a": ModelLimits(total, total)}
        st = eng.stats()
        assert st.models == ("a",) and st.failed == 2 and st.completed == 3
    finally:
        eng.shutdown(timeout=0)
