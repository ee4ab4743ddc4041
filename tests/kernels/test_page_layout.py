"""Geometry of the shared KV arena (pure Python, no kernels)."""

from __future__ import annotations

import itertools

import pytest

from pallas_kernels.page_layout import (
    KVKind,
    KVSpec,
    PageGeometry,
    PoolLayout,
    choose_row_elems,
    default_token_align,
    page_geometry,
    pages_needed,
    tokens_per_page,
)

MODELS = {
    "mixtral-8x7b": KVSpec.gqa(8, 128),
    "qwen3-30b-a3b": KVSpec.gqa(4, 128),
    "olmoe": KVSpec.gqa(16, 128),
    "gpt-oss": KVSpec.gqa(8, 64),
    "deepseek-v3": KVSpec.mla(512, 64),
}


def test_one_gpu_pool_hosts_every_model():
    r = choose_row_elems(list(MODELS.values()), "gpu")
    assert r == 64  # gcd of 128, 64, 512, 64: nobody pays row padding
    pool = PoolLayout(page_bytes=64 * 1024, dtype="bfloat16", row_elems=r)
    assert pool.arena_shape(10) == (10, 512, 64)
    got = {name: tokens_per_page(spec, pool) for name, spec in MODELS.items()}
    # bytes per token per layer: 4096, 2048, 8192, 2048, 1152 -> floor, rounded down to 8
    assert got == {"mixtral-8x7b": 16, "qwen3-30b-a3b": 32, "olmoe": 8, "gpt-oss": 32,
                   "deepseek-v3": 56}
    for spec in MODELS.values():
        g = page_geometry(spec, pool)
        assert g.used_rows <= pool.rows_per_page
        assert g.waste_fraction() < 0.02  # 0 for the GQA models, 1.6% for MLA (56 of 56.9)


def test_gpu_rounds_16_bit_pages_to_16_tokens_where_it_costs_little():
    """The engine's GPU pages (256 KiB of 128-element bf16 rows) hold 192 DeepSeek MLA tokens (5
    rows a token: 204 fit), a multiple of 16 that the Mosaic GPU MLA kernels take; 200 on CPU
    (8). Where 16 would drop more than a 16th of the tokens the GPU keeps 8's rounding."""
    mla = MODELS["deepseek-v3"]
    engine = PoolLayout(page_bytes=256 * 1024, dtype="bfloat16", row_elems=128)
    assert default_token_align("gpu", "bfloat16") == 16 and default_token_align("gpu", "float32") == 8
    assert tokens_per_page(mla, engine) == 192 and tokens_per_page(mla, engine, platform="cpu") == 200
    assert tokens_per_page(mla, PoolLayout(page_bytes=256 * 1024, dtype="float32", row_elems=128)) == 96
    small = PoolLayout(page_bytes=64 * 1024, dtype="bfloat16", row_elems=64)
    assert tokens_per_page(mla, small) == 56  # 56.9 fit: 48 would drop 14%
    assert tokens_per_page(mla, small, token_align=16) == 48  # asked for: always
    for spec in (MODELS["olmoe"], MODELS["qwen3-30b-a3b"], MODELS["mixtral-8x7b"]):
        assert tokens_per_page(spec, engine) == tokens_per_page(spec, engine, platform="cpu")


def test_tpu_pool_pads_to_lanes():
    pool = PoolLayout(page_bytes=64 * 1024, dtype="bfloat16", row_elems=choose_row_elems(
        list(MODELS.values()), "tpu"))
    assert pool.row_elems == 128 and default_token_align("tpu", "bfloat16") == 16
    mla = page_geometry(MODELS["deepseek-v3"], pool, platform="tpu")
    # latent 4 rows + rope 64 padded to one 128-lane row = 5 rows a token; 256 rows -> 51 -> 48
    assert (mla.head_chunks, mla.rope_chunks, mla.tokens_per_page) == (4, 1, 48)
    assert 0.15 < mla.waste_fraction() < 0.16
    gpt = page_geometry(MODELS["gpt-oss"], pool, platform="tpu")
    assert gpt.head_chunks == 1 and gpt.waste_fraction() == pytest.approx(0.5)


@pytest.mark.parametrize("spec", [KVSpec.gqa(3, 96), KVSpec.gqa(1, 64), KVSpec.mla(256, 32),
                                  KVSpec.mla(64, 0)])
def test_token_rows_are_distinct_and_inside_the_page(spec):
    pool = PoolLayout(page_bytes=32 * 1024, dtype="float32", row_elems=32)
    g = page_geometry(spec, pool)
    t = g.tokens_per_page
    rows = []
    for h in range(g.num_kv_heads):
        base = h * g.head_stride_rows
        for off, tok in itertools.product(set(g.score_chunk_rows) | set(g.value_chunk_rows),
                                          range(t)):
            rows.append(base + off + tok)
    assert len(rows) == len(set(rows)) == g.used_rows  # every used row belongs to one token chunk
    assert max(rows) < g.used_rows <= g.rows_per_page
    assert g.q_width == len(g.score_chunk_rows) * 32 and g.out_width % 32 == 0


def test_rounding_and_limits():
    pool = PoolLayout(page_bytes=2048, dtype="float32", row_elems=32)  # 16 rows
    assert tokens_per_page(KVSpec.gqa(1, 32), pool) == 8  # 16 rows / 2 = 8
    assert tokens_per_page(KVSpec.gqa(1, 64), pool) == 4  # fewer than 8 fit: no rounding
    assert tokens_per_page(KVSpec.gqa(1, 32), pool, token_align=3) == 6
    with pytest.raises(ValueError, match="rows of 32"):
        tokens_per_page(KVSpec.gqa(4, 128), pool)  # 32 rows a token, 16 in a page
    with pytest.raises(ValueError, match="multiple of one row"):
        PoolLayout(page_bytes=1000, dtype="float32", row_elems=32)
    with pytest.raises(ValueError):
        KVSpec.gqa(0, 64)


def test_choose_row_elems_and_padding():
    assert choose_row_elems([KVSpec.gqa(8, 128)], "gpu") == 128
    assert choose_row_elems([KVSpec.gqa(8, 96)], "cpu") == 32
    assert choose_row_elems([KVSpec.gqa(8, 8)], "gpu") == 16  # clamped to 16 (dots need K >= 16)
    pool = PoolLayout(page_bytes=8192, dtype="float32", row_elems=64)
    g = page_geometry(KVSpec.gqa(2, 96), pool)
    assert g.head_chunks == 2 and g.q_width == 128  # 96 padded to two 64-rows
    assert g.page_view_shape() == (2, 2, 2, g.tokens_per_page, 64)
    assert pages_needed(0, g) == 0 and pages_needed(g.tokens_per_page + 1, g) == 2


def test_geometry_is_hashable_static_arg():
    pool = PoolLayout(page_bytes=4096, dtype="bfloat16", row_elems=64)
    a = page_geometry(KVSpec.gqa(2, 64), pool)
    b = page_geometry(KVSpec.gqa(2, 64), pool)
    assert a == b and hash(a) == hash(b) and isinstance(a, PageGeometry)
    assert a.spec.kind == KVKind.GQA and a.itemsize == 2
