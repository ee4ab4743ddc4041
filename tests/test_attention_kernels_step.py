"""The engine's step programs route their attention through `pallas_kernels.dispatch` with the
spec's `attention_kernels` (spies on the Mosaic GPU entry points while the programs are traced on
CPU under the interpret backend), and the engine and the runner refuse an unknown value."""

from __future__ import annotations

import jax
import pytest
from test_pooled_step_inplace import _inputs, _store

from crosspool_jax.errors import InvalidRequestError
from crosspool_jax.execution.pooled_step import LaneShape, StepSpec, build_step
from pallas_kernels import mla_decode_mgpu as mdm
from pallas_kernels import mla_prefill_mgpu as mpm
from pallas_kernels import prefill_mgpu as pm


class _Refuse:
    """Stands for a Mosaic entry point: counts its calls and refuses each (ValueError), so the
    dispatcher traces the Triton kernel instead."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kw):
        self.calls += 1
        raise ValueError("refused by the test")


def _traced_calls(monkeypatch, model: str, decode: bool, kernels: str) -> dict[str, int]:
    """Traces (lowers) a one-lane step program of demo `model` on a bf16 colocated store with
    `attention_kernels` = `kernels` under the interpret backend; the Mosaic entry points are
    spies that refuse (so the Triton kernels are traced too). Returns each spy's call count."""
    spies = {"gqa_prefill": _Refuse(), "mla_prefill": _Refuse(), "mla_decode": _Refuse()}
    monkeypatch.setattr(pm, "paged_prefill_attention_mgpu", spies["gqa_prefill"])
    monkeypatch.setattr(mpm, "paged_mla_prefill_attention_mgpu", spies["mla_prefill"])
    monkeypatch.setattr(mdm, "paged_mla_decode_attention_mgpu", spies["mla_decode"])
    store = _store(True)
    lane = LaneShape(store.models[model].cls, 1, 2, 2 if decode else 8, 4)
    spec = StepSpec((lane,), decode, 1, "interpret", attention_kernels=kernels)
    build_step(spec, store, "cpu").lower(store.arena, (_inputs(store, model, lane, decode),))
    return {k: s.calls for k, s in spies.items()}


@pytest.mark.parametrize(("model", "decode", "asked"), [
    ("demo-qwen3-moe", False, "gqa_prefill"),
    ("demo-deepseek-v3", False, "mla_prefill"),
    ("demo-deepseek-v3", True, "mla_decode"),
])
def test_step_programs_route_attention(monkeypatch, model, decode, asked):
    got = _traced_calls(monkeypatch, model, decode, "mosaic")
    assert got[asked] >= 1 and all(n == 0 for k, n in got.items() if k != asked), got
    assert sum(_traced_calls(monkeypatch, model, decode, "triton").values()) == 0
    assert sum(_traced_calls(monkeypatch, model, decode, "auto").values()) == 0  # not Hopper


def test_engine_refuses_unknown_kernels():
    from crosspool_jax.engine import EngineConfig, resolve_config, runner_kwargs
    from crosspool_jax.execution.pool_runner import GroupRunner
    from pallas_kernels.page_layout import PoolLayout

    with pytest.raises(InvalidRequestError, match="attention_kernels"):
        runner_kwargs(resolve_config(EngineConfig(attention_kernels="cuda"), "cpu"), "cpu")
    default = resolve_config(EngineConfig(), "cpu")
    assert runner_kwargs(default, "cpu")["attention_kernels"] == "auto"  # the default
    with pytest.raises(ValueError, match="attention_kernels"):
        GroupRunner(None, PoolLayout(16384, "float32", 64, 64), 16, colocated=jax.devices()[0],
                    attention_kernels="cuda")


