"""Mixed steps (`GroupRunner(mixed_steps=True)`): in a step that prefills a lane's prompts, the lane's
decoding requests take their next token as one-token rows of the same prefill call (the input token
read on the device when it is still in flight). The tokens equal the reference path's, greedy and
sampled, on one colocated device and on a KV+weights split; lanes with nothing to prefill keep
their K-token decode calls; the decode rows' share comes out of the step's prompt-token budget."""

from __future__ import annotations

import jax
import pytest
from pooled_helpers import References, Req, build_runner, drive, f32

from crosspool_jax.demo import demo_models
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.memory.planner import KVPlanner, PlannerError

MIX = demo_models()["demo-mixtral"]
QWEN = demo_models()["demo-qwen3-moe"]
MODELS = {"mix": (MIX.config, f32(MIX.weights)), "qwen": (QWEN.config, f32(QWEN.weights))}
SAMPLED = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=77)

# short prompts decode while the long ones prefill 8 tokens a step: most steps mix both
REQS = [
    Req("a", "mix", tuple(range(3, 9)), 9),
    Req("b", "mix", tuple(range(20, 53)), 4),
    Req("c", "mix", tuple(range(5, 12)), 8, SAMPLED),
    Req("d", "qwen", tuple(range(7, 12)), 9),  # another class: its lane has nothing to prefill
    Req("e", "mix", tuple(range(30, 51)), 4, SAMPLED),
]


@pytest.mark.parametrize("topology", ["colocated", "split"])
def test_mixed_steps_equal_the_reference(topology: str) -> None:
    kw = dict(kv_pages=64, prefill_chunk=8, max_prefill_tokens=8, mixed_steps=True)
    runner = (build_runner(MODELS, split=None, colocated=jax.devices()[0], **kw) if topology == "colocated"
              else build_runner(MODELS, split="1+1", **kw))
    log = drive(runner, REQS)
    refs = References(MODELS)
    for r in REQS:
        assert log.tokens[r.rid] == refs(r)[0], r.rid
        assert log.finished[r.rid][0] == refs(r)[1]
    assert runner.mixed_rows > 0
    assert runner.kv.pool_stats().pages_used == 0


def test_mixed_lanes_take_one_token_and_their_rows_from_the_budget(monkeypatch) -> None:
    """While "b" prefills, "a" (same class) decodes one token a step inside the prefill call and the
    step's prompt budget shrinks by its row; "d" (another class, nothing to prefill) keeps K = 4."""
    runner = build_runner(MODELS, split=None, colocated=jax.devices()[0], kv_pages=64, prefill_chunk=8,
                          max_prefill_tokens=8, mixed_steps=True)
    seen = []
    step = KVPlanner.step

    def spy(self, inp):
        kv = {rid: self.info(rid).kv_len for rid in inp.decode_lengths}
        try:
            b_prefills = self.prefill_span("b") is not None
        except PlannerError:  # "b" ended and was forgotten
            b_prefills = False
        seen.append(({rid: n - kv[rid] for rid, n in inp.decode_lengths.items()}, inp.prefill_token_budget,
                     b_prefills))
        return step(self, inp)

    monkeypatch.setattr(KVPlanner, "step", spy)
    reqs = [Req("a", "mix", tuple(range(3, 9)), 14), Req("b", "mix", tuple(range(20, 61)), 5),
            Req("d", "qwen", tuple(range(7, 12)), 10)]
    log = drive(runner, reqs)
    refs = References(MODELS)
    for r in reqs:
        assert log.tokens[r.rid] == refs(r)[0], r.rid
    mixed = [(lengths, budget) for lengths, budget, b_prefills in seen if b_prefills and "a" in lengths]
    assert mixed, seen
    for lengths, budget in mixed:
        assert lengths["a"] == 1 and budget == 8 - 1  # only "a" folded: "d" is not counted
    assert any(lengths.get("d") == 4 for lengths, _ in mixed)  # "d" decodes K tokens meanwhile
    after = [lengths for lengths, _, b_prefills in seen if not b_prefills and "a" in lengths]
    assert after and all(n == 4 or n < 4 for n in (x["a"] for x in after))
    assert max(x["a"] for x in after) == 4  # back to K tokens per call once "b" is prefilled


def test_the_warm_box_holds_a_mixed_call_with_mixed_steps() -> None:
    """With mixed_steps the lane's top programs add the prefill program of one chunk in the box's
    slots (a chunk beside decode rows runs there, not padded to max_prefill_tokens)."""
    got = {}
    for mixed in (False, True):
        r = build_runner(MODELS, split=None, colocated=jax.devices()[0], kv_pages=64, prefill_chunk=16,
                         max_prefill_tokens=64, warm_slots=8, mixed_steps=mixed)
        got[mixed] = {(ln.slots, ln.tokens) for sp in r._top_specs(r._lane_key("mix"), 4) if not sp.decode
                      for ln in sp.lanes}
    bk = r.buckets
    chunk = (bk.round(8, bk.slots_floor), bk.round(16, bk.tokens_floor))
    assert chunk in got[True] and chunk not in got[False] and got[False] < got[True]


def test_decode_rows_run_in_the_decode_kernel_interpret() -> None:
    """With mixed_steps every prefill program runs its one-row segments (the decode rows) in the
    decode attention kernel (`StepSpec.one_row_decode`); with the Pallas kernels in interpret mode
    the mixed steps' tokens still equal the reference path's."""
    models = {"mix": MODELS["mix"]}
    runner = build_runner(models, split=None, colocated=jax.devices()[0], kv_pages=64, prefill_chunk=8,
                          max_prefill_tokens=8, mixed_steps=True, backend="interpret")
    reqs = [Req("a", "mix", tuple(range(3, 9)), 6), Req("b", "mix", tuple(range(20, 45)), 3)]
    log = drive(runner, reqs)
    refs = References(models)
    for r in reqs:
        assert log.tokens[r.rid] == refs(r)[0], r.rid
    assert runner.mixed_rows > 0
    prefill = [sp for sp in runner._programs if not sp.decode]
    assert prefill and all(sp.one_row_decode for sp in prefill)
    assert not any(sp.one_row_decode for sp in runner._programs if sp.decode)
    plain = build_runner(models, split=None, colocated=jax.devices()[0], kv_pages=64, prefill_chunk=8,
                         max_prefill_tokens=8)
    assert not plain._prefill_spec(plain._lane_key("mix")[0], 1, 8, 8, 4).one_row_decode
