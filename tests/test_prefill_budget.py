"""The step's prefill budget (`GroupRunner.prefill_budget`): while requests decode, a step prefills
the prompt tokens whose predicted seconds fit `prefill_share` x the measured decode call (before the
prefill fit has points: what the measured rate runs in that time), never less than one chunk
(prefill is not starved), never more than the ceiling; the fit of prefill seconds
(`prefill_cost.PrefillCostFit`) prices a long context's attention; the budget reaches the planner,
and a run under a small budget still equals the reference."""

from __future__ import annotations

import pytest
from pooled_helpers import References, Req, build_runner, drive, f32

from crosspool_jax.demo import demo_models
from crosspool_jax.execution.prefill_cost import (
    PrefillCostFit,
    PrefillWork,
    chunk_work,
    dense_flops_per_token,
)
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.memory.planner import KVPlanner, Phase
from crosspool_jax.models.costs import ModelCosts

MIX = demo_models()["demo-mixtral"]
MODELS = {"mix": (MIX.config, f32(MIX.weights))}

# a model whose token costs 1e9 FLOPs in its matmuls and 1e5 FLOPs per (query, context) pair
COSTS = ModelCosts(layers=1, attn_bytes=0, embed_row_bytes=0, lm_head_bytes=0, router_bytes=0,
                   expert_bytes=0, num_experts=0, top_k=0, moe_layers=0, shared_dense_bytes=0,
                   kv_bytes_per_token=0, kv_flops_per_token=4e8, w_flops_per_token=6e8,
                   attn_flops_per_pair=1e5, lm_head_flops=0.0)


def test_chunk_work_counts_the_context() -> None:
    # 4 tokens from position 10: token i sees 10 + i + 1 positions -> 11 + 12 + 13 + 14 = 50 pairs
    w = chunk_work(COSTS, 10, 14)
    assert (w.tokens, w.dense_flops, w.attention_flops) == (4, 4e9, 50 * 1e5)
    assert chunk_work(COSTS, 5, 5).tokens == 0


def test_fit_recovers_the_costs_and_prices_long_contexts() -> None:
    fit = PrefillCostFit()
    # true costs: 2 ms per call, 1 s per 1e14 dense FLOPs, 1 s per 2e13 attention FLOPs, 1 s per
    # 4e14 dense FLOPs of padded rows; calls of n tokens in programs of `rows` rows
    for start, n, rows in [(0, 512, 512), (0, 256, 512), (4096, 512, 512), (20000, 128, 512),
                           (60000, 64, 128), (1000, 1024, 2048), (0, 100, 128)]:
        w = chunk_work(COSTS, start, start + n, rows)
        assert w.padded_flops == (rows - n) * 1e9
        fit.observe(w, 0.002 + w.dense_flops / 1e14 + w.attention_flops / 2e13 + w.padded_flops / 4e14)
    assert fit.coefficients == pytest.approx((0.002, 1e-14, 5e-14, 2.5e-15), rel=1e-6)
    # 20 ms in a program of exactly n rows: at position 0 the matmuls bind; at 60,000 attention does
    # 0.002 + 1346e9 / 1e14 + (1346 * 1347 / 2) * 1e5 / 2e13 = 0.019992 s (1347: 0.020009 s)
    assert fit.tokens_within(0.020, COSTS, 0, most=4096) == 1346
    # 0.002 + 58e9 / 1e14 + (58 * 60000 + 58 * 59 / 2) * 1e5 / 2e13 = 0.019989 s (59: 0.0203 s)
    assert fit.tokens_within(0.020, COSTS, 60000, most=4096) == 58
    assert fit.tokens_within(0.001, COSTS, 0, most=4096) == 0  # the call cost alone is 2 ms
    assert fit.tokens_within(0.020, COSTS, 0, most=1000) == 1000  # all of it fits


