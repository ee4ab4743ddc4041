"""`PooledEngine` and its device groups: one copy of a model's weights (the arena's: the engine keeps
none after placing them), and groups that step independently (one worker thread per group, modes
shared / static), so a long step of one device does not hold up another device's tokens; cancel,
unload, re-add and stats across groups."""

from __future__ import annotations

import gc
import time
import weakref

import jax
import jax.numpy as jnp
import pytest

from crosspool_jax.demo import demo_models
from crosspool_jax.engine import EngineConfig, PooledEngine
from crosspool_jax.engine_api import FINISH_CANCELLED, FINISH_ERROR, make_request
from crosspool_jax.models.reference import ReferenceGenerator

MODELS = demo_models()
A, B = "demo-mixtral", "demo-qwen3-moe"
PA, PB = [5, 9, 33, 7], [6, 10, 33, 7, 2, 100]
CONFIG = EngineConfig(arena_bytes=8 << 20, attention_backend="reference", steps_per_call=2)


def _reference(name: str, prompt: list[int], n: int) -> list[int]:
    m = MODELS[name]
    w = jax.tree.map(lambda a: a.astype(jnp.float32), m.weights)
    return list(ReferenceGenerator(m.config, w).generate(prompt, n).token_ids)


def _tokens(h) -> list[int]:
    return [ev.token_id for ev in h.events() if ev.token_id is not None]


def _pages(eng: PooledEngine) -> dict[str, int]:
    """KV pages used per group ("group0", "group1")."""
    out: dict[str, int] = {}
    for dev, used, _ in eng.stats().kv_pages:
        out[dev.split("/")[0]] = out.get(dev.split("/")[0], 0) + used
    return out


def _wait(pred, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.02)
    return pred()


def test_the_engine_keeps_no_copy_of_the_weights() -> None:
    eng = PooledEngine(mode="shared", pools="1", config=CONFIG)
    try:
        m = MODELS[A]
        weights = jax.tree.map(lambda a: jnp.array(a, jnp.float32), m.weights)  # held here only
        alive = [weakref.ref(a) for a in jax.tree.leaves(weights)]
        eng.add_model("a", m.config, weights, m.tokenizer)
        del weights
        gc.collect()
        assert alive and all(r() is None for r in alive)  # the arena is the only copy
        assert not hasattr(eng._model("a"), "generator")
        assert eng.model_eos_ids("a") == tuple(m.config.eos_token_ids)
        assert eng.tokenizer("a") is m.tokenizer
        attn, ffn = eng.weights_bytes_by_side("a")
        assert attn > 0 and ffn > 0 and eng.weights_bytes("a") == attn + ffn
        assert _tokens(eng.submit(make_request("a", PA, 8))) == _reference(A, PA, 8)
    finally:
        eng.shutdown(timeout=0)


@pytest.fixture(scope="module")
def two_devices():
    """Mode shared on 2 devices: "a" on group 0, "b" on group 1 (placed by weight bytes), each
    model's programs compiled by a first request."""
    eng = PooledEngine(mode="shared", pools="2", config=CONFIG)
    eng.add_model("a", MODELS[A].config, MODELS[A].weights)
    eng.add_model("b", MODELS[B].config, MODELS[B].weights)
    assert list(eng.groups[0].geoms) == ["a"] and list(eng.groups[1].geoms) == ["b"]
    ha, hb = eng.submit(make_request("a", PA, 8)), eng.submit(make_request("b", PB, 12))
    assert _tokens(ha) == _reference(A, PA, 8) and _tokens(hb) == _reference(B, PB, 12)
    yield eng
    eng.shutdown(timeout=0)


def test_a_slow_group_does_not_hold_up_another_groups_tokens(two_devices) -> None:
    eng = two_devices
    g0 = eng.groups[0]
    slow: dict[str, float] = {}
    result = g0.result

    def slow_result():  # group 0's next step takes 2 s more (a compile, a big prefill)
        if "start" not in slow:
            slow["start"] = time.time()
            time.sleep(2.0)
            slow["end"] = time.time()
        return result()

    g0.result = slow_result
    try:
        ha = eng.submit(make_request("a", PA, 8))
        assert _wait(lambda: "start" in slow)
        hb = eng.submit(make_request("b", PB, 12))  # the same programs as the warm-up: no compile
        events = list(hb.events())
        assert _wait(lambda: "end" in slow)
        inside = [ev for ev in events if ev.token_id is not None and ev.timestamp < slow["end"]]
        assert len(inside) >= 3, [(ev.timestamp - slow["start"]) for ev in events]
        assert [ev.token_id for ev in events if ev.token_id is not None] == _reference(B, PB, 12)
        assert _tokens(ha) == _reference(A, PA, 8)
    finally:
        del g0.result


def test_cancel_unload_readd_and_stats_across_groups(two_devices) -> None:
    eng = two_devices
    before = eng.stats()
    ha, hb = eng.submit(make_request("a", PA, 200)), eng.submit(make_request("b", PB, 200))
    for h in (ha, hb):
        ev = h.next_event(timeout=120)
        assert ev is not None and ev.token_id is not None and not ev.final
    assert _wait(lambda: eng.stats().running == 2)
    pages = _pages(eng)
    assert set(pages) == {"group0", "group1"} and all(n > 0 for n in pages.values())

    assert hb.cancel()  # group 1's request: its pages free, group 0's request streams on
    assert list(hb.events())[-1].finish_reason == FINISH_CANCELLED
    assert _wait(lambda: _pages(eng)["group1"] == 0)
    ev = ha.next_event(timeout=60)
    assert ev is not None and not ev.final

    assert eng.unload_model("a") == 1  # group 0's model: its request fails, group 1 serves on
    assert list(ha.events())[-1].finish_reason == FINISH_ERROR
    assert _tokens(eng.submit(make_request("b", PB, 6))) == _reference(B, PB, 6)
    assert _wait(lambda: _pages(eng) == {"group0": 0, "group1": 0} and not eng.groups[0].geoms)

    eng.add_model("a", MODELS[A].config, MODELS[A].weights)  # back onto the emptier device
    assert list(eng.groups[0].geoms) == ["a"]
    assert _tokens(eng.submit(make_request("a", PA, 8))) == _reference(A, PA, 8)
    st = eng.stats()
    assert st.models == ("b", "a") and st.running == 0 and st.queue_depth == 0
    assert (st.cancelled, st.failed, st.completed) == (
        before.cancelled + 1, before.failed + 1, before.completed + 2)
    assert st.tokens_generated > before.tokens_generated


def test_shutdown_joins_every_group_worker() -> None:
    eng = PooledEngine(mode="shared", pools="2", config=CONFIG)
    workers = list(eng._workers)
    assert len(workers) == 2 and all(t.is_alive() for t in workers)
    eng.shutdown()
    assert not any(t.is_alive() for t in workers)
