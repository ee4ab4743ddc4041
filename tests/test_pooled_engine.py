"""PooledEngine in its three modes: concurrent greedy requests to 3 models of different families
reproduce the reference path token for token; a cancel frees the request's pages."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import pytest

from crosspool_jax.demo import demo_models
from crosspool_jax.engine import EngineConfig, PooledEngine
from crosspool_jax.engine_api import FINISH_CANCELLED, make_request
from crosspool_jax.reference import ReferenceGenerator

MODELS = demo_models()
PROMPTS = {"demo-mixtral": [5, 9, 33, 7], "demo-qwen3-moe": [6, 10, 33, 7, 2, 100],
           "demo-deepseek-v3": [7, 9, 3]}


def _reference(name: str, prompt: list[int], n: int) -> list[int]:
    m = MODELS[name]
    w = jax.tree.map(lambda a: a.astype(jnp.float32), m.weights)
    return list(ReferenceGenerator(m.config, w).generate(prompt, n).token_ids)


@pytest.mark.parametrize(("mode", "pools"), [("crosspool", "4+4"), ("shared", "3"), ("static", "2")])
def test_modes_match_reference(mode: str, pools: str) -> None:
    eng = PooledEngine(mode=mode, pools=pools,
                       config=EngineConfig(arena_bytes=8 << 20, attention_backend="reference"))
    try:
        for n, m in MODELS.items():
            eng.add_model(n, m.config, m.weights, m.tokenizer)
        handles = {n: eng.submit(make_request(n, p, 8)) for n, p in PROMPTS.items()}
        for n, h in handles.items():
            toks = [ev.token_id for ev in h.events() if ev.token_id is not None]
            assert toks == _reference(n, PROMPTS[n], 8), (mode, n)
        st = eng.stats()
        assert st.completed == 3 and all(used == 0 for _, used, _ in st.kv_pages)
    finally:
        eng.shutdown(timeout=0)


def test_cancel_frees_pages() -> None:
    eng = PooledEngine(mode="crosspool", pools="2+2",
                       config=EngineConfig(arena_bytes=8 << 20, attention_backend="reference",
                                           steps_per_call=1))
    try:
        m = MODELS["demo-mixtral"]
        eng.add_model("m", m.config, m.weights)
        h = eng.submit(make_request("m", [1, 2, 3], 200))
        first = h.next_event(timeout=120)
        assert first is not None and first.token_id is not None
        assert sum(used for _, used, _ in eng.stats().kv_pages) > 0
        assert h.cancel()
        final = [ev for ev in h.events()][-1]
        assert final.finish_reason == FINISH_CANCELLED
        deadline = time.monotonic() + 60
        while sum(used for _, used, _ in eng.stats().kv_pages) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(used for _, used, _ in eng.stats().kv_pages) == 0
    finally:
        eng.shutdown(timeout=0)