@pytest.mark.parametrize(("model", "entry"), [
    ("demo-deepseek-v3", (mdm, "paged_mla_decode_attention_mgpu")),
    ("demo-qwen3-moe", (pm, "paged_prefill_attention_mgpu")),  # the Mosaic GQA prefill
])
def test_engine_tokens_equal_across_kernels(monkeypatch, model, entry):
    """A bf16 demo model generates the same greedy tokens with the Mosaic GPU kernels (run by
    Mosaic GPU's interpreter: MLA prefill and decode) as with the Triton kernels (interpreted
    Pallas): prefill chunks of 16 tokens over a 40-token prompt, then decode calls."""
    import jax.numpy as jnp

    from crosspool_jax.demo import demo_models
    from crosspool_jax.execution.pool_runner import GroupRunner
    from crosspool_jax.execution.sampling import SamplingParams
    from pallas_kernels.page_layout import PoolLayout

    module, name = entry
    real, calls = getattr(module, name), []

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, counted)
    m = demo_models()[model]
    weights = jax.tree.map(lambda a: a.astype(jnp.bfloat16), m.weights)
    prompt = [3 + (7 * i) % 200 for i in range(40)]
    tokens = {}
    for kernels in ("triton", "mosaic"):
        r = GroupRunner(None, PoolLayout(16384, "bfloat16", 64, 512), 256,
                        colocated=jax.devices()[0], platform="cpu", backend="interpret",
                        prefill_chunk=16, max_prefill_tokens=16, warm_programs=0,
                        attention_kernels=kernels)
        r.add_model(model, m.config, weights)
        r.submit("a", model, prompt, 6, SamplingParams())
        got: list[int] = []
        while r.has_work:
            got += r.step().tokens.get("a", [])
        tokens[kernels] = got
        assert bool(calls) == (kernels == "mosaic")
    assert len(tokens["triton"]) == 6 and tokens["mosaic"] == tokens["triton"]


def test_a_mosaic_compile_failure_falls_back_to_triton(monkeypatch):
    """A program whose build with the Mosaic GPU attention fails compiles with the Triton kernels
    (held under its own spec; counted in `kernel_fallbacks`), and its lane's later programs of
    the same kind skip the Mosaic build; the tokens equal the reference. A Triton failure is
    raised."""
    from pooled_helpers import References, Req, build_runner, drive, f32

    from crosspool_jax.demo import demo_models
    from crosspool_jax.execution import step_programs
    from crosspool_jax.execution.sampling import SamplingParams

    m = demo_models()["demo-mixtral"]
    models = {"mix": (m.config, f32(m.weights))}
    real, tried = step_programs.compile_spec, []

    def failing_mosaic(spec, *args, **kw):
        tried.append((spec.decode, spec.attention_kernels))
        if spec.attention_kernels != "triton":
            raise RuntimeError("Mosaic GPU lowering failed (the test's)\nsecond line")
        return real(spec, *args, **kw)

    monkeypatch.setattr(step_programs, "compile_spec", failing_mosaic)
    # fallback on: the next page bucket's decode program compiles in the background (below)
    runner = build_runner(models, split="1+1", kv_pages=32, attention_kernels="mosaic", fallback=True)
    reqs = [Req("a", "mix", tuple(range(3, 40)), 6), Req("b", "mix", tuple(range(50, 60)), 9)]
    log = drive(runner, reqs)
    refs = References(models)
    for r in reqs:
        assert log.tokens[r.rid] == refs(r)[0]
    # one failed Mosaic build per kind (prefill, decode), every other build straight to Triton:
    # the decode program of the next page bucket (compiled in the background) among them
    assert runner.wait_background(timeout=300)
    runner._poll_background()  # a compile that ended after the last step's lookup: into `_ready`
    held = {**runner._programs, **runner._ready}
    assert sorted(t for t in tried if t[1] == "mosaic") == [(False, "mosaic"), (True, "mosaic")]
    assert runner.kernel_fallbacks == 2
    assert len([t for t in tried if t[1] == "triton"]) == len(held) >= 3
    assert all(sp.attention_kernels == "mosaic" for sp in held)  # held under the spec asked

    def failing(spec, *args, **kw):
        raise RuntimeError(f"{spec.attention_kernels} failed")

    monkeypatch.setattr(step_programs, "compile_spec", failing)
    for kernels in ("triton", "mosaic"):  # a failure with the Triton kernels is raised
        other = build_runner(models, split="1+1", kv_pages=32, attention_kernels=kernels)
        other.submit("c", "mix", (3, 4, 5), 2, SamplingParams())
        with pytest.raises(RuntimeError, match=r"^triton failed$"):
            other.step()
