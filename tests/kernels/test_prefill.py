"""Chunked-prefill attention: a ragged batch of chunks, each over its paged prefix + itself."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kvcase import edge_lengths, make_case, np_attention, page_bytes_for, rel_err, tol

from pallas_kernels import prefill as prefill_mod
from pallas_kernels.decode import paged_decode_attention
from pallas_kernels.page_layout import KVSpec
from pallas_kernels.prefill import (
    paged_mla_prefill_attention,
    paged_mla_prefill_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
)

KV_LENS = edge_lengths(8)  # [0, 1, 7, 8, 9, 35]
Q_LENS = [0, 1, 3, 8, 2, 20]  # chunk sizes: none, all of it, part, a whole page, ...
PAD_ROWS = 3  # rows of q past the last chunk: their output must be 0


def _cu(q_lens):
    return jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)


def _gqa_truth(case, q, q_lens, scale, soft_cap=None, window=None):
    out = np.zeros(q.shape)
    at = 0
    for d, ql in zip(case.dense, q_lens, strict=True):
        n = d["k"].shape[0]
        if ql:
            g = q.shape[1] // d["k"].shape[1]
            out[at:at + ql] = np_attention(
                np.asarray(q[at:at + ql], np.float64), np.repeat(d["k"], g, axis=1),
                np.repeat(d["v"], g, axis=1), np.arange(n - ql, n), scale=scale,
                soft_cap=soft_cap, window=window)
        at += ql
    return out


def _gqa_case(rng, dtype="float32", platform="gpu", row_elems=32, d=64, t_pp=8):
    spec = KVSpec.gqa(2, d)
    case = make_case(rng, spec, edge_lengths(t_pp), dtype=dtype, row_elems=row_elems,
                     page_bytes=page_bytes_for(spec, row_elems, dtype, t_pp), platform=platform)
    q_lens = Q_LENS if t_pp == 8 else [0, 1, 3, 16, 2, 40]
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + PAD_ROWS, 6, d)), jnp.dtype(dtype))
    return case, q, q_lens


def test_reference_matches_dense_numpy():
    rng = np.random.default_rng(20)
    case, q, q_lens = _gqa_case(rng)
    for kw in ({}, {"soft_cap": 2.0, "window": 6}):
        ref = paged_prefill_attention_reference(q, case.arena, case.table, case.lens, _cu(q_lens),
                                                case.geom, scale=0.2, **kw)
        assert rel_err(ref, _gqa_truth(case, q, q_lens, 0.2, **kw)) < 1e-6


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gqa_prefill_gpu_kernel_interpret(dtype):
    rng = np.random.default_rng(21)
    case, q, q_lens = _gqa_case(rng, dtype=dtype)
    cu = _cu(q_lens)
    ref = paged_prefill_attention_reference(q, case.arena, case.table, case.lens, cu, case.geom)
    kws = [{}, {"block_q": 4, "num_splits": 2, "block_t": 16}]
    if dtype == "float32":
        kws.append({"schedule": "persistent", "block_q": 2})
    for kw in kws:
        out = paged_prefill_attention(q, case.arena, case.table, case.lens, cu, case.geom,
                                      backend="interpret", **kw)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert rel_err(out, ref) < tol(dtype), kw
        assert float(jnp.abs(out[-PAD_ROWS:].astype(jnp.float32)).max()) == 0.0


def test_prefill_split_rule(monkeypatch):
    """`prefill_num_splits` on the measured cases (docs/kernels.md, 2026-12-06): a chunk of 2,048 /
    512 tokens is 16 / 4 query blocks (+1 a slot) x 16 KV heads for OLMoE, 128 / 32 (+1 a slot)
    x 4 for Qwen3-30B-A3B."""
    monkeypatch.setattr(prefill_mod, "num_sms", lambda: 132)
    f = prefill_mod.prefill_num_splits
    assert [f(17, 16, 1, n, 128) for n in (2048, 4096, 32768)] == [2, 2, 4]  # 528 / 272 -> 2
    assert [f(5, 16, 1, n, 128) for n in (512, 8704, 33280)] == [4, 4, 4]
    assert [f(129, 4, 1, n, 128) for n in (2048, 4096, 32768)] == [1, 1, 1]  # KV shared
    assert [f(33, 4, 1, n, 128) for n in (512, 8704, 33280)] == [1, 1, 1]
    assert f(20, 16, 4, 32768, 128) == 4  # 4 x 512 ragged: 16 blocks for 4 sequences
    assert f(136, 4, 8, 1 << 20, 128) == 1  # Qwen3's 2,048 tokens in an 8-slot, wide program
    assert f(17, 16, 1, 1 << 20, 128) == 4  # capped at PREFILL_MAX_SPLITS
    assert f(2, 1, 1, 100, 128) == 1  # never more splits than KV blocks
    assert f(2, 1, 1, 300, 128) == 3


def test_gqa_prefill_gpu_defaults_use_the_split_rule(monkeypatch):
    """On GPU with no num_splits, the launch gets `prefill_num_splits` of its static shapes."""
    seen = {}
    monkeypatch.setattr(prefill_mod, "_paged_prefill", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(prefill_mod, "num_sms", lambda: 132)
    case, q, q_lens = _gqa_case(np.random.default_rng(23), dtype="bfloat16")
    paged_prefill_attention(q, case.arena, case.table, case.lens, _cu(q_lens), case.geom,
                            backend="gpu")
    group = 4  # 6 query heads over 2 KV heads, padded to a power of two
    block_q = 128 // group
    blocks = -(-q.shape[0] // block_q) + case.table.shape[0]
    max_tokens = case.table.shape[1] * case.geom.tokens_per_page
    assert seen["block_q"] == block_q
    assert seen["num_splits"] == prefill_mod.prefill_num_splits(
        blocks, 2, case.table.shape[0], max_tokens, seen["block_t"])


def test_gqa_prefill_window_softcap():
    rng = np.random.default_rng(22)
    case, q, q_lens = _gqa_case(rng)
    out = paged_prefill_attention(q, case.arena, case.table, case.lens, _cu(q_lens), case.geom,
                                  scale=0.3, soft_cap=5.0, window=5, backend="interpret",
                                  block_q=8)
    assert rel_err(out, _gqa_truth(case, q, q_lens, 0.3, soft_cap=5.0, window=5)) < 1e-5


def test_gqa_prefill_tpu_kernel_interpret():
    rng = np.random.default_rng(23)
    case, q, q_lens = _gqa_case(rng, platform="tpu", row_elems=128, d=128)
    cu = _cu(q_lens)
    for kw in ({}, {"window": 7}):
        ref = paged_prefill_attention_reference(q, case.arena, case.table, case.lens, cu,
                                                case.geom, **kw)
        out = paged_prefill_attention(q, case.arena, case.table, case.lens, cu, case.geom,
                                      backend="tpu_interpret", **kw)
        assert rel_err(out, ref) < 1e-5, kw
        assert float(jnp.abs(out[-PAD_ROWS:]).max()) == 0.0


def test_prefill_of_one_token_equals_decode():
    rng = np.random.default_rng(24)
    case, _, _ = _gqa_case(rng)
    b = len(KV_LENS)
    q = jnp.asarray(rng.standard_normal((b, 6, 64)), jnp.float32)
    q_lens = [1 if n else 0 for n in KV_LENS]
    cu = _cu(q_lens)
    dec = paged_decode_attention(q, case.arena, case.table, case.lens, case.geom,
                                 backend="interpret")
    pre = paged_prefill_attention(q[np.asarray(q_lens, bool)], case.arena, case.table,
                                  case.lens, cu, case.geom, backend="interpret")
    keep = np.asarray(q_lens, bool)
    assert pre.shape == (int(keep.sum()), 6, 64)
    assert rel_err(pre, np.asarray(dec)[keep]) < 1e-6


@pytest.mark.parametrize("backend", ["interpret", "tpu_interpret"])
def test_mla_prefill(backend):
    rng = np.random.default_rng(25)
    platform = "tpu" if backend == "tpu_interpret" else "gpu"
    r = 128 if platform == "tpu" else 32
    spec = KVSpec.mla(128, 32)
    case = make_case(rng, spec, KV_LENS, row_elems=r, platform=platform,
                     page_bytes=page_bytes_for(spec, r, "float32", 8))
    h = 4
    t = sum(Q_LENS) + PAD_ROWS
    ql = jnp.asarray(rng.standard_normal((t, h, 128)), jnp.float32)
    qr = jnp.asarray(rng.standard_normal((t, h, 32)), jnp.float32)
    cu = _cu(Q_LENS)
    ref = paged_mla_prefill_attention_reference(ql, qr, case.arena, case.table, case.lens, cu,
                                                case.geom, scale=0.1)
    # Independent check of the reference: MLA is MQA over [latent | rope] keys, latent values.
    at, truth = 0, np.zeros(ql.shape)
    for d, qn in zip(case.dense, Q_LENS, strict=True):
        n = d["latent"].shape[0]
        if qn:
            k = np.concatenate([d["latent"], d["rope"]], -1)[:, None].repeat(h, 1)
            qq = np.concatenate([np.asarray(ql[at:at + qn]), np.asarray(qr[at:at + qn])], -1)
            truth[at:at + qn] = np_attention(qq, k, d["latent"][:, None].repeat(h, 1),
                                             np.arange(n - qn, n), scale=0.1)
        at += qn
    assert rel_err(ref, truth) < 1e-6
    out = paged_mla_prefill_attention(ql, qr, case.arena, case.table, case.lens, cu, case.geom,
                                      scale=0.1, backend=backend)
    assert rel_err(out, ref) < 1e-5


def test_mla_prefill_in_the_gpu_engine_rows(monkeypatch):
    """DeepSeek's MLA (latent 512, rope 64) in the GPU engine's 128-element rows, bf16: 5 rows a
    token, a 64-row query tile of 640 elements, so the default 64-token KV blocks would not fit
    an H100's shared memory (it failed to compile there, 2026-12-06); the kernel runs 32-token
    blocks and matches the reference across pages (16 tokens a page)."""
    from pallas_kernels import attention_core

    seen = []
    real = attention_core.blocks_gpu
    monkeypatch.setattr(attention_core, "blocks_gpu",
                        lambda *a, **kw: seen.append(kw["block_t"]) or real(*a, **kw))
    rng = np.random.default_rng(26)
    spec = KVSpec.mla(512, 64)
    case = make_case(rng, spec, [0, 17, 40], dtype="bfloat16", row_elems=128,
                     page_bytes=page_bytes_for(spec, 128, "bfloat16", 16))
    q_lens, h = [0, 5, 24], 16
    t = sum(q_lens) + PAD_ROWS
    ql = jnp.asarray(rng.standard_normal((t, h, 512)), jnp.bfloat16)
    qr = jnp.asarray(rng.standard_normal((t, h, 64)), jnp.bfloat16)
    cu = _cu(q_lens)
    ref = paged_mla_prefill_attention_reference(ql.astype(jnp.float32), qr.astype(jnp.float32),
                                                case.arena.astype(jnp.float32), case.table,
                                                case.lens, cu, case.geom, scale=0.05)
    out = paged_mla_prefill_attention(ql, qr, case.arena, case.table, case.lens, cu, case.geom,
                                      scale=0.05, backend="interpret")
    assert seen == [32]
    assert rel_err(out, ref) < tol("bfloat16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_row_sequences_in_the_decode_kernel(dtype):
    """`one_row_decode`: one-query sequences (a mixed step's decode rows) go to the decode kernel,
    the rest to the prefill kernel; together the same rows as the reference, lse included, at
    page boundaries (KV of 8 = one whole page, 9, 35), with a window and a soft cap."""
    rng = np.random.default_rng(25)
    case, _, _ = _gqa_case(rng, dtype=dtype)
    q_lens = [0, 1, 1, 1, 9, 1]  # KV 0, 1, 7, 8, 9, 35: four one-row sequences beside a chunk
    q = jnp.asarray(rng.standard_normal((sum(q_lens) + PAD_ROWS, 6, 64)), jnp.dtype(dtype))
    cu = _cu(q_lens)
    for kw in ({}, {"soft_cap": 3.0, "window": 6}):
        ref, ref_lse = paged_prefill_attention_reference(q, case.arena, case.table, case.lens, cu,
                                                         case.geom, return_lse=True, **kw)
        out, lse = paged_prefill_attention(q, case.arena, case.table, case.lens, cu, case.geom,
                                           backend="interpret", block_q=4, return_lse=True,
                                           one_row_decode=True, **kw)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert rel_err(out, ref) < tol(dtype), kw
        assert float(jnp.abs(out[-PAD_ROWS:].astype(jnp.float32)).max()) == 0.0
        live = np.isfinite(np.asarray(ref_lse))
        assert np.array_equal(live, np.isfinite(np.asarray(lse)))
        assert float(np.abs(np.asarray(lse)[live] - np.asarray(ref_lse)[live]).max()) < 1e-2, kw
        plain = paged_prefill_attention(q, case.arena, case.table, case.lens, cu, case.geom,
                                        backend="interpret", block_q=4, **kw)
        assert rel_err(out, plain) < tol(dtype), kw  # the same result as one launch


@pytest.mark.parametrize("skip_one_row", [False, True])
def test_token_block_rows_inverts_query_blocks(skip_one_row):
    """Every query row read back through token_block_rows lands where query_blocks put it;
    rows in no block (before the first sequence, past the last, skipped one-row sequences) read the
    out-of-range index. Lengths: empty, one row, block_q +- 1, several blocks."""
    block_q, t, lead = 4, 42, 2
    q_lens = [0, 1, 3, 4, 5, 9, 1, 0, 8]  # 2 rows before, 31 rows, then 9 of padding
    cu = jnp.asarray(lead + np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    kv = jnp.asarray([n + 7 for n in q_lens], jnp.int32)
    _, _, _, tok_idx = prefill_mod.query_blocks(cu, kv, t, block_q, skip_one_row)
    rows = np.asarray(prefill_mod.token_block_rows(cu, t, block_q, skip_one_row))
    flat = np.asarray(tok_idx).reshape(-1)
    none = flat.shape[0]
    expect = np.full(t, none)
    placed = flat < t
    expect[flat[placed]] = np.nonzero(placed)[0]
    np.testing.assert_array_equal(rows, expect)
    skipped = {int(cu[i]) for i, n in enumerate(q_lens) if n == 1} if skip_one_row else set()
    assert {i for i in range(t) if rows[i] == none} == skipped | {0, 1} | set(range(33, t))
