"""The engine's host-scheduled step (`crosspool_jax.execution.host_step`) and the `auto` strategy choice.

The host-scheduled step runs the same StepSpec, arena and inputs as the lowered one-program step,
as per-layer calls on the KV mesh and the weights mesh with transfers between them; it must give
the reference path's tokens for every family (MLA and split KV included), on an uneven split,
with ping-pong lanes, keep the arena in place, and the engine must say which strategy it runs.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from pooled_helpers import References, Req, build_runner, drive, f32
from test_pooled_step import DSV3, MIX, QWEN, _prompt, assert_matches_reference, demo_requests

from crosspool_jax.demo import demo_models
from crosspool_jax.engine import EngineConfig, PooledEngine
from crosspool_jax.engine_api import make_request
from crosspool_jax.errors import InvalidRequestError
from crosspool_jax.execution.host_step import EXECUTIONS, HostScheduledStep, MeasuredChoice, StrategyTrial
from crosspool_jax.models.reference import ReferenceGenerator


@pytest.fixture(scope="module")
def demo():
    dm = demo_models()
    models = {name: (m.config, f32(m.weights)) for name, m in dm.items()}
    return models, References(models)


def test_host_step_reproduces_reference_uneven_split_with_split_kv(demo) -> None:
    models, refs = demo
    # 3 KV devices + 2 weights devices; 6 pages per KV device: ds-long's 57 tokens need 4 rows of
    # its pages, more than one device holds, so its KV is split over KV devices (extras combine)
    runner = build_runner(models, split="3+2", kv_pages=6, prefill_chunk=32, execution="host")
    reqs = demo_requests(refs)
    log = drive(runner, reqs)
    assert_matches_reference(refs, reqs, log)  # greedy, sampled (seeded) and stop-id requests
    assert log.max_segments["ds-long"] >= 2, log.max_segments
    assert runner.kv.pool_stats().pages_used == 0
    held = runner.execution_summary()
    assert held["host"] >= 2 and held["lowered"] == 0 and held["measuring"] == 0, held
    for prog in runner._programs.values():
        assert isinstance(prog, HostScheduledStep)


def test_host_step_ping_pong_lanes_and_calls_per_step(demo) -> None:
    models, refs = demo
    mix = {MIX: models[MIX], QWEN: models[QWEN]}
    runner = build_runner(mix, split="2+2", kv_pages=16, prefill_chunk=32, execution="host",
                          micro_batches=2, steps_per_call=4)
    reqs = [Req(f"m{i}", MIX, _prompt(40 + i, 3 + i), 9) for i in range(4)]
    reqs += [Req(f"q{i}", QWEN, _prompt(50 + i, 4 + i), 7) for i in range(4)]
    log = drive(runner, reqs)
    assert_matches_reference(refs, reqs, log)
    # one class per program: each decode program holds one class's ping-pong pair (2 lanes of a
    # 2-layer model): one begin + 2 calls per layer + one end per lane per token; 2 transfers at the
    # begin and 2 per layer
    decode = [p for s, p in runner._programs.items() if s.decode]
    assert {len(p.spec.lanes) for p in decode} == {2}, [(s.decode, len(s.lanes)) for s in runner._programs]
    assert {len({sh.cls for sh in p.spec.lanes}) for p in decode} == {1}
    assert len({p.spec.lanes[0].cls for p in decode}) == 2  # both classes ran, in programs of their own
    for prog in decode:
        layers = [sh.cls.config.num_layers for sh in prog.spec.lanes]
        assert prog.calls_per_step == sum(2 + 2 * n for n in layers)
        assert prog.transfers_per_step == sum(2 + 2 * n for n in layers)


def test_host_step_keeps_the_arena_in_place(demo) -> None:
    models, refs = demo
    runner = build_runner({MIX: models[MIX]}, split="2+2", kv_pages=16, prefill_chunk=32,
                          execution="host")
    ptrs = sorted(s.data.unsafe_buffer_pointer() for s in runner.store.arena.addressable_shards)
    reqs = [Req("a", MIX, _prompt(7, 6), 6), Req("b", MIX, _prompt(8, 9), 6)]
    log = drive(runner, reqs)
    assert_matches_reference(refs, reqs, log)
    after = sorted(s.data.unsafe_buffer_pointer() for s in runner.store.arena.addressable_shards)
    assert after == ptrs  # every KV append wrote the donated buffers; no arena copy was kept


def test_host_step_needs_a_crosspool_topology(demo) -> None:
    models, _ = demo
    runner = build_runner({MIX: models[MIX]}, split=None, colocated=jax.devices()[0], kv_pages=8,
                          execution="host")
    assert runner.execution == "lowered"  # one device: nothing to schedule between pools
    spec = next(iter(runner.bucket_specs(32, 1)))
    with pytest.raises(ValueError, match="crosspool topology"):
        HostScheduledStep(spec, runner.store, "cpu")


def test_measured_choice_keeps_the_faster_strategy() -> None:
    calls: list[str] = []

    def fake(name: str, seconds: float):
        def run(arena, inputs):
            calls.append(name)
            time.sleep(seconds)
            return arena, (np.zeros((1, 2), np.int32),)
        return run

    arena = jax.numpy.zeros(4)
    trial = StrategyTrial(trials=2)
    choice = MeasuredChoice(fake("lowered", 0.03), fake("host", 0.001), trial)
    for _ in range(6):
        assert choice.choice is None
        choice(arena, ())
    # 3 calls each (the first of each untimed: it would compile), then the faster keeps running
    assert sorted(calls) == ["host"] * 3 + ["lowered"] * 3
    assert choice.choice == trial.choice == "host"
    assert len(trial.seconds["host"]) == len(trial.seconds["lowered"]) == 2
    choice(arena, ())
    assert calls[-1] == "host"
    # a second shape of the same lane structure shares the verdict: it runs host from its first call
    other = MeasuredChoice(fake("lowered", 0.0), fake("host", 0.0), trial)
    other(arena, ())
    assert calls[-1] == "host" and len(calls) == 8


def test_engine_auto_strategy_matches_reference_and_says_what_it_runs() -> None:
    dm = demo_models()
    eng = PooledEngine(mode="crosspool", pools="2+2",
                       config=EngineConfig(arena_bytes=8 << 20, attention_backend="reference",
                                           execution="auto"))
    try:
        for n in (MIX, DSV3):
            m = dm[n]
            eng.add_model(n, m.config, m.weights, m.tokenizer)
        prompts = {MIX: [5, 9, 33, 7], DSV3: [7, 9, 3]}
        # 40 tokens: ten 4-token decode calls of one shape (both models in it), enough to run each
        # strategy once to compile and twice timed
        handles = {n: eng.submit(make_request(n, p, 40)) for n, p in prompts.items()}
        for n, h in handles.items():
            toks = [ev.token_id for ev in h.events() if ev.token_id is not None]
            m = dm[n]
            w = jax.tree.map(lambda a: a.astype(np.float32), m.weights)
            assert toks == list(ReferenceGenerator(m.config, w).generate(prompts[n], 40).token_ids), n
        held = eng.groups[0].execution_summary()
        assert held["lowered"] + held["host"] >= 1, held  # at least one shape settled by measurement
        assert "auto step strategy" in eng.describe() and "lowered" in eng.describe()
    finally:
        eng.shutdown(timeout=0)


def test_engine_execution_setting_errors() -> None:
    with pytest.raises(InvalidRequestError, match="execution must be one of"):
        PooledEngine(mode="crosspool", pools="1+1", config=EngineConfig(execution="fast"))
    with pytest.raises(InvalidRequestError, match="mode crosspool"):
        PooledEngine(mode="shared", pools="1", config=EngineConfig(execution="host"))
    eng = PooledEngine(mode="shared", pools="1", config=EngineConfig(arena_bytes=4 << 20, execution="auto"))
    try:
        assert "one-program step (lowered)" in eng.describe()
    finally:
        eng.shutdown(timeout=0)


def test_settings_know_the_engine_strategies() -> None:
    from serving.settings import EXECUTIONS as SERVING_EXECUTIONS
    from serving.settings import SettingsError, check_engine_value

    assert SERVING_EXECUTIONS == EXECUTIONS
    assert check_engine_value("execution", "host", "--execution") == "host"
    with pytest.raises(SettingsError, match="--execution"):
        check_engine_value("execution", "fastest", "--execution")

