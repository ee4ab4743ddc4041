"""`pallas_kernels.prefill_mgpu` (Mosaic GPU flash attention, warp-specialized) on this CPU machine.

* Under Mosaic GPU's interpreter (its three warpgroups run as threads; TMA, barriers and shared
  memory simulated), against `paged_prefill_attention_reference`: MHA and GQA (a padded group),
  head_dim 64 and 128, two head chunks, ragged chunks (a sequence with no queries, a whole
  sequence, a partial chunk after context, chunks crossing pages), rows before ``cu_q_lens[0]``
  and past the last chunk that must come out 0 (lse -inf), shuffled pages, -1 past each table,
  unwritten slots poisoned with NaN (`kvcase.make_case`), pages smaller and larger than a KV step,
  K/V slots reused, KV splits, sliding window + soft cap, return_lse; one case with the
  interpreter's race detector on. The interpreter runs the P V product with P through shared
  memory (its wgmma reads A only from there); the GPU form (P from registers, in place) is what
  the lowering tests compile. Its race detector does not see wgmma's reads (only generic and TMA
  accesses), so it cannot catch a K/V slot refilled too early; the interpreter's barrier checks
  (every phase observed by every waiter, no deadlock) cover the protocol's structure.
* Cross-lowered to Mosaic GPU for an abstract H200 at the engine's shapes (OLMoE 16/16 heads, 32
  tokens per page; Qwen3-30B-A3B 32/4 heads, 128 tokens per page; a 512-token chunk after 32K
  tokens): the whole Pallas -> Mosaic GPU lowering, layout inference and the shared-memory check
  run here; only the final compile needs the chip.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from kvcase import make_case, page_bytes_for, rel_err, tol
from mgpu_check import lowered_for_h200, races_detected

from pallas_kernels import prefill_mgpu as pm
from pallas_kernels.page_layout import KVSpec, PoolLayout, page_geometry
from pallas_kernels.prefill import paged_prefill_attention_reference

S = jax.ShapeDtypeStruct
PAD_ROWS = 3  # rows of q past the last chunk: output 0, lse -inf


@pytest.fixture
def race_detection(monkeypatch):
    """The kernel's interpret backend with the race detector on (fresh traces)."""
    with races_detected(monkeypatch, pm._prefill_mgpu):
        yield


