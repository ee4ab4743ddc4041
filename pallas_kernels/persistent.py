"""Persistent GPU paged attention: one launch of ~SM-count programs walking a work list.

A ragged batch (one 100K-token request next to 63 requests of 32 tokens) is cut into *work
items* ``(query block, kv head, KV range)`` of at most ``split`` tokens each, where ``split`` is
chosen on device from the batch's total KV so that there are about ``items_per_program`` items per
program. Program p then takes items ``p, p + P, p + 2P, ...`` (items of one long sequence are
consecutive in the list, so they land on different programs). Each item writes an unnormalised
partial (o, m, l); a second small kernel merges the partials of each (block, head) by
log-sum-exp (they are contiguous in the list). Nothing in the launch depends on the longest
sequence, and no program idles while another has a whole long sequence to itself.

Static bound on the work list: with ``split >= total / (P * items_per_program)``, the items number
at most ``blocks * heads + P * items_per_program``, so the list (and the partials buffer) has that
fixed size; entries past the live count are neither computed nor read.

Backends: gpu (Triton lowering) and interpret (CPU tests). TPU has no persistent variant (its
one or two TensorCores already walk the grid sequentially; see `attention_tpu`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    attend_range_gpu,
    flat_rows,
    gpu_compiler_params,
    interpret_flag,
    lse_from,
)
from pallas_kernels.attention_core import kv_range, num_sms
from pallas_kernels.page_layout import PageGeometry


def build_work_list(
    lo: jax.Array, hi: jax.Array, heads: int, num_programs: int, items_per_program: int,
    block_t: int, min_split: int,
) -> dict[str, jax.Array]:
    """Cuts each (block, head)'s KV range ``[lo, hi)`` into items of at most ``split`` tokens.

    lo, hi: [NB] int32 KV range of each query block (the same for all its heads).
    Returns a dict of int32 arrays: item_bh / item_lo / item_hi [I] with
    ``I = NB * heads + num_programs * items_per_program`` (item_bh = block * heads + head),
    n_items [1], split [1], and per (block, head) segment its first item and item count
    (seg_first / seg_count [NB * heads]). Items are ordered by (block, head, range start);
    entries >= n_items are padding.
    """
    nb = lo.shape[0]
    n_tok = jnp.repeat(hi - lo, heads)  # [NB * heads]
    target = num_programs * items_per_program
    total = jnp.sum(n_tok)
    split = jnp.maximum((total + target - 1) // target, min_split)
    split = ((split + block_t - 1) // block_t * block_t).astype(jnp.int32)
    counts = (n_tok + split - 1) // split  # [NB * heads]
    ends = jnp.cumsum(counts)
    n_items = ends[-1] if nb else jnp.int32(0)
    max_items = nb * heads + target
    it = jnp.arange(max_items, dtype=jnp.int32)
    # compare_all: one fused op; the default binary-search loop is ~log2(n) tiny GPU kernels.
    bh = jnp.searchsorted(ends, it, side="right", method="compare_all").astype(jnp.int32)
    bh_c = jnp.minimum(bh, nb * heads - 1)
    k = it - (ends[bh_c] - counts[bh_c])
    base = jnp.repeat(lo, heads)[bh_c]
    top = jnp.repeat(hi, heads)[bh_c]
    item_lo = base + k * split
    item_hi = jnp.minimum(item_lo + split, top)
    live = it < n_items
    return {
        "item_bh": jnp.where(live, bh_c, 0), "item_lo": jnp.where(live, item_lo, 0),
        "item_hi": jnp.where(live, item_hi, 0),
        "n_items": jnp.reshape(n_items, (1,)).astype(jnp.int32), "split": split.reshape(1),
        "seg_first": (ends - counts).astype(jnp.int32), "seg_count": counts.astype(jnp.int32),
    }


def _persistent_kernel(
    nitems_ref, bh_ref, ilo_ref, ihi_ref, seq_ref, pos0_ref, tbl_ref, q_ref, arena_ref,
    o_ref, m_ref, l_ref,
    *, geom: PageGeometry, heads: int, num_gb: int, rows_per_token: int, max_pages: int,
    block_t: int, scale: float, soft_cap: float | None, window: int | None, num_pages: int,
):
    pid = pl.program_id(0)
    n_prog = pl.num_programs(0)
    n_items = nitems_ref[0]
    n_mine = jnp.maximum(n_items - pid + n_prog - 1, 0) // n_prog
    r = geom.row_elems
    kv_dtype = arena_ref.dtype
    m_rows = q_ref.shape[2]
    row_tok = lax.broadcasted_iota(jnp.int32, (m_rows,), 0) // rows_per_token

    def item(k, carry):
        it = pid + k * n_prog
        bh = bh_ref[it]
        blk = bh // heads
        hg = bh % heads
        b = jnp.maximum(seq_ref[blk], 0)
        q_chunks = [q_ref[blk, hg, :, pl.ds(c * r, r)].astype(kv_dtype)
                    for c in range(len(geom.score_chunk_rows))]
        m, den, accs = attend_range_gpu(
            q_chunks, arena_ref, tbl_ref,
            table_base=b * max_pages, head_base=(hg // num_gb) * geom.head_stride_rows,
            lo=ilo_ref[it], hi=ihi_ref[it], geom=geom, block_t=block_t, scale=scale,
            soft_cap=soft_cap, q_pos=pos0_ref[blk] + row_tok, window=window,
            num_pages=num_pages,
        )
        for c, acc in enumerate(accs):
            o_ref[it, :, pl.ds(c * r, r)] = acc
        m_ref[it, :] = m
        l_ref[it, :] = den
        return carry

    lax.fori_loop(0, n_mine, item, jnp.int32(0))


def blocks_persistent(
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
    block_t: int,
    backend: str,
    num_warps: int = 4,
    num_stages: int = 2,
    num_programs: int | None = None,
    items_per_program: int = 2,
    min_split: int | None = None,
    combine: str = "kernel",
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Same contract as `pallas_kernels.attention_core.blocks_gpu`, one persistent launch.

    num_programs: programs in the launch (default 2 x the device's SM count).
    items_per_program: work items aimed at per program (more: finer balance, more partials).
    min_split: smallest item in tokens (default 4 x block_t).
    combine: "kernel" (a Pallas merge, one program per (block, head)) or "xla" (segment ops).
    return_lse: return ``(out, lse [NB, heads, M])``; both combines keep the merged (m, l).
    """
    nb, hgs, m_rows, _ = qb.shape
    p = num_programs or 2 * num_sms()
    b_ok = blk_seq >= 0
    kvl = kv_lens[jnp.maximum(blk_seq, 0)]
    lo, hi = kv_range(blk_pos0, jnp.where(b_ok, blk_nq, 0), kvl, window)
    work = build_work_list(lo, hi, hgs, p, items_per_program, block_t, min_split or 4 * block_t)
    max_items = work["item_bh"].shape[0]
    wv = geom.out_width
    kernel = functools.partial(
        _persistent_kernel, geom=geom, heads=hgs, num_gb=num_gb, rows_per_token=rows_per_token,
        max_pages=page_table.shape[1], block_t=block_t, scale=scale, soft_cap=soft_cap,
        window=window, num_pages=arena.shape[0],
    )
    o, m, den = pl.pallas_call(
        kernel,
        grid=(p,),
        out_shape=(
            jax.ShapeDtypeStruct((max_items, m_rows, wv), jnp.float32),
            jax.ShapeDtypeStruct((max_items, m_rows), jnp.float32),
            jax.ShapeDtypeStruct((max_items, m_rows), jnp.float32),
        ),
        interpret=interpret_flag(backend),
        compiler_params=None if backend != "gpu" else gpu_compiler_params(num_warps, num_stages),
        name="paged_attention_persistent",
    )(work["n_items"], work["item_bh"], work["item_lo"], work["item_hi"],
      blk_seq.astype(jnp.int32), blk_pos0.astype(jnp.int32),
      page_table.reshape(-1).astype(jnp.int32), qb, flat_rows(arena))
    if combine == "xla":
        res = combine_items_xla(o, m, den, work["item_bh"], work["n_items"], nb * hgs,
                                return_lse=return_lse)
    else:
        res = combine_items_kernel(o, m, den, work["seg_first"], work["seg_count"], backend,
                                   return_lse=return_lse)
    if not return_lse:
        return res.reshape(nb, hgs, m_rows, wv)
    out, lse = res
    return out.reshape(nb, hgs, m_rows, wv), lse.reshape(nb, hgs, m_rows)


