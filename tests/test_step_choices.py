"""Host-side choices of the step programs, checked by hand: the layer loops' segments
(`pooled_step.layer_segments`), the decode attention schedule (`step_calls.attention_schedule`)
and the prefill token buckets (`step_programs.ShapeBuckets`, `StepGrid.token_buckets`)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from crosspool_jax.demo import demo_configs
from crosspool_jax.execution.pooled_step import layer_segments, layer_signatures
from crosspool_jax.execution.step_calls import attention_schedule
from crosspool_jax.execution.step_grid import StepGrid
from crosspool_jax.execution.step_programs import ShapeBuckets
from crosspool_jax.models.config import FFNKind

D, M = FFNKind.DENSE, FFNKind.MOE
MIX = demo_configs()["demo-mixtral"]
DSV3 = demo_configs()["demo-deepseek-v3"]


def _cfg(kinds, windows=None):
    return dataclasses.replace(MIX, num_layers=len(kinds), ffn_kinds=tuple(kinds),
                               sliding_windows=tuple(windows or (0,) * len(kinds)))


def test_layer_segments() -> None:
    def seg(*cfgs):
        return layer_segments(layer_signatures(list(cfgs)))

    assert seg(_cfg([M] * 16)) == [(0, 1, 16)]  # uniform: one loop
    assert seg(_cfg([D, D, D] + [M] * 24)) == [(0, 1, 3), (3, 1, 24)]  # DeepSeek: dense first
    assert seg(_cfg([D, M] * 12)) == [(0, 2, 12)]  # every other layer dense: one loop of period 2
    assert seg(_cfg([M] * 6, [4096, 0] * 3)) == [(0, 2, 3)]  # alternating sliding windows
    assert seg(_cfg([D] + [M] * 5 + [D])) == [(0, 1, 1), (1, 1, 5), (6, 1, 1)]
    # lanes of different depth: the deeper lane's tail is its own segment
    assert seg(_cfg([M] * 4), _cfg([M] * 6)) == [(0, 1, 4), (4, 1, 2)]
    # every layer is covered exactly once, in order
    for kinds in ([D, M, M, D, M, M, D, M, M, M], [M, D] * 5 + [M] * 7):
        out = seg(_cfg(kinds))
        covered = [s + i for s, p, r in out for i in range(p * r)]
        assert covered == list(range(len(kinds)))


def test_attention_schedule_rule() -> None:
    ragged = [np.array([[32768] + [256] * 15 + [0, 0]])]  # max / mean = 14.3 over the live slots
    uniform = [np.array([[4096, 4096, 3000, 0]])]
    assert attention_schedule(ragged, MIX, eligible=True) == "persistent"
    assert attention_schedule(uniform, MIX, eligible=True) == "split"
    assert attention_schedule(ragged, MIX, eligible=False) == "split"  # CPU, prefill or extras
    assert attention_schedule(ragged, DSV3, eligible=True) == "split"  # MLA
    assert attention_schedule([np.array([[5000, 0]])], MIX, eligible=True) == "split"  # one slot
    # the threshold: 8x the mean of live slots
    assert attention_schedule([np.array([[8 * 9, 9, 9, 9, 9, 9, 9, 9, 9]])], MIX, True) == "split"
    assert attention_schedule([np.array([[800, 1, 1, 1, 1, 1, 1, 1, 1]])], MIX, True) == "persistent"


def test_schedule_rule_bench_batches_with_few_live_slots() -> None:
    from benchmarks.schedule_rule import batch_lengths

    assert batch_lengths(4, 100, 0.25) == [100, 25, 25, 25]
    assert batch_lengths(8, 43008, 1.0, live=1) == [43008] + [0] * 7
    assert batch_lengths(8, 4096, 0.0625, live=2) == [4096, 256] + [0] * 6
    with pytest.raises(ValueError, match=r"live must be 1\.\.8"):
        batch_lengths(8, 64, 1.0, live=0)


def test_schedule_rule_bench_times_fixed_split_counts() -> None:
    """`--splits`: the split grid at fixed split counts beside the default rule's, all correct
    (interpret mode: the times mean nothing)."""
    from benchmarks.schedule_rule import run

    row = run(4, 64, 1.0, "interpret", 1e9, live=1, table_tokens=256, splits=(2, 8))
    assert row["live"] == 1 and row["table_tokens"] == 256
    for key in ("split", "persistent", "split2", "split8"):
        assert row[f"{key}_us"] > 0 and row[f"{key}_err"] < 1e-2


def test_prefill_token_buckets_end_at_max_prefill_tokens() -> None:
    """Coarse buckets (32, 128, 512, 2,048, 8,192) with `max_prefill_tokens` 4,096: a call of
    2,049-4,096 prompt tokens runs in a 4,096-row program, not in 8,192 rows (the 2026-12-06 H100
    replay with 4K prefill calls ran its 3,694-token median call in 8,192 rows: 41 ms)."""
    bk = ShapeBuckets.coarse()
    assert bk.round(3000, 32) == 8192 and bk.round(3000, 32, 4096) == 4096
    assert bk.round(2048, 32, 4096) == 2048 and bk.round(100, 32, 4096) == 128
    assert bk.round(5000, 32, 4096) == 8192  # past the top: the ladder as before
    assert bk.ladder(4096, 32, 4096) == [32, 128, 512, 2048, 4096]
    assert bk.ladder(2048, 32, 2048) == bk.ladder(2048, 32) == [32, 128, 512, 2048]
    assert bk.round(16, 32, 16) == 32 and bk.ladder(16, 32, 16) == [32]  # the floor stays least

    def runner(max_prefill_tokens: int) -> SimpleNamespace:
        return SimpleNamespace(buckets=bk, max_prefill_tokens=max_prefill_tokens)

    assert StepGrid.token_buckets(runner(4096)) == [32, 128, 512, 2048, 4096]
    assert StepGrid.token_buckets(runner(3000)) == [32, 128, 512, 2048, 4096]  # a power of two
    assert StepGrid.token_buckets(runner(2048)) == [32, 128, 512, 2048]
    got = [StepGrid.token_bucket(runner(4096), t) for t in (1, 600, 2049, 4096)]
    assert got == [32, 2048, 4096, 4096]
    fine = SimpleNamespace(buckets=ShapeBuckets.fine(), max_prefill_tokens=24)
    assert StepGrid.token_buckets(fine) == [8, 16, 32]