def test_budget_prices_the_padded_rows_of_its_bucket() -> None:
    """A call of n tokens runs in its token bucket's program: n just past a bucket's edge pays for
    the larger program's empty rows, so the budget stays at the edge unless the larger program's
    cost fits."""
    fit = PrefillCostFit()
    for start, n, rows in [(0, 512, 512), (0, 256, 512), (4096, 512, 512), (20000, 128, 512),
                           (60000, 64, 128), (1000, 1024, 2048), (0, 100, 128)]:
        w = chunk_work(COSTS, start, start + n, rows)
        fit.observe(w, 0.002 + w.dense_flops / 1e14 + w.attention_flops / 2e13 + w.padded_flops / 4e14)

    def bucket(n: int) -> int:  # buckets 32, 128, 512, 2048, 8192 (growth 4)
        return next(b for b in (32, 128, 512, 2048, 8192) if n <= b)

    # 10 ms: 683 tokens in a program of 683 rows (0.002 + 0.00683 + 683 * 684 / 2 * 5e-9 = 0.009998 s);
    # in buckets, 513 tokens already cost 11.6 ms (1,535 empty rows at 2.5 us), so 512
    assert fit.tokens_within(0.010, COSTS, 0, 4096) == 683
    assert fit.predict(chunk_work(COSTS, 0, 513, 2048)) == pytest.approx(0.0116267, rel=1e-5)
    assert fit.tokens_within(0.010, COSTS, 0, 4096, bucket) == 512
    # 20 ms: inside the 2,048 bucket, 1,220 tokens (0.019994 s with 828 empty rows; 1,221: 0.020008 s)
    assert fit.tokens_within(0.020, COSTS, 0, 4096, bucket) == 1220
    # two KV devices: each holds a bucket of rows, the other's all padding
    assert fit.tokens_within(0.020, COSTS, 0, 4096, bucket, devices=2) == 813


def test_fit_never_prices_attention_below_the_matmuls() -> None:
    fit = PrefillCostFit()
    assert fit.coefficients is None and fit.tokens_within(1.0, COSTS, 0, 512) is None
    for n in (64, 128, 256, 512):  # short prompts only: attention seconds not visible
        fit.observe(PrefillWork(n, n * 1e9, 0.0), n * 1e-5)
    _, c1, c2, c3 = fit.coefficients
    assert c2 >= c1 == pytest.approx(1e-14) and c3 == 0.0  # no padded rows seen: not priced
    fit.observe(PrefillWork(0, 0.0, 0.0), 1.0)  # nothing computed: ignored
    assert fit.points == 4


def test_budget_rule() -> None:
    runner = build_runner(MODELS, split="1+1", kv_pages=64, prefill_chunk=16, max_prefill_tokens=256)
    runner.submit("w", "mix", tuple(range(3, 300)), 4, _greedy())  # waiting: priced from position 0
    runner.decode_call_seconds = 0.005
    assert runner.prefill_budget(decoding=True) == 256  # no prefill call measured yet
    costs = runner._model_costs("mix")
    per_token = chunk_work(costs, 0, 1).dense_flops  # FLOPs of one token's matmuls
    # calls of 25-200 tokens from position 0: 1 ms per call + 0.1 ms per token's worth of FLOPs
    # (their seconds vary with their FLOPs, so the fit tells the two apart)
    rate = 1e-4 / per_token
    for n in (25, 50, 100, 200):
        w = chunk_work(costs, 0, n)
        runner.prefill_fit.observe(w, 1e-3 + rate * (w.dense_flops + w.attention_flops))
    assert runner.prefill_fit.coefficients == pytest.approx((1e-3, rate, rate, 0.0), rel=1e-6)
    # the default share 0.8: 4 ms, about 30 tokens (1 ms + 30 x 0.1 ms, attention a little more)
    assert runner.prefill_share == 0.8
    assert 26 <= runner.prefill_budget(decoding=True) <= 30
    runner.prefill_share = 1.0  # 5 ms: about 40 tokens
    assert 36 <= runner.prefill_budget(decoding=True) <= 40
    runner.prefill_share = 0.5
    assert runner.prefill_budget(decoding=True) == 16  # 2.5 ms: ~15 tokens, under the one-chunk floor
    runner.prefill_share = 1.0
    assert runner.prefill_budget(decoding=False) == 256  # nothing to protect
    runner.decode_call_seconds = 0.0001
    assert runner.prefill_budget(decoding=True) == 16  # at least one chunk
    runner.decode_call_seconds = 1.0
    assert runner.prefill_budget(decoding=True) == 256  # at most the ceiling


