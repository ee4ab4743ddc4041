"""Mosaic TPU kernel for paged attention of query blocks (decode and chunked prefill, GQA and MLA).

Grid ``(blocks, kv_heads * group_blocks, steps)``; step i covers pages ``[i * pps, (i + 1) * pps)``
of the block's KV range. The block descriptors, KV lengths and page table are scalar-prefetched
into SMEM, and every (page slot, chunk) of a step is one BlockSpec input over the SAME arena array
whose index_map reads the page id from the table: ``(page, (head_base + chunk_row) / T, 0)`` in
units of [T, R] blocks. Pallas's pipeline then DMAs each [T, R] chunk straight from its page
(double-buffered) and never copies the arena. Steps outside the block's KV range repeat the
nearest in-range block index, so the pipeline issues no DMA for them, and the body skips their
compute. Online-softmax state lives in VMEM scratch; the output is written normalised at the last
step (no split-KV: the (block, head) grid axes spread the work over the chip's TensorCores), and,
with ``return_lse``, the row's log-sum-exp ``m + log(l)`` from that same state (lane-replicated
[M, 128] blocks; the caller keeps lane 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import dot_precision, interpret_flag, lse_from, softcap_scores
from pallas_kernels.attention_core import kv_range
from pallas_kernels.page_layout import PageGeometry

LANES = 128


def _kernel(seq_ref, pos0_ref, nq_ref, kvlen_ref, tbl_ref, q_ref, *refs, geom: PageGeometry,
            pps: int, offsets: tuple[int, ...], rows_per_token: int, scale: float,
            soft_cap: float | None, window: int | None, return_lse: bool = False):
    n_in = pps * len(offsets)
    kv_refs = refs[:n_in]
    o_ref = refs[n_in]
    lse_ref = refs[n_in + 1] if return_lse else None
    m_ref, l_ref, acc_ref = refs[n_in + 1 + int(return_lse):]
    blk = pl.program_id(0)
    i = pl.program_id(2)
    t_pp, r = geom.tokens_per_page, geom.row_elems
    b_raw = seq_ref[blk]
    pos0 = pos0_ref[blk]
    nq = jnp.where(b_raw >= 0, nq_ref[blk], 0)
    lo, hi = kv_range(pos0, nq, kvlen_ref[jnp.maximum(b_raw, 0)], window)
    kv_dtype = kv_refs[0].dtype
    prec = dot_precision(kv_dtype)
    m_rows = q_ref.shape[0]

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    q_chunks = [q_ref[:, c * r:(c + 1) * r].astype(kv_dtype)
                for c in range(len(geom.score_chunk_rows))]
    q_pos = pos0 + lax.broadcasted_iota(jnp.int32, (m_rows, 1), 0) // rows_per_token
    for u in range(pps):
        tok0 = (i * pps + u) * t_pp

        @pl.when((tok0 < hi) & (tok0 + t_pp > lo))
        def _step(u=u, tok0=tok0):
            tiles = {off: kv_refs[u * len(offsets) + k] for k, off in enumerate(offsets)}
            tok_row = tok0 + lax.broadcasted_iota(jnp.int32, (1, t_pp), 1)
            mask = (tok_row >= lo) & (tok_row < hi) & (tok_row <= q_pos)
            if window is not None:
                mask = mask & (tok_row > q_pos - window)
            s = None
            for qc, off in zip(q_chunks, geom.score_chunk_rows, strict=True):
                part = lax.dot_general(qc, tiles[off][...], (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32, precision=prec)
                s = part if s is None else s + part
            s = softcap_scores(s * scale, soft_cap)
            s = jnp.where(mask, s, -jnp.inf)  # [M, T]
            m_prev = m_ref[...]  # [M, 128] lane-replicated
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe[:, :1])
            l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
            m_ref[...] = m_new
            tok_col = tok0 + lax.broadcasted_iota(jnp.int32, (t_pp, 1), 0)
            valid_col = (tok_col >= lo) & (tok_col < hi)
            pv = p.astype(kv_dtype)
            for c, off in enumerate(geom.value_chunk_rows):
                # Zero the rows outside [lo, hi): unwritten slots may hold NaN, and 0 * NaN = NaN.
                v = jnp.where(valid_col, tiles[off][...], jnp.zeros((), kv_dtype))
                upd = lax.dot_general(pv, v, (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32, precision=prec)
                sl = slice(c * r, (c + 1) * r)
                acc_ref[:, sl] = acc_ref[:, sl] * alpha[:, :1] + upd

    @pl.when(i == pl.num_programs(2) - 1)
    def _done():
        den = l_ref[...][:, :1]
        safe = jnp.where(den > 0, den, 1.0)
        o_ref[...] = jnp.where(den > 0, acc_ref[...] / safe, 0.0).astype(o_ref.dtype)
        if lse_ref is not None:
            lse_ref[...] = lse_from(m_ref[...], l_ref[...])


def blocks_tpu(
    qb: jax.Array,
    blk_seq: jax.Array,
    blk_pos0: jax.Array,
    blk_nq: jax.Array,
    kv_lens: jax.Array,
    page_table: jax.Array,
    arena: jax.Array,
    geom: PageGeometry,
    *,
    rows_per_token: int,
    num_gb: int,
    scale: float,
    soft_cap: float | None,
    window: int | None,
    backend: str,
    pages_per_step: int | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Same contract as `pallas_kernels.attention_core.blocks_gpu`, on Mosaic TPU.

    M (qb.shape[2]) must be a multiple of 8 and tokens_per_page a multiple of the sublane tile
    (8 for 32-bit, 16 for 16-bit KV; `page_layout.default_token_align("tpu", dtype)`).
    pages_per_step: pages DMA'd per grid step (default: about 128 tokens' worth).
    return_lse: return ``(out, lse [NB, heads, M])`` as `blocks_gpu`.
    """
    nb, hgs, m_rows, wq = qb.shape
    n_pages = arena.shape[0]
    max_pages = page_table.shape[1]
    t_pp, r = geom.tokens_per_page, geom.row_elems
    pps = pages_per_step or max(1, min(max_pages, 128 // t_pp))
    steps = -(-max_pages // pps)
    offsets = tuple(sorted(set(geom.score_chunk_rows) | set(geom.value_chunk_rows)))
    head_blocks = geom.head_stride_rows // t_pp

    def q_map(bi, hi, ii, *_):
        return (bi, hi, 0, 0)

    def kv_map(bi, hg, ii, seq, pos0, nq, kvlen, tbl, *, u, off):
        b_raw = seq[bi]
        b = jnp.maximum(b_raw, 0)
        lo, hi = kv_range(pos0[bi], jnp.where(b_raw >= 0, nq[bi], 0), kvlen[b], window)
        first = lo // t_pp
        last = jnp.maximum((hi + t_pp - 1) // t_pp - 1, first)
        j = jnp.minimum(jnp.clip(ii * pps + u, first, last), max_pages - 1)
        page = jnp.clip(tbl[b * max_pages + j], 0, n_pages - 1)
        return (page, (hg // num_gb) * head_blocks + off // t_pp, 0)

    kv_specs = [
        pl.BlockSpec((None, t_pp, r), functools.partial(kv_map, u=u, off=off))
        for u in range(pps) for off in offsets
    ]
    wv = geom.out_width
    kernel = functools.partial(_kernel, geom=geom, pps=pps, offsets=offsets,
                               rows_per_token=rows_per_token, scale=scale, soft_cap=soft_cap,
                               window=window, return_lse=return_lse)
    out_specs = pl.BlockSpec((None, None, m_rows, wv), q_map)
    out_shape = jax.ShapeDtypeStruct((nb, hgs, m_rows, wv), jnp.float32)
    if return_lse:  # lane-replicated like the m/l scratch: whole (8, 128) tiles
        out_specs = (out_specs, pl.BlockSpec((None, None, m_rows, LANES), q_map))
        out_shape = (out_shape, jax.ShapeDtypeStruct((nb, hgs, m_rows, LANES), jnp.float32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(nb, hgs, steps),
        in_specs=[pl.BlockSpec((None, None, m_rows, wq), q_map), *kv_specs],
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((m_rows, LANES), jnp.float32),
            pltpu.VMEM((m_rows, LANES), jnp.float32),
            pltpu.VMEM((m_rows, wv), jnp.float32),
        ],
    )
    res = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_flag(backend),
        name="paged_attention_tpu",
    )(blk_seq.astype(jnp.int32), blk_pos0.astype(jnp.int32), blk_nq.astype(jnp.int32),
      kv_lens.astype(jnp.int32), page_table.reshape(-1).astype(jnp.int32), qb,
      *([arena] * len(kv_specs)))
    if not return_lse:
        return res
    out, lse = res
    return out, lse[..., 0]
