"""Models of one class share step programs and lanes (crosspool_jax/execution/pooled_step.py, "Lanes and model
classes"): several models with equal configs but different weights run as groups of ONE lane, each
row reading its own model's weights, norms and biases, and the outputs equal each model's reference
token for token. A model added later reuses the compiled programs of its class.

Norm weights are perturbed per model (random init sets them to 1), so a row that read another
model's norm would change the output.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from pooled_helpers import References, Req, build_runner, drive, f32

from crosspool_jax.demo import demo_configs
from crosspool_jax.execution import pooled_step
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.execution.step_programs import ShapeBuckets
from crosspool_jax.models.config import Family, FFNKind, QKNorm
from crosspool_jax.models.params import init_random_weights

QWEN3 = demo_configs()["demo-qwen3-moe"]  # per-head q/k norms
MIX = demo_configs()["demo-mixtral"]
# Qwen2-MoE-like: q/k/v and output biases, full-width q/k norms, a dense layer, a gated shared expert
QWEN2 = dataclasses.replace(
    QWEN3, family=Family.QWEN2_MOE, qkv_bias=True, o_bias=True, qk_norm=QKNorm.FULL,
    ffn_kinds=(FFNKind.DENSE, FFNKind.MOE), dense_intermediate_size=96, shared_intermediate_size=48,
    shared_expert_gate=True)
SAMPLED = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=77)


def _weights(cfg, seed: int):
    """Random weights with every norm and bias perturbed per model."""
    w = init_random_weights(cfg, seed=seed, scale=0.5)
    rng = np.random.default_rng(seed + 1000)

    def perturb(path, a):
        name = jax.tree_util.keystr(path)
        if "norm" in name or name.rsplit("'", 2)[-2].startswith("b"):
            return np.asarray(a) * (1.0 + 0.4 * rng.standard_normal(a.shape)).astype(np.float32)
        return a

    return f32(jax.tree_util.tree_map_with_path(perturb, w))


def _prompt(seed: int, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in np.random.default_rng(seed).integers(3, 250, n))


MODELS = {
    "q3-a": (QWEN3, _weights(QWEN3, 11)), "q3-b": (QWEN3, _weights(QWEN3, 12)),
    "q3-c": (QWEN3, _weights(QWEN3, 13)),
    "q2-a": (QWEN2, _weights(QWEN2, 21)), "q2-b": (QWEN2, _weights(QWEN2, 22)),
    "mix": (MIX, _weights(MIX, 31)),
}
LATE = {"q3-d": (QWEN3, _weights(QWEN3, 14))}


def _requests(tag: str, models: list[str]) -> list[Req]:
    out = []
    for i, m in enumerate(models):
        out.append(Req(f"{m}-x{tag}", m, _prompt(100 + i, 3 + 2 * i), 6))
        out.append(Req(f"{m}-y{tag}", m, _prompt(200 + i, 9 - i), 5, SAMPLED if i % 2 else SamplingParams()))
    return out


@pytest.fixture(scope="module")
def refs():
    return References({**MODELS, **LATE})


def _check(refs: References, reqs: list[Req], log) -> None:
    for r in reqs:
        want, reason = refs(r)
        assert log.tokens[r.rid] == want, f"{r.rid}: reference {want}, pooled {log.tokens[r.rid]}"
        assert log.finished[r.rid][0] == reason


def _max_groups(runner) -> int:
    return max(ln.groups for spec in runner._programs for ln in spec.lanes)


def test_one_class_runs_as_one_lane_and_matches_reference(refs, monkeypatch) -> None:
    runner = build_runner({**MODELS, **LATE}, kv_pages=16, prefill_chunk=16)
    runner.remove_model("q3-d")  # added back once the programs are compiled
    classes = {runner.store.models[m].cls for m in MODELS}
    assert len(classes) == 3  # qwen3-like x3, qwen2-like x2, mixtral
    reqs = _requests("", list(MODELS))
    log = drive(runner, reqs)
    _check(refs, reqs, log)
    assert _max_groups(runner) == 4  # the three qwen3-like models in one lane (padded to 4)
    for spec in runner._programs:  # never two lanes of one class in one program (1 micro-batch)
        assert len({ln.cls for ln in spec.lanes}) == len(spec.lanes)
    assert runner.kv.pool_stats().pages_used == 0

    # a model of a known class loads without invalidating the compiled programs: the same
    # requests with q3-d for q3-a reuse them (only a shape the first run never had compiles; the
    # new model's different tokens can end a request at another step)
    before = set(runner._programs)
    built: list = []
    build = pooled_step.build_step  # what every step program is built by (`compile_spec`)

    def spy(spec, store, platform):
        built.append(spec)
        return build(spec, store, platform)

    monkeypatch.setattr(pooled_step, "build_step", spy)
    runner.add_model("q3-d", *LATE["q3-d"])
    again = [dataclasses.replace(r, rid=r.rid.replace("q3-a", "q3-d") + "-2",
                                 model="q3-d" if r.model == "q3-a" else r.model)
             for r in _requests("", list(MODELS))]
    log2 = drive(runner, again)
    _check(refs, again, log2)
    assert not before & set(built)
    assert len(built) < len(before)


def test_colocated_lane_of_two_models_matches_reference(refs) -> None:
    models = {m: MODELS[m] for m in ("q2-a", "q2-b")}
    runner = build_runner(models, split=None, colocated=jax.devices()[0], kv_pages=16,
                          prefill_chunk=16, micro_batches=2)
    reqs = [*_requests("-c", list(models)), Req("q2-a-z", "q2-a", _prompt(7, 4), 6)]
    log = drive(runner, reqs)
    _check(refs, reqs, log)
    assert _max_groups(runner) == 2
    assert runner.kv.pool_stats().pages_used == 0


def test_placed_groups_and_coarse_buckets_match_reference(refs) -> None:
    """The GPU defaults (`ShapeBuckets.coarse()`: G = every placed model of the class, wide
    slot/page/token buckets) on CPU: lanes keep the placed models' groups even when only some of
    them have work, and outputs still equal the reference."""
    models = {m: MODELS[m] for m in ("q3-a", "q3-b", "q3-c", "mix")}
    runner = build_runner(models, split=None, colocated=jax.devices()[0], kv_pages=24,
                          prefill_chunk=16, buckets=ShapeBuckets.coarse())
    reqs = [r for r in _requests("-p", ["q3-a", "q3-b", "q3-c", "mix"]) if r.model in ("q3-b", "mix")]
    log = drive(runner, reqs)
    _check(refs, reqs, log)
    lanes = [ln for spec in runner._programs for ln in spec.lanes]
    assert {ln.groups for ln in lanes if ln.cls.config.family == Family.QWEN3_MOE} == {4}
    assert all(ln.slots >= 8 and ln.max_pages >= 16 for ln in lanes)
    assert runner.kv.pool_stats().pages_used == 0


def test_precompiled_programs_serve_a_run_without_compiling(refs) -> None:
    """`GroupRunner.precompile(bucket_specs(...))` compiles the one-lane grid ahead of time (in
    threads); a run inside the grid then compiles nothing and still equals the reference."""
    models = {m: MODELS[m] for m in ("q3-a", "q3-b")}
    buckets = ShapeBuckets(slots_floor=2, tokens_floor=16, pages_floor=2, growth=4, groups="placed",
                           fixed_steps=True)
    runner = build_runner(models, split="1+1", kv_pages=24, prefill_chunk=16, max_prefill_tokens=16,
                          buckets=buckets)
    specs = runner.bucket_specs(max_context=16 * 4, max_slots=4)
    assert len(specs) == len(set(specs)) and all(len(sp.lanes) == 1 for sp in specs)
    runner.precompile(specs, threads=2)
    built = runner.programs_built
    assert built == len(specs)
    reqs = _requests("-aot", ["q3-a", "q3-b"])
    log = drive(runner, reqs)
    _check(refs, reqs, log)
    assert runner.programs_built == built  # every shape of the run was precompiled
    assert runner.kv.pool_stats().pages_used == 0


def test_the_precompile_grid_covers_its_whole_width() -> None:
    """`bucket_specs` holds, at each page bucket, the lane's top programs (here the ping-pong
    decode pairs of micro_batches = 2; on GPU also the persistent-schedule decode), so once the
    grid is compiled the lane's covered width is its widest page bucket and no prompt is held for a
    background compile. (Nothing is compiled: the specs are marked held.)"""
    models = {m: MODELS[m] for m in ("q3-a", "q3-b")}
    buckets = ShapeBuckets(slots_floor=2, tokens_floor=16, pages_floor=2, growth=4, groups="placed",
                           fixed_steps=True)
    runner = build_runner(models, split=None, colocated=jax.devices()[0], kv_pages=16,
                          max_prefill_tokens=16, buckets=buckets, micro_batches=2, warm_slots=4)
    specs = runner.bucket_specs(max_context=16 * 40, max_slots=4)
    assert len(specs) == len(set(specs))
    key = runner._lane_key("q3-a")
    widths = sorted({ln.max_pages for sp in specs for ln in sp.lanes})
    tpp = runner.geoms["q3-a"].tokens_per_page
    assert widths[-1] >= 16 * 40 // tpp and widths == [2 * 4**i for i in range(len(widths))]
    for w in widths:
        top = runner._top_specs(key, w)
        assert any(len(sp.lanes) == 2 for sp in top)  # the ping-pong pair
        assert all(sp in specs for sp in top)
    for sp in specs:  # as if precompiled
        runner._programs[sp] = None
    runner.held_generation += 1
    assert runner._covered_width(key) == widths[-1]


def test_programs_hold_one_class_whatever_the_mix_of_models(refs) -> None:
    """A step runs one program per model class (never a mix), so the programs compiled for a
    class's shapes do not depend on which other models have work: many mixes of three classes
    compile exactly the programs the classes need alone, and outputs equal the reference."""
    models = {m: MODELS[m] for m in ("q3-a", "q3-b", "q2-a", "mix")}
    buckets = ShapeBuckets(slots_floor=4, tokens_floor=32, pages_floor=4, growth=4, groups="placed",
                           fixed_steps=True)
    runner = build_runner(models, split="1+1", kv_pages=48, prefill_chunk=16, max_prefill_tokens=32,
                          buckets=buckets)
    mixes = [["q3-a"], ["q2-a"], ["mix"], ["q3-a", "q2-a"], ["q3-b", "mix"], ["q2-a", "mix"],
             ["q3-a", "q3-b", "q2-a", "mix"]]
    for i, mix in enumerate(mixes):
        reqs = [r for r in _requests(f"-mix{i}", list(models)) if r.model in mix]
        log = drive(runner, reqs)
        _check(refs, reqs, log)
        if i == 2:  # every class has run alone
            alone = set(runner._programs)
    assert all(len({ln.cls for ln in sp.lanes}) == 1 for sp in runner._programs)
    assert set(runner._programs) == alone  # the mixes compiled nothing new
    # each program entered service once: compiled on the serving path or, when a larger program
    # covered its first calls, in the background (which of the two is a matter of timing)
    assert runner.programs_built + runner.background_built == len(alone)
    assert runner.kv.pool_stats().pages_used == 0