def test_calls_of_one_shape_still_price_a_long_context() -> None:
    """Calls of one shape leave per-call and per-FLOP costs apart unknown; the least squares then
    prices everything as one constant. The prior instead keeps half the call as fixed and scales
    the rest with FLOPs, so a chunk deep into a long prompt costs more, and the budget there shrinks
    (the 2026-12-05 H200 replay: 2,048-token chunks at 60K context ran 1.6-2x the decode call)."""
    fit = PrefillCostFit()
    w0 = chunk_work(COSTS, 0, 512)
    fit.observe(w0, 0.030)
    one = fit.coefficients  # the prior from one call: 15 ms per call + 15 ms over its FLOPs
    assert one[0] == pytest.approx(0.015) and one[1] == one[2] == one[3] == pytest.approx(
        0.015 / (w0.dense_flops + w0.attention_flops))
    for _ in range(7):
        fit.observe(w0, 0.030)  # the least squares alone: 30 ms for any call
    assert fit.coefficients == pytest.approx(one)
    assert fit.predict(w0) == pytest.approx(0.030)
    deep = chunk_work(COSTS, 60000, 60512)  # 512 tokens after 60,000: 6.85x the FLOPs of w0
    flops = (deep.dense_flops + deep.attention_flops) / (w0.dense_flops + w0.attention_flops)
    assert flops == pytest.approx(6.85, abs=0.01)
    assert fit.predict(deep) == pytest.approx(0.015 + 0.015 * flops)  # 118 ms, not 30
    # 30 ms buys w0's FLOPs (5.25e11): 512 tokens from 0, 74 after 60,000 (~7e9 FLOPs a token)
    assert fit.tokens_within(0.030, COSTS, 0, 512) == 512
    assert fit.tokens_within(0.030, COSTS, 60000, 512) == 74