def _combine_kernel(first_ref, count_ref, o_ref, m_ref, l_ref, out_ref, *lse_ref, unroll: int):
    seg = pl.program_id(0)
    first = first_ref[seg]
    cnt = count_ref[seg]
    m_rows, w = out_ref.shape[1:]

    def body(i, carry):
        m_run, l_run, acc = carry
        for u in range(unroll):  # independent loads in flight
            j = i * unroll + u
            ok = j < cnt
            it = first + jnp.clip(j, 0, jnp.maximum(cnt - 1, 0))
            m_j = jnp.where(ok, m_ref[it, :], -jnp.inf)
            l_j = jnp.where(ok, l_ref[it, :], 0.0)
            o_j = jnp.where(ok, o_ref[it, :, :], 0.0)
            m_new = jnp.maximum(m_run, m_j)
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            a = jnp.exp(m_run - m_safe)
            b = jnp.exp(m_j - m_safe)
            l_run = l_run * a + l_j * b
            acc = acc * a[:, None] + o_j * b[:, None]
            m_run = m_new
        return m_run, l_run, acc

    init = (jnp.full((m_rows,), -jnp.inf, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
            jnp.zeros((m_rows, w), jnp.float32))
    m_run, l_run, acc = lax.fori_loop(0, (cnt + unroll - 1) // unroll, body, init)
    safe = jnp.where(l_run > 0, l_run, 1.0)
    out_ref[seg, :, :] = jnp.where((l_run > 0)[:, None], acc / safe[:, None], 0.0)
    if lse_ref:
        lse_ref[0][seg, :] = lse_from(m_run, l_run)


def combine_items_kernel(o: jax.Array, m: jax.Array, den: jax.Array, seg_first: jax.Array,
                         seg_count: jax.Array, backend: str, unroll: int = 4,
                         return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Log-sum-exp merge of work-item partials, one program per (block, head) segment.

    o: [I, M, W], m/den: [I, M] partials; segment k owns the contiguous items
    ``[seg_first[k], seg_first[k] + seg_count[k])`` (nothing else is read, so never-written
    items cannot leak in). Returns [num_segments, M, W] f32; an empty segment gives 0.
    A Pallas kernel rather than XLA segment ops: those lower to scatters whose cost on GPU grew
    with the size of the whole partials buffer (see docs/kernels.md, "Measured").
    return_lse: also return the merged log-sum-exp [num_segments, M] (-inf for no key).
    """
    nseg = seg_first.shape[0]
    _, m_rows, w = o.shape
    out_shape = jax.ShapeDtypeStruct((nseg, m_rows, w), jnp.float32)
    if return_lse:
        out_shape = (out_shape, jax.ShapeDtypeStruct((nseg, m_rows), jnp.float32))
    return pl.pallas_call(
        functools.partial(_combine_kernel, unroll=unroll),
        grid=(nseg,),
        out_shape=out_shape,
        interpret=interpret_flag(backend),
        compiler_params=None if backend != "gpu" else gpu_compiler_params(4, 1),
        name="persistent_combine",
    )(seg_first, seg_count, o, m, den)


def combine_items_xla(o: jax.Array, m: jax.Array, den: jax.Array, item_bh: jax.Array,
                      n_items: jax.Array, num_segments: int,
                      return_lse: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Log-sum-exp merge of work-item partials into their (block, head) segments.

    o: [I, M, W], m/l: [I, M] partials (entries >= n_items are never written: ignored, even
    if NaN). Returns [num_segments, M, W] f32; a segment with no item (empty sequence) is 0.
    return_lse: also return the merged log-sum-exp [num_segments, M] (-inf for no key).
    """
    live = jnp.arange(o.shape[0]) < n_items[0]
    seg = jnp.where(live, item_bh, num_segments)  # out of range -> dropped by segment ops
    m = jnp.where(live[:, None], m, -jnp.inf)
    den = jnp.where(live[:, None], den, 0.0)
    o = jnp.where(live[:, None, None], o, 0.0)
    m_seg = jax.ops.segment_max(m, seg, num_segments=num_segments, indices_are_sorted=True)
    m_seg = jnp.where(jnp.isneginf(m_seg), 0.0, m_seg)
    w = jnp.where(jnp.isneginf(m), 0.0,
                  jnp.exp(m - m_seg[jnp.minimum(seg, num_segments - 1)]))
    l_seg = jax.ops.segment_sum(w * den, seg, num_segments=num_segments, indices_are_sorted=True)
    o_seg = jax.ops.segment_sum(w[..., None] * o, seg, num_segments=num_segments,
                                indices_are_sorted=True)
    safe = jnp.where(l_seg > 0, l_seg, 1.0)
    out = jnp.where((l_seg > 0)[..., None], o_seg / safe[..., None], 0.0)
    return (out, lse_from(m_seg, l_seg)) if return_lse else out
