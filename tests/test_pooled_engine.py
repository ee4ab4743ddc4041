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
from crosspool_jax.models.reference import ReferenceGenerator

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


@pytest.mark.parametrize("preemption", ["prefer_swap"])  # recompute: tests/test_pooled_step.py
def test_preemption_keeps_tokens(preemption: str) -> None:
    """A KV pool too small for three concurrent requests: the planner preempts (swap to host and
    back, or drop and recompute) and every request still equals the reference."""
    import dataclasses

    import numpy as np

    from crosspool_jax.execution.pool_runner import GroupRunner
    from crosspool_jax.execution.sampling import SamplingParams
    from crosspool_jax.memory.arena import model_rows
    from crosspool_jax.memory.planner import PlannerConfig, PreemptionChoice
    from crosspool_jax.memory.topology import PoolTopology, Role
    from pallas_kernels.page_layout import PoolLayout

    layout = PoolLayout(4096, "float32", 16, 1)
    topo = PoolTopology.split("2+2")
    w32 = {n: jax.tree.map(lambda a: a.astype(jnp.float32), m.weights) for n, m in MODELS.items()}
    rows = {r: sum(model_rows(m.config, w32[n], 2, layout)[r] for n, m in MODELS.items()) for r in Role}
    a_pages = -(-rows[Role.KV] // layout.rows_per_page) + 1
    f_pages = -(-rows[Role.WEIGHTS] // layout.rows_per_page) + 1
    runner = GroupRunner(topo, dataclasses.replace(layout, num_pages=max(f_pages, a_pages + 6)), a_pages,
                         backend="reference", kv_pages_per_device=6, prefill_chunk=16,
                         host_swap_pages=64 if preemption == "prefer_swap" else 0,
                         planner_config=PlannerConfig(preemption=PreemptionChoice(preemption)),
                         warm_programs=0)  # no background warm-ups: this test is about preemption
    for n, m in MODELS.items():
        runner.add_model(n, m.config, w32[n])
    rng = np.random.default_rng(0)
    new = 14  # tokens per request: enough to preempt (20 preempted too, at 6x the test's time)
    prompts = {n: [int(x) for x in rng.integers(1, 250, 30 + 7 * i)] for i, n in enumerate(MODELS)}
    for n in MODELS:
        runner.submit(n, n, prompts[n], new, SamplingParams())
    out: dict[str, list[int]] = {}
    preempted = 0
    while runner.has_work:
        res = runner.step()
        preempted += len(res.preempted)
        for rid, toks in res.tokens.items():
            out.setdefault(rid, []).extend(toks)
    assert preempted > 0
    assert (runner.swapped_pages > 0) == (preemption == "prefer_swap")
    for n in MODELS:
        assert out[n] == _reference(n, prompts[n], new), n
    assert runner.kv.pool_stats().pages_used == 0 and runner.kv.pool_stats().host_pages_used == 0


def test_load_and_unload_while_another_model_streams() -> None:
    """Loading and unloading a model at runtime does not disturb another model's live request."""
    eng = PooledEngine(mode="crosspool", pools="2+2",
                       config=EngineConfig(arena_bytes=8 << 20, attention_backend="reference",
                                           steps_per_call=2))
    try:
        a, b = MODELS["demo-mixtral"], MODELS["demo-deepseek-v3"]
        eng.add_model("a", a.config, a.weights)
        h = eng.submit(make_request("a", PROMPTS["demo-mixtral"], 24))
        first = h.next_event(timeout=120)
        assert first is not None and first.token_id is not None
        eng.add_model("b", b.config, b.weights)  # while "a" is generating
        hb = eng.submit(make_request("b", PROMPTS["demo-deepseek-v3"], 6))
        got_b = [ev.token_id for ev in hb.events() if ev.token_id is not None]
        assert eng.unload_model("b") == 0
        got_a = [first.token_id] + [ev.token_id for ev in h.events() if ev.token_id is not None]
        assert got_a == _reference("demo-mixtral", PROMPTS["demo-mixtral"], 24)
        assert got_b == _reference("demo-deepseek-v3", PROMPTS["demo-deepseek-v3"], 6)
        assert [m.name for m in eng.list_models()] == ["a"]
    finally:
        eng.shutdown(timeout=0)


def test_cli_generate_sends_the_prompt_to_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    """`crosspool generate --mode crosspool --model A --model B`: one JSON line per model, each equal
    to that model's reference generation."""
    import json

    from checkpoints import load_model
    from serving.cli import main
    from tests.conftest import HF_FIXTURES

    paths = [HF_FIXTURES / "olmoe_mha4_top2_clip", HF_FIXTURES / "qwen2moe_gqa6x2_top2_shared40"]
    if not all(p.is_dir() for p in paths):
        pytest.skip(f"HF fixtures missing at {HF_FIXTURES}")
    args = ["generate", "--mode", "crosspool", "--pools", "2+2", "--prompt-ids", "1,2,3,4,5",
            "--max-new-tokens", "6", "--stop-ids", ""]
    for p in paths:
        args += ["--model", str(p)]
    assert main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["model"] for x in lines] == [str(p) for p in paths]
    for p, line in zip(paths, lines, strict=True):
        m = load_model(p)
        ref = ReferenceGenerator(m.config, m.weights).generate([1, 2, 3, 4, 5], 6)
        assert line["token_ids"] == list(ref.token_ids)