def test_small_budget_reaches_the_planner_and_outputs_equal_reference(monkeypatch) -> None:
    runner = build_runner(MODELS, split="1+1", kv_pages=64, prefill_chunk=8, max_prefill_tokens=64,
                          call_log=64)
    runner.prefill_fit.observe(PrefillWork(8, 1e12, 0.0), 10.0)  # 10 s for 8 tokens (the prior: 5 s
    runner.decode_call_seconds = 0.012  # per call): while anything decodes, one chunk (8)
    seen: list[tuple[bool, int]] = []  # (requests decoding, budget) of steps with prompt left
    step = KVPlanner.step

    def spy(self, inp):
        prompt_left = bool(self.waiting()) or any(
            self.info(r).phase == Phase.PREFILL for r in self.running())
        if prompt_left:
            seen.append((bool(inp.decode_lengths), inp.prefill_token_budget))
        return step(self, inp)

    monkeypatch.setattr(KVPlanner, "step", spy)
    # the measured prefill costs would move with the run: keep them fixed for the check
    monkeypatch.setattr(type(runner), "_note_prefill", lambda self, *a: None)
    monkeypatch.setattr(PrefillCostFit, "observe", lambda self, *a: None)
    reqs = [Req("a", "mix", tuple(range(3, 9)), 32), Req("b", "mix", tuple(range(20, 60)), 4)]
    late = Req("c", "mix", tuple(range(70, 110)), 3)  # arrives while "a" decodes

    def submit_late(runner, log):
        if log.steps == 1:
            runner.submit(late.rid, late.model, late.prompt, late.max_new, late.sampling)
            log.tokens[late.rid] = []

    log = drive(runner, reqs, on_step=submit_late)
    refs = References(MODELS)
    for r in (*reqs, late):
        assert log.tokens[r.rid] == refs(r)[0]
    # while "a" decodes, "c" is prefilled one chunk (8 tokens) per step: 40 tokens, 5 steps
    assert [b for decoding, b in seen if decoding] == [8] * 5
    assert runner.kv.pool_stats().pages_used == 0
    # the first step (nothing decoding: budget 64) prefills both prompts, 6 + 40 tokens, in ONE
    # call: a request's span of a step is not cut into prefill_chunk pieces (each its own call)
    assert [c.prefill_tokens for c in runner.call_log if not c.decode] == [46] + [8] * 5
    # each prefill call's padded rows: its program's token rows (T, one KV device) beyond its tokens
    per_row = dense_flops_per_token(runner._model_costs("mix"))
    for c in runner.call_log:
        if not c.decode:
            rows = int(c.lanes.split(" T")[1].split()[0])
            assert c.padded_flops == (rows - c.prefill_tokens) * per_row
    assert any(c.padded_flops > 0 for c in runner.call_log)
    # each call names the launch (step) that dispatched it and how many requests decoded then
    recs = list(runner.call_log)
    assert (recs[0].step, recs[0].step_decoding, recs[0].decode) == (1, 0, False)
    assert [c.step for c in recs] == sorted(c.step for c in recs)
    assert {c.step for c in recs} <= set(range(1, runner.launches + 1))
    assert all(c.step_decoding >= 1 for c in recs if c.decode)


def test_budget_prices_the_longest_running_prefill(monkeypatch) -> None:
    """With the fit ready, the budget is what fits the share of the decode call at the context of
    the running prefill furthest into its prompt (never under one chunk), priced as ONE call (a
    request's tokens of a step run in one call)."""
    runner = build_runner(MODELS, split="1+1", kv_pages=64, prefill_chunk=8, max_prefill_tokens=64)
    costs = runner._model_costs("mix")
    fit = PrefillCostFit()  # 0.1 ms per call; dense / attention FLOPs at 1 GFLOP/s / 0.1 GFLOP/s
    for s0, n in [(0, 8), (8, 8), (40, 16), (0, 64), (100, 4)]:
        w = chunk_work(costs, s0, s0 + n)
        fit.observe(w, 1e-4 + w.dense_flops / 1e9 + w.attention_flops / 1e8)
    runner.prefill_fit = fit
    monkeypatch.setattr(PrefillCostFit, "observe", lambda self, *a: None)  # the run's calls: ignored
    runner.submit("a", "mix", tuple(range(3, 9)), 40, _greedy())
    runner.submit("b", "mix", tuple(range(20, 80)), 2, _greedy())
    runner.decode_call_seconds = 1e-9  # while "a" decodes: one chunk of "b" per step
    seen = {}
    while "b" in runner.reqs and not seen:
        runner.step()
        info = runner.planner.info("b") if "b" in runner.reqs else None
        if info is not None and info.phase == Phase.PREFILL and info.kv_len > 0:
            seen["ctx"] = info.kv_len
    assert seen, "b never ran part of its prefill"
    allowance = 0.01  # 10 ms: 29 tokens from position 0, 17 from position 48
    runner.prefill_share = 1.0
    runner.decode_call_seconds = allowance
    want = fit.tokens_within(allowance, costs, seen["ctx"], 64)  # no padded row seen: none priced
    assert runner.prefill_budget(decoding=True) == max(8, want)
    assert 8 < want < fit.tokens_within(allowance, costs, 0, 64) < 64  # a longer context buys fewer


def _greedy() -> SamplingParams:
    return SamplingParams()
