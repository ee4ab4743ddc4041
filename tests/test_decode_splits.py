"""The split grid's static split count (`default_num_splits`): GQA decode takes one split per
8,192 tokens of the page table (measured on one H100, docs/benchmarks.md 2026-12-06), the other
users of the shared core one per 16,384; and the decode kernel stays correct at that count with
one live sequence in a wide bucket (interpret mode)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import attention_core
from pallas_kernels.attention_core import DECODE_TOKENS_PER_SPLIT, default_num_splits


def test_split_count_rule(monkeypatch) -> None:
    monkeypatch.setattr(attention_core, "num_sms", lambda: 132)
    # 8 slots x 16 head programs: the SM term asks 3; a 131,072-token table asks 16 (decode) / 8
    assert default_num_splits(8, 16, 131072, 64, DECODE_TOKENS_PER_SPLIT) == 16
    assert default_num_splits(8, 16, 131072, 64) == 8
    # a narrow table: the SM term rules, never more splits than blocks of the table
    assert default_num_splits(8, 16, 4096, 64, DECODE_TOKENS_PER_SPLIT) == 3
    assert default_num_splits(1, 1, 128, 64, DECODE_TOKENS_PER_SPLIT) == 2


def test_gqa_decode_uses_the_decode_rule(monkeypatch) -> None:
    """One live slot of 8 in a wide table: the split count comes from the decode rule and the
    output matches the plain-jnp reference."""
    from benchmarks.kernels import gqa_pool, make_tables
    from pallas_kernels.decode import paged_decode_attention, paged_decode_attention_reference

    seen = []
    real = attention_core.default_num_splits
    monkeypatch.setattr(attention_core, "default_num_splits",
                        lambda *a, **k: seen.append(a) or real(*a, **k))
    rng = np.random.default_rng(0)
    pool, geom = gqa_pool(128)
    lens = [300] + [0] * 7
    table, n_pages = make_tables(rng, lens, geom.tokens_per_page, 2048 // geom.tokens_per_page)
    arena = jax.random.normal(jax.random.key(0), pool.arena_shape(n_pages), jnp.float32)
    q = jax.random.normal(jax.random.key(1), (8, 32, 128), jnp.float32)
    tb, ln = jnp.asarray(table), jnp.asarray(lens, jnp.int32)
    out = paged_decode_attention(q, arena, tb, ln, geom, backend="interpret")
    ref = paged_decode_attention_reference(q, arena, tb, ln, geom)
    assert seen and seen[0][-1] == DECODE_TOKENS_PER_SPLIT
    np.testing.assert_allclose(np.asarray(out[:1]), np.asarray(ref[:1]), rtol=2e-3, atol=2e-3)
    assert not np.any(np.isnan(np.asarray(out)))