def _case(seed: int, kv_heads: int, q_heads: int, head_dim: int, row_elems: int, t_pp: int,
          kv_lens: list[int], q_lens: list[int], lead: int = 0):
    """(case, q, cu_q_lens): bf16 KV of ``kv_lens`` tokens in NaN-poisoned shuffled pages, and
    ``q_lens`` queries per sequence (the last ones of each) after ``lead`` rows before
    ``cu_q_lens[0]``, plus PAD_ROWS rows past them (both must come out 0)."""
    rng = np.random.default_rng(seed)
    spec = KVSpec.gqa(kv_heads, head_dim)
    case = make_case(rng, spec, kv_lens, dtype="bfloat16", row_elems=row_elems,
                     page_bytes=page_bytes_for(spec, row_elems, "bfloat16", t_pp))
    assert case.geom.tokens_per_page == t_pp
    rows = lead + sum(q_lens) + PAD_ROWS
    q = jnp.asarray(rng.standard_normal((rows, q_heads, head_dim)), jnp.bfloat16)
    cu = jnp.asarray(lead + np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return case, q, cu


def _check(case, q, cu, *, lse: bool = False, **kw) -> None:
    """The interpreted kernel against the reference (bf16 tolerance); rows outside ``[cu[0],
    cu[B])`` 0 (lse -inf)."""
    args = (q, case.arena, case.table, case.lens, cu, case.geom)
    outside = np.ones(q.shape[0], bool)
    outside[int(cu[0]):int(cu[-1])] = False
    masking = {k: kw[k] for k in ("scale", "soft_cap", "window") if k in kw}
    ref = paged_prefill_attention_reference(*args, return_lse=lse, **masking)
    out = pm.paged_prefill_attention_mgpu(*args, backend="interpret", return_lse=lse, **kw)
    if lse:
        (out, out_lse), (ref, ref_lse) = out, ref
        assert out_lse.shape == q.shape[:2] and out_lse.dtype == jnp.float32
        assert bool(jnp.all(jnp.isneginf(out_lse[outside])))
        live = np.isfinite(np.asarray(ref_lse))
        np.testing.assert_array_equal(np.isfinite(np.asarray(out_lse)), live)
        np.testing.assert_allclose(np.asarray(out_lse)[live], np.asarray(ref_lse)[live],
                                   rtol=0, atol=2e-2)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < tol("bfloat16"), kw
    assert float(jnp.abs(out[outside].astype(jnp.float32)).max()) == 0.0


def test_mha_ragged_chunks_with_race_detector(race_detection):
    # MHA (a block is 128 tokens): no queries; a whole 40-token sequence; 30 queries after 270
    # tokens of context (pages of 16: 4 pieces per 64-key step; 5 steps through 2 slots; the last
    # page half written); 5 after 16. (Few CTAs: the interpreter's time goes by CTA, not by step.)
    case, q, cu = _case(1, 1, 1, 64, 64, 16, [0, 40, 300, 21], [0, 40, 30, 5])
    _check(case, q, cu, block_t=64, num_splits=1)
    assert not interpret_pallas_call.get_races().races_found


def test_gqa_padded_group_engine_layout():
    # 6 query heads on 2 KV heads: group 3 padded to 4 (32 tokens a block); head_dim = R = 128 and
    # 32-token pages under 128-key steps (OLMoE's layout); 2 splits of a 600-key walk (3 + 2
    # steps); 2 rows before cu_q_lens[0]
    case, q, cu = _case(2, 2, 6, 128, 128, 32, [600, 9], [40, 9], lead=2)
    _check(case, q, cu, num_splits=2)


def test_window_softcap_lse_large_pages():
    # group 8 (16 tokens a block); 128-token pages under 64-key steps (two steps a page); a
    # 150-token sliding window (masked, full and diagonal steps), soft cap, scale, lse, 2 splits.
    # The first block (positions 262-277) walks from key 64 (262 - 149 = 113): its last row's
    # window starts at 128, so it sees no key of the first step.
    case, q, cu = _case(3, 1, 8, 64, 64, 128, [282, 40], [20, 12])
    _check(case, q, cu, lse=True, block_t=64, num_splits=2, window=150, soft_cap=20.0, scale=0.2)


def test_two_head_chunks_and_three_stages():
    # head_dim 128 in rows of 64 (two chunks per head: S and P V summed / split over chunks);
    # a 4-step walk through 3 slots
    case, q, cu = _case(4, 1, 2, 128, 64, 16, [5, 230], [5, 60])
    _check(case, q, cu, lse=True, block_t=64, stages=3)


def test_tail_pieces_hold_no_unwritten_row():
    case, _, _ = _case(5, 2, 2, 64, 64, 16, [0, 16, 21, 40], [0, 1, 1, 1])
    tails = np.asarray(pm.tail_pieces(case.arena, case.table, case.lens, case.geom, 16)
                       .astype(jnp.float32))
    assert tails.shape == ((4 * 2 * 2 + 1) * 16, 64)
    assert np.all(np.isfinite(tails)) and np.all(tails[-16:] == 0)
    pieces = tails[:-16].reshape(4, 2, 2, 16, 64)  # [B, KVH, K/V, piece rows, R]
    for b, n in enumerate([0, 16, 21, 40]):
        nv = n % 16
        want = case.dense[b]["k"][n - nv:n, 1]  # kv head 1's K rows of the straddling piece
        np.testing.assert_array_equal(pieces[b, 1, 0, :nv], want)
        assert np.all(pieces[b, :, :, nv:] == 0)


def test_block_meta_walks():
    # one sequence of 300 keys, a chunk of its last 100 queries in blocks of 64 tokens
    blk_seq = jnp.asarray([0, 0, -1], jnp.int32)
    pos0 = jnp.asarray([200, 264, 0], jnp.int32)
    nq = jnp.asarray([64, 36, 0], jnp.int32)
    lens = jnp.asarray([300], jnp.int32)
    meta = np.asarray(pm.block_meta(blk_seq, pos0, nq, lens, 64, None))
    assert meta.tolist() == [[0, 200, 300, 0, 5], [0, 264, 300, 0, 5], [0, 0, 300, 0, 0]]
    meta = np.asarray(pm.block_meta(blk_seq, pos0, nq, lens, 64, 100))
    # keys from 101 (walk from 64) to 264, from 165 (walk from 128) to 300
    assert meta[:, 3:].tolist() == [[64, 4], [128, 3], [0, 0]]


def test_shared_memory_plan():
    # bf16, head_dim = R = 128, 128-key steps: Q/O 32 KiB + 64 KiB a stage (+ 512 B of lse rows)
    assert pm.smem_bytes(1, 128, 128, 2, 2) == 32768 + 2 * 65536 + 512
    assert pm.smem_bytes(1, 128, 128, 3, 2) <= pm.SMEM_BYTES - pm.SMEM_SLACK
    assert pm.smem_bytes(1, 128, 128, 4, 2) > pm.SMEM_BYTES - pm.SMEM_SLACK


def test_default_splits(monkeypatch):
    from pallas_kernels import attention_core

    monkeypatch.setattr(attention_core, "num_sms", lambda: 132)
    # the engine's 2,048-token OLMoE chunk of a 4K prompt: 17 blocks x 16 heads fill the SMs
    assert pm.default_num_splits(17, 16, 4096, 128) == 1
    # a ragged chunk whose table reaches 32K tokens: one split per 8K tokens (5)
    assert pm.default_num_splits(20, 16, 33280, 128) == 5
    # one 512-token OLMoE chunk after 8K: the SM rule (80 CTAs -> 2) and the token rule agree
    assert pm.default_num_splits(5, 16, 8704, 128) == 2
    # few CTAs: the SM rule, capped at 4 steps of the walk
    assert pm.default_num_splits(1, 1, 2048, 128) == 4


def test_rejects_what_it_cannot_do():
    case, q, cu = _case(6, 2, 4, 64, 64, 16, [20], [20])
    args = (q, case.arena, case.table, case.lens, cu, case.geom)
    call = functools.partial(pm.paged_prefill_attention_mgpu, backend="interpret")
    with pytest.raises(ValueError, match="bf16/f16"):
        call(q, case.arena.astype(jnp.float32), *args[2:])
    with pytest.raises(ValueError, match="block_t"):
        call(*args, block_t=32)
    with pytest.raises(ValueError, match="stages"):
        call(*args, stages=1)
    with pytest.raises(ValueError, match="shared memory"):
        call(*args, block_t=128, stages=8)
    with pytest.raises(ValueError, match="backend"):
        pm.paged_prefill_attention_mgpu(*args, backend="triton")
    with pytest.raises(ValueError, match="GQA group"):
        call(jnp.zeros((20, 2 * 65, 64), jnp.bfloat16), *args[1:])
    with pytest.raises(ValueError, match="gcd"):
        call(*args[:-1], dataclasses.replace(case.geom, tokens_per_page=12))
    with pytest.raises(ValueError, match="rows_per_page"):
        call(*args[:-1], dataclasses.replace(case.geom, rows_per_page=case.geom.rows_per_page + 4))


# (query heads, KV heads) at head_dim 128, 256-KiB pages of 128-element bf16 rows
ENGINE = {"olmoe": (16, 16), "qwen3-30b-a3b": (32, 4)}


@pytest.mark.parametrize("kw", [
    {},
    {"return_lse": True, "window": 4096, "soft_cap": 30.0},
    {"block_t": 64, "stages": 3},
    {"stages": 3, "num_splits": 1},
])
@pytest.mark.parametrize("model", sorted(ENGINE))
def test_lowers_to_mosaic_gpu_for_h200(monkeypatch, model, kw):
    hq, kvh = ENGINE[model]
    pool = PoolLayout(262144, "bfloat16", 128)
    geom = page_geometry(KVSpec.gqa(kvh, 128), pool)
    assert geom.tokens_per_page == {"olmoe": 32, "qwen3-30b-a3b": 128}[model]
    chunk, context = 512, 32768
    max_pages = -(-(context + chunk) // geom.tokens_per_page)
    args = (S((chunk, hq, 128), jnp.bfloat16), S((max_pages + 8, pool.rows_per_page, 128),
                                                 jnp.bfloat16),
            S((1, max_pages), jnp.int32), S((1,), jnp.int32), S((2,), jnp.int32))
    fn = functools.partial(pm.paged_prefill_attention_mgpu, geom=geom, backend="gpu", **kw)
    text = lowered_for_h200(monkeypatch, fn, args)
    assert "mosaic_gpu" in text
