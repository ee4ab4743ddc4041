"""Hopper (Mosaic GPU: wgmma + TMA, warp-specialized) chunked-prefill flash attention over paged KV.

What it computes: `pallas_kernels.prefill.paged_prefill_attention` for GQA / MQA / MHA models (the
same contract and arguments: q [T_q, Hq, head_dim] the packed chunk queries of all sequences, the
arena [num_pages, rows_per_page, R], page_table [B, max_pages], kv_lens [B] including the chunk,
cu_q_lens [B + 1]; causal, optional sliding window and soft cap, optional lse; rows of q outside
``[cu[0], cu[B])`` give 0 and lse -inf). `paged_prefill_attention_reference` is its oracle.

Layout read (`pallas_kernels.page_layout`): a page holds T tokens of one layer of one sequence as
``[kv_heads, 2 (K, V), head_chunks, T, R]``, so ``block_t`` consecutive tokens of one (head, K/V,
chunk) inside a page are one contiguous ``[block_t, R]`` run of rows: one TMA box.

Design (jax's dense FlashAttention-3 kernel, ``attention_mgpu.py``, adapted to pages and GQA):

* Query rows packed per KV head. The G query heads of a KV head are padded to Gp = next_pow2(G)
  (<= 64); a query block is ``128 / Gp`` tokens of ONE sequence x Gp heads = 128 rows, row
  ``token * Gp + head`` (the blocks of `prefill.query_blocks`). One CTA per (query block, KV head,
  KV split): grid ``(splits, kv_heads, blocks)``, blocks fastest (CUDA's x), so the CTAs that read
  the same KV run together and share it through L2.
* Three warpgroups. Compute warpgroup w (0, 1) owns rows ``[64 w, 64 w + 64)`` of the block (Q in
  shared memory, loaded once by TMA), keeps the f32 accumulator ``[64, head_chunks * R]`` and the
  running max / sum in registers (232 registers per thread); the memory warpgroup (40 registers)
  streams K and V tiles ``[head_chunks, block_t, R]`` through ``stages`` shared-memory slots with
  TMA, slot reuse gated by "consumed" barriers that both compute warpgroups arrive at.
* Per KV step (``block_t`` keys) each compute warpgroup: S = Q K^T (wgmma, K transposed in shared
  memory, f32 [64, block_t]); scale (and soft cap), mask (only on the steps that cross the causal
  diagonal or the window edge; steps past all of its rows' positions are skipped), online softmax
  in base 2; P in the KV dtype; O = O * alpha + P V (wgmma, P from registers). A schedule barrier
  between the two compute warpgroups makes one run its softmax while the other's wgmma runs.
* The KV range of a block is ``[lo, hi)`` (`attention_core.kv_range`), walked in steps aligned to
  ``block_t`` in absolute positions from ``floor(lo / block_t) * block_t``; splits cut it into
  ``ceil(steps / splits)`` steps each (later splits of a short block are empty).
* Paged TMA. A step is ``block_t / P`` pieces of ``P = gcd(T, block_t)`` tokens (T = 32: 4 pieces
  of 32 per 128-token step; T = 128: one piece), each piece one TMA box per (K/V, chunk) from the
  page the table names, all arriving at the step's barrier. Unwritten slots may hold NaN, and
  ``0 * NaN`` is NaN in P V, so no row at or past ``kv_len`` is ever copied from the arena: a piece
  past ``kv_len`` is copied from a zero piece, and the one piece of each (sequence, head, K/V,
  chunk) that straddles ``kv_len`` from a small side array built before the launch (its valid rows
  gathered from the arena, the rest zeros: `tail_pieces`). Pages past a sequence's table are never
  touched.
* Epilogue: each compute warpgroup normalises its rows, writes them in the KV dtype through its Q
  buffer and the natural-log lse (-inf for a row that saw no key) with TMA. jnp then combines the
  splits (`_common.split_softmax_combine`) and scatters rows back to token order.

Shared memory (bf16, head_dim = R = 128, block_t = 128): Q/O 2 x 64 x 128 x 2 B = 32 KiB, K + V
64 KiB per stage: 160 KiB at 2 stages (the default), 224 KiB at 3 (`smem_bytes`; the limit is
227 KiB).

Requirements (ValueError otherwise, so a caller can fall back to the Triton kernel): a GQA
geometry; bf16 or f16 arena (wgmma); R in (64, 128) (rows of whole 128-byte swizzle tiles); the
GQA group <= 64; block_t in (64, 128) with ``gcd(T, block_t)`` a multiple of 8; rows_per_page a
multiple of 8; stages >= 2; the shared memory within 227 KiB. The output goes through the KV
dtype (the Triton kernel's is f32), so an f32 q gets bf16/f16-rounded results.

Backends: "gpu" (Mosaic GPU) and "interpret" (Mosaic GPU's interpreter on CPU: warpgroups as
threads, TMA / barriers / shared memory simulated; tests/kernels/test_prefill_mgpu.py).

Status: tested in Mosaic GPU's interpreter and cross-lowered on CPU; on H100s and H200s checked
against the reference and timed by `benchmarks/prefill_attention.py --with-mgpu` (1.46-1.69x the
Triton kernel on OLMoE and Qwen3 chunks of 2K-4K tokens, one H100, 2026-12-06; docs/kernels.md). The
engine runs it for GQA prefill on Hopper under `attention_kernels="auto"`, the default
(`pallas_kernels.dispatch`). Two limits of the CPU testing: the interpreter's wgmma reads A only
from shared memory and it runs neither `pl.run_state` over accumulators nor stores into them, so
under ``backend="interpret"`` P goes through shared memory and P V into fresh accumulators (O = O *
alpha + P V), while the GPU form (P from registers, O rescaled and accumulated in place, as jax's
FA3 kernel) is only cross-lowered; and its race detector does not see wgmma's reads, so the ordering
of a K/V slot's reuse after the wgmmas that read it rests on the consumed barriers (the interpreter
does check that every barrier phase is waited on by every waiter and that nothing deadlocks).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import attention_core
from pallas_kernels._common import next_pow2, pack_query_chunks, split_softmax_combine
from pallas_kernels.page_layout import PageGeometry
from pallas_kernels.prefill import check_gqa_prefill_args, query_blocks, token_block_rows

COMPUTE_WGS = 2  # compute warpgroups per CTA; + 1 memory warpgroup
ROWS_PER_WG = 64  # query rows of one compute warpgroup (one wgmma M tile)
BLOCK_ROWS = COMPUTE_WGS * ROWS_PER_WG
COMPUTE_REGISTERS = 232  # per thread: 2 x 232 + 40 (x 128 threads) fits the 64K register file
MEMORY_REGISTERS = 40
SMEM_BYTES = 227 * 1024  # an H100/H200 CTA's dynamic shared memory
SMEM_SLACK = 1024  # barriers and alignment
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
DEFAULT_BLOCK_T = 128
DEFAULT_STAGES = 2
TOKENS_PER_SPLIT = 8192  # `default_num_splits`: at least one KV split per this many table tokens


def smem_bytes(head_chunks: int, r: int, block_t: int, stages: int, itemsize: int) -> int:
    """Shared memory the kernel allocates (bytes): Q/O tiles, K and V slots, lse rows."""
    qo = COMPUTE_WGS * head_chunks * ROWS_PER_WG * r * itemsize
    kv = 2 * stages * head_chunks * block_t * r * itemsize
    return qo + kv + COMPUTE_WGS * ROWS_PER_WG * 4


def default_num_splits(num_blocks: int, kv_heads: int, max_tokens: int, block_t: int) -> int:
    """KV splits per query block from static shapes: enough CTAs to give every SM one (one CTA
    per SM fits in shared memory) and at least one split per `TOKENS_PER_SPLIT` tokens the table
    can hold (``max_tokens``: a long sequence's blocks beside short ones are the critical path),
    never a split under 4 steps of that walk. On one H100 (2026-12-05, OLMoE geometry, fixed
    splits 1/2/4/8) 4-8 splits were the fastest after 8K-32K tokens and on a ragged 4-request
    chunk (0 / 4K / 16K / 32K), 1.2-1.4x the one or two splits the SM rule alone gives there."""
    want = -(-attention_core.num_sms() // max(1, num_blocks * kv_heads))
    want = max(want, -(-max_tokens // TOKENS_PER_SPLIT))
    return int(max(1, min(want, max_tokens // (4 * block_t))))


def tail_pieces(arena: jax.Array, page_table: jax.Array, kv_lens: jax.Array, geom: PageGeometry,
                piece: int) -> jax.Array:
    """The side array of pieces the kernel copies instead of arena rows it must not read.

    For each (sequence b, kv head h, K/V kv, chunk c), piece ``((b * KVH + h) * 2 + kv) * HC + c``
    is the ``piece`` token rows starting at ``floor(kv_lens[b] / piece) * piece``: those below
    ``kv_lens[b]`` copied from the arena, the rest zeros; one more piece at the end is all zeros.
    Returns ``[(B * KVH * 2 * HC + 1) * piece, R]`` in the arena's dtype.
    """
    b_n = kv_lens.shape[0]
    kvh, hc, t_pp, r = geom.spec.kv_heads, geom.head_chunks, geom.tokens_per_page, geom.row_elems
    rpp = geom.rows_per_page
    start = (kv_lens // piece) * piece  # [B]
    nv = kv_lens - start
    col = jnp.clip(start // t_pp, 0, page_table.shape[1] - 1)
    page = jnp.clip(page_table[jnp.arange(b_n), col], 0, arena.shape[0] - 1)
    h = jnp.arange(kvh)[:, None, None, None]
    kv = jnp.arange(2)[None, :, None, None]
    c = jnp.arange(hc)[None, None, :, None]
    i = jnp.arange(piece)[None, None, None, :]
    rel = h * geom.head_stride_rows + (kv * hc + c) * t_pp + i  # [KVH, 2, HC, P]
    rows = (page * rpp + start % t_pp)[:, None, None, None, None] + rel[None]
    flat = arena.reshape(-1, r)
    vals = jnp.take(flat, rows.reshape(-1), axis=0, mode="clip").reshape(*rows.shape, r)
    keep = (i < nv[:, None, None, None, None])[..., None]
    vals = jnp.where(keep, vals, jnp.zeros((), arena.dtype))
    return jnp.concatenate([vals.reshape(-1, r), jnp.zeros((piece, r), arena.dtype)])


def block_meta(blk_seq: jax.Array, pos0: jax.Array, nq: jax.Array, kv_lens: jax.Array,
               block_t: int, window: int | None) -> jax.Array:
    """[NB, 5] int32 per query block: (sequence, position of its first token, the sequence's
    kv_len, first key of its KV walk (a multiple of block_t), KV steps; 0 steps for an unused
    block)."""
    live = blk_seq >= 0
    b = jnp.maximum(blk_seq, 0)
    kvl = kv_lens[b]
    lo, hi = attention_core.kv_range(pos0, jnp.where(live, nq, 0), kvl, window)
    base = (lo // block_t) * block_t
    steps = jnp.where(hi > lo, (hi - base + block_t - 1) // block_t, 0)
    return jnp.stack([b, pos0, kvl, base, steps], axis=1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    """Static sizes and options of one launch (Python values, fixed at trace time).

    Page layout (`PageGeometry`): head_chunks (HC) rows of row_elems (R) per head, tokens_per_page
    (T), rows_per_page, kv_heads (KVH), head_stride_rows (rows from one KV head to the next in a
    page). dtype: the arena's, the MMA operands' and the output's. group_shift: log2 of the padded
    group Gp (a block row's token is ``row >> group_shift``); tokens_per_wg: tokens in a compute
    warpgroup's 64 rows. A KV step is block_t keys in n_pieces TMA pieces of ``piece`` tokens,
    through ``stages`` K/V slots; num_splits KV splits per block. zero_piece: the index of
    tails_ref's all-zero piece; max_pages / num_pages: page-table columns and arena pages (indices
    are clamped to them). scale, soft_cap, window: the attention options.
    """

    head_chunks: int
    row_elems: int
    tokens_per_page: int
    rows_per_page: int
    kv_heads: int
    head_stride_rows: int
    dtype: jnp.dtype
    group_shift: int
    tokens_per_wg: int
    block_t: int
    piece: int
    n_pieces: int
    stages: int
    num_splits: int
    zero_piece: int
    max_pages: int
    num_pages: int
    scale: float
    soft_cap: float | None
    window: int | None


_Ref = Any  # a Pallas ref inside the kernel (shared memory, barriers)


@dataclasses.dataclass(frozen=True)
class _SharedMem:
    """The CTA's shared memory and barriers, in `pl.run_scoped`'s order (`_kernel`).

    q_smem [2, HC, 64, R]: each compute warpgroup's Q tile, later its normalised O; k_smem, v_smem
    [stages, HC, block_t, R]: the K / V slots; lse_smem [2, 64] f32: each warpgroup's lse rows.
    k_ready, v_ready [stages]: a slot's K / V landed (n_pieces * HC TMA arrivals each); q_ready [2]:
    a warpgroup's Q landed; k_free, v_free [stages]: both compute warpgroups consumed a slot's K / V
    (the memory warpgroup may refill it); sched: the compute warpgroups' schedule barrier (2
    arrivals). p_smem [2, 64, block_t]: each warpgroup's P, only under the interpreter (else None).
    """

    q_smem: _Ref
    k_smem: _Ref
    v_smem: _Ref
    lse_smem: _Ref
    k_ready: _Ref
    v_ready: _Ref
    q_ready: _Ref
    k_free: _Ref
    v_free: _Ref
    sched: _Ref
    p_smem: _Ref | None = None


class _CtaWork(NamedTuple):
    """What this CTA (and warpgroup) does, as traced int32 scalars: grid indices blk (query block),
    head (KV head), split (KV split), wg (warpgroup: 0, 1 compute, 2 memory); the block's sequence
    seq, the position pos0 of its first token and the sequence's kv_len; n KV steps of block_t keys
    from key k_start (a multiple of block_t)."""

    blk: jax.Array
    head: jax.Array
    split: jax.Array
    wg: jax.Array
    seq: jax.Array
    pos0: jax.Array
    kv_len: jax.Array
    k_start: jax.Array
    n: jax.Array


def _cta_work(meta_ref, cfg: _KernelConfig) -> _CtaWork:
    """This CTA's indices and its split's share of the block's KV walk (meta_ref: `block_meta`)."""
    blk = lax.axis_index("blk")
    head = lax.axis_index("head")
    split = lax.axis_index("split")
    wg = lax.axis_index("wg")
    seq = meta_ref[blk, 0]
    pos0 = meta_ref[blk, 1]
    kv_len = meta_ref[blk, 2]
    n_all = meta_ref[blk, 4]
    per = lax.div(n_all + (cfg.num_splits - 1), cfg.num_splits)
    s_lo = jnp.minimum(split * per, n_all)
    n = jnp.minimum(n_all - s_lo, per)  # this CTA's steps
    k_start = meta_ref[blk, 3] + s_lo * cfg.block_t  # its first key
    return _CtaWork(blk, head, split, wg, seq, pos0, kv_len, k_start, n)


def _schedule_round(sched) -> None:
    """One round of the compute warpgroups' schedule barrier: arrive, then wait for the other."""
    plgpu.barrier_arrive(sched)
    plgpu.barrier_wait(sched)


def _step_ranges(q_first, q_last, k_start, n, cfg: _KernelConfig):
    """(edge_end, full_end, diag_end) for a compute warpgroup whose rows hold positions
    [q_first, q_last]: its steps [0, edge_end) cross the window edge (masked); [edge_end,
    full_end) have every key visible to every row; [full_end, diag_end) cross the causal diagonal
    (masked); [diag_end, n) are past every row (skipped)."""
    block_t, window = cfg.block_t, cfg.window
    if window is None:
        edge_end = jnp.int32(0)
    else:
        edge_end = jnp.minimum(lax.div(jnp.maximum(q_last - window + 1 - k_start, 0)
                                       + block_t - 1, block_t), n)
    full_end = jnp.clip(lax.div(jnp.maximum(q_first + 1 - k_start, 0), block_t), edge_end, n)
    diag_end = jnp.clip(lax.div(jnp.maximum(q_last - k_start + block_t, 0), block_t), full_end, n)
    return edge_end, full_end, diag_end


def _compute_warpgroup(q_ref, o_ref, lse_ref, cfg: _KernelConfig, smem: _SharedMem,
                       cta: _CtaWork) -> None:
    """Compute warpgroup ``cta.wg`` (0 or 1): rows [64 wg, 64 wg + 64) of the query block.

    Loads its Q [HC, 64, R] (q_ref [NB, KVH, 2, HC, 64, R]) into ``smem.q_smem[wg]``, walks the
    CTA's ``cta.n`` KV steps (`_step_ranges`: masked, full and masked steps by `_kv_step`, then
    `_skip_step`s) with the f32 accumulator (HC x [64, R]), running max and sum [64] in registers,
    and hands them to `_epilogue`. Warpgroup 1 takes one extra schedule round before its steps
    and warpgroup 0 one after them: the offset that runs one's softmax during the other's wgmma.
    """
    plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")
    wg = cta.wg
    qo = smem.q_smem.at[wg]
    plgpu.copy_gmem_to_smem(q_ref.at[cta.blk, cta.head, wg], qo, smem.q_ready.at[wg])
    plgpu.barrier_wait(smem.q_ready.at[wg])
    q_first = cta.pos0 + wg * cfg.tokens_per_wg  # position of this warpgroup's first token
    q_last = q_first + cfg.tokens_per_wg - 1
    step = functools.partial(_kv_step, cfg=cfg, smem=smem, cta=cta, qo=qo, q_first=q_first)
    skip = functools.partial(_skip_step, cfg=cfg, smem=smem)
    schedule_round = functools.partial(_schedule_round, smem.sched)  # one function: one trace

    edge_end, full_end, diag_end = _step_ranges(q_first, q_last, cta.k_start, cta.n, cfg)
    m_i = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), -jnp.inf, jnp.float32),
                            plgpu.Layout.WGMMA.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((ROWS_PER_WG,), 0.0, jnp.float32),
                            plgpu.Layout.WGMMA.reduce(1))
    acc = tuple(plgpu.layout_cast(jnp.full((ROWS_PER_WG, cfg.row_elems), 0.0, jnp.float32),
                                  plgpu.Layout.WGMMA) for _ in range(cfg.head_chunks))
    pl.when(wg == 1)(schedule_round)
    carry = (acc, m_i, l_i)
    carry = lax.fori_loop(0, edge_end, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(edge_end, full_end, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_end, diag_end, functools.partial(step, masked=True), carry)
    lax.fori_loop(diag_end, cta.n, skip, None)
    pl.when(wg == 0)(schedule_round)
    acc, m_i, l_i = carry
    _epilogue(o_ref, lse_ref, cfg, smem, cta, qo, acc, m_i, l_i)


def _kv_step(j, carry, *, masked: bool, cfg: _KernelConfig, smem: _SharedMem, cta: _CtaWork, qo,
             q_first):
    """KV step j of a compute warpgroup: carry (acc HC x [64, R], m_i [64], l_i [64]) f32 in, out.

    S = Q K^T (`_scores`, K slot ``j % stages``), the online softmax (`_online_softmax`), then
    O += P V (`_pv`) once V has landed and the tensor cores are ours; releases the K and V slot.
    qo: this warpgroup's Q [HC, 64, R] in shared memory; q_first: its first row's position.
    """
    acc, m_i, l_i = carry
    slot = lax.rem(j, cfg.stages)
    s = _scores(j, slot, masked=masked, cfg=cfg, smem=smem, qo=qo, q_first=q_first,
                k_start=cta.k_start)
    acc, m_new, l_i, p16, alpha_rows = _online_softmax(s, acc, m_i, l_i, masked=masked, cfg=cfg,
                                                       p_in_regs=smem.p_smem is None)
    plgpu.barrier_arrive(smem.sched)  # softmax done
    plgpu.barrier_wait(smem.v_ready.at[slot])
    plgpu.barrier_wait(smem.sched)  # the tensor cores are ours
    acc = _pv(acc, p16, alpha_rows, slot, cfg=cfg, smem=smem, wg=cta.wg)
    plgpu.barrier_arrive(smem.v_free.at[slot])
    return acc, m_new, l_i


def _scores(j, slot, *, masked: bool, cfg: _KernelConfig, smem: _SharedMem, qo, q_first,
            k_start):
    """Base-2 scaled (soft-capped) scores [64, block_t] f32 of step j against K slot ``slot``.

    Waits for the slot's K, runs S = Q K^T (one wgmma per head chunk, with one schedule round),
    releases the K slot; ``masked``: -inf where key ``k_start + j * block_t + col`` is after the
    row's position ``q_first + row // Gp`` or outside its window.
    """
    block_t, soft_cap, scale, window = cfg.block_t, cfg.soft_cap, cfg.scale, cfg.window
    plgpu.barrier_wait(smem.k_ready.at[slot])

    def qk(acc_ref):
        for c in range(cfg.head_chunks):
            plgpu.wgmma(acc_ref, qo.at[c], smem.k_smem.at[slot, c].transpose((1, 0)))
        _schedule_round(smem.sched)
        return acc_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC((ROWS_PER_WG, block_t), jnp.float32))
    plgpu.barrier_arrive(smem.k_free.at[slot])
    if soft_cap is None:
        s = s * (scale * LOG2E)
    else:
        s = jnp.tanh(s * (scale / soft_cap)) * (soft_cap * LOG2E)
    if masked:
        rows = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
        cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        # key k_start + j * block_t + col vs the row's position q_first + row // group
        diff = cols - lax.shift_right_logical(rows, cfg.group_shift)
        edge = q_first - (k_start + j * block_t)
        mask = diff <= edge
        if window is not None:
            mask = mask & (diff > edge - window)
        s = jnp.where(mask, s, -jnp.inf)
    return s


def _online_softmax(s, acc, m_i, l_i, *, masked: bool, cfg: _KernelConfig, p_in_regs: bool):
    """One online-softmax update in base 2 from scores s [64, block_t] f32.

    Returns (acc, m_new, l_i, p16, alpha_rows): acc (HC x [64, R]) already rescaled by alpha when
    ``p_in_regs`` (the GPU form; else untouched), the new running max and sum [64], P [64,
    block_t] in the KV dtype and alpha broadcast to [64, R]. ``masked``: a row that has seen no
    key yet (max -inf) uses max 0, so its P is 0 rather than NaN.
    """
    m_new = jnp.maximum(m_i, s.max(axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m_i - m_use)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
    alpha_rows = lax.broadcast_in_dim(alpha, (ROWS_PER_WG, cfg.row_elems), [0])
    if p_in_regs:
        acc = tuple(a * alpha_rows for a in acc)  # rescaled in the softmax phase
    l_i = l_i * alpha + p.sum(axis=1)
    p16 = p.astype(cfg.dtype)
    if p_in_regs and cfg.head_chunks * cfg.row_elems <= 128:
        # jax's FA3 kernel pins this order for head_dim <= 128 (faster there)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
    return acc, m_new, l_i, p16, alpha_rows


def _pv(acc, p16, alpha_rows, slot, *, cfg: _KernelConfig, smem: _SharedMem, wg):
    """O = O * alpha + P V against V slot ``slot``: acc (HC x [64, R] f32), p16 [64, block_t].

    GPU form (``smem.p_smem`` None): acc was rescaled by `_online_softmax`; P from registers,
    accumulated into O in place. Interpreter form: P through ``smem.p_smem[wg]``, P V into fresh
    accumulators, then O * alpha_rows + P V.
    """
    hc = cfg.head_chunks
    v_smem, p_smem = smem.v_smem, smem.p_smem
    if p_smem is None:
        # jax's FA3 form: P from registers, accumulated into O in place
        def pv(acc_refs):
            for c in range(hc):
                plgpu.wgmma(acc_refs[c], p16, v_smem.at[slot, c])

        return pl.run_state(pv)(tuple(plgpu.ACC.init(a) for a in acc))
    # interpreter: its wgmma takes A only from shared memory and it runs neither
    # pl.run_state nor stores to accumulators: P through shared memory, P V into
    # fresh accumulators, O = O * alpha + P V
    p_smem.at[wg][...] = p16
    plgpu.commit_smem()

    def pv_fresh(*acc_refs):
        for c in range(hc):
            plgpu.wgmma(acc_refs[c], p_smem.at[wg], v_smem.at[slot, c])
        return tuple(a[...] for a in acc_refs)

    pv_out = pl.run_scoped(pv_fresh, *[plgpu.ACC((ROWS_PER_WG, cfg.row_elems), jnp.float32)] * hc)
    return tuple(a * alpha_rows + o for a, o in zip(acc, pv_out, strict=True))


def _skip_step(j, carry, *, cfg: _KernelConfig, smem: _SharedMem):
    """A step past every position of this warpgroup's rows: no math, but the same barrier
    arrivals and waits as `_kv_step` (K/V slot ``j % stages``, two schedule rounds), so the
    barriers stay in step. carry passes through."""
    slot = lax.rem(j, cfg.stages)
    plgpu.barrier_wait(smem.k_ready.at[slot])
    _schedule_round(smem.sched)
    plgpu.barrier_arrive(smem.k_free.at[slot])
    plgpu.barrier_arrive(smem.sched)
    plgpu.barrier_wait(smem.v_ready.at[slot])
    plgpu.barrier_wait(smem.sched)
    plgpu.barrier_arrive(smem.v_free.at[slot])
    return carry


def _epilogue(o_ref, lse_ref, cfg: _KernelConfig, smem: _SharedMem, cta: _CtaWork, qo, acc, m_i,
              l_i) -> None:
    """A compute warpgroup's output: O = acc / l (acc HC x [64, R], m_i and l_i [64] f32) in the
    KV dtype through its Q buffer qo [HC, 64, R] to o_ref [NB, KVH, splits, 2, HC, 64, R], and
    the natural-log lse (-inf for a row that saw no key) through ``smem.lse_smem[wg]`` to lse_ref
    [NB, KVH, splits, 2, 64], both by TMA."""
    wg = cta.wg
    seen = l_i > 0.0
    l_safe = jnp.where(seen, l_i, 1.0)
    inv = 1.0 / l_safe
    for c in range(cfg.head_chunks):
        qo.at[c][...] = (acc[c] * lax.broadcast_in_dim(inv, acc[c].shape, [0])).astype(cfg.dtype)
    smem.lse_smem.at[wg][...] = jnp.where(seen, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(qo, o_ref.at[cta.blk, cta.head, cta.split, wg])
    plgpu.copy_smem_to_gmem(smem.lse_smem.at[wg], lse_ref.at[cta.blk, cta.head, cta.split, wg])
    plgpu.wait_smem_to_gmem(0)


def _memory_warpgroup(tbl_ref, arena_ref, tails_ref, cfg: _KernelConfig, smem: _SharedMem,
                      cta: _CtaWork) -> None:
    """The memory warpgroup: streams the CTA's ``cta.n`` KV steps into the K/V slots by TMA.

    Step j fills slot ``j % stages`` (K, then V, each once both compute warpgroups freed it from
    step ``j - stages``) with the pieces `_piece_sources` names, via `_issue_pieces`; then waits
    on the last release of every slot, so that every phase of a barrier is waited on.
    tbl_ref [B, max_pages] int32; arena_ref [num_pages * rows_per_page, R]; tails_ref
    (`tail_pieces`).
    """
    plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
    stages, n = cfg.stages, cta.n
    head_rows = cta.head * cfg.head_stride_rows
    tail0 = (cta.seq * cfg.kv_heads + cta.head) * 2 * cfg.head_chunks
    issue = functools.partial(_issue_pieces, arena_ref, tails_ref, cfg, tail0)

    @pl.loop(0, n)
    def _(j):
        slot = lax.rem(j, stages)
        srcs = _piece_sources(tbl_ref, cfg, cta, head_rows, j)

        @pl.when(j >= stages)
        def _():
            plgpu.barrier_wait(smem.k_free.at[slot])

        issue(srcs, 0, smem.k_smem, smem.k_ready, slot)

        @pl.when(j >= stages)
        def _():
            plgpu.barrier_wait(smem.v_free.at[slot])

        issue(srcs, 1, smem.v_smem, smem.v_ready, slot)

    # observe the last consumption of every slot (every phase of a barrier is waited on)
    @pl.loop(jnp.maximum(n - stages, 0), n)
    def _(j):
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(smem.k_free.at[slot])
        plgpu.barrier_wait(smem.v_free.at[slot])


def _piece_sources(tbl_ref, cfg: _KernelConfig, cta: _CtaWork, head_rows, j):
    """Per piece of step j: (its rows below kv_len, in [0, piece]; the arena row of its K chunk 0
    for this KV head, head_rows = head * head_stride_rows, from the page the table names)."""
    t_pp, piece = cfg.tokens_per_page, cfg.piece
    out = []
    for i in range(cfg.n_pieces):
        tok = cta.k_start + j * cfg.block_t + i * piece
        nv = jnp.clip(cta.kv_len - tok, 0, piece)
        page = tbl_ref[cta.seq, jnp.minimum(lax.div(tok, t_pp), cfg.max_pages - 1)]
        page = jnp.clip(page, 0, cfg.num_pages - 1)
        out.append((nv, page * cfg.rows_per_page + head_rows + lax.rem(tok, t_pp)))
    return out


def _issue_pieces(arena_ref, tails_ref, cfg: _KernelConfig, tail0, srcs, kv: int, slots, ready,
                  slot) -> None:
    """TMA copies of one step's K (kv 0) or V (kv 1) into ``slots[slot]`` [HC, block_t, R], all
    arriving at ``ready[slot]``: per piece of ``srcs`` (`_piece_sources`) and head chunk, from the
    arena when the piece is all below kv_len, else from tails_ref (`tail_pieces`: the straddling
    piece, whose index for this (sequence, head) starts at tail0, or the zero piece)."""
    hc, piece, t_pp = cfg.head_chunks, cfg.piece, cfg.tokens_per_page
    zero_piece = cfg.zero_piece
    for i, (nv, row0) in enumerate(srcs):
        for c in range(hc):
            dst = slots.at[slot, c, pl.ds(i * piece, piece)]
            row = row0 + (kv * hc + c) * t_pp

            @pl.when(nv == piece)
            def _(dst=dst, row=row):
                src = arena_ref.at[pl.ds(pl.multiple_of(row, 8), piece)]
                plgpu.copy_gmem_to_smem(src, dst, ready.at[slot])

            @pl.when(nv < piece)
            def _(dst=dst, nv=nv, c=c):
                t = jnp.where(nv == 0, zero_piece, tail0 + kv * hc + c)
                src = tails_ref.at[pl.ds(pl.multiple_of(t * piece, 8), piece)]
                plgpu.copy_gmem_to_smem(src, dst, ready.at[slot])


def _kernel(meta_ref, tbl_ref, q_ref, arena_ref, tails_ref, o_ref, lse_ref, *, geom: PageGeometry,
            group: int, block_t: int, piece: int, stages: int, num_splits: int, scale: float,
            soft_cap: float | None, window: int | None, p_in_smem: bool) -> None:
    """One CTA: rows [128] of query block ``blk`` for KV head ``head``, keys of split ``split``.

    meta_ref [NB, 5] (`block_meta`), tbl_ref [B, max_pages] int32; q_ref [NB, KVH, 2, HC, 64, R];
    arena_ref [num_pages * rows_per_page, R]; tails_ref (`tail_pieces`); o_ref [NB, KVH, splits,
    2, HC, 64, R] (KV dtype, normalised); lse_ref [NB, KVH, splits, 2, 64] f32.
    Allocates the shared memory and barriers (`_SharedMem`), then warpgroups 0 and 1 run
    `_compute_warpgroup` and warpgroup 2 `_memory_warpgroup`.
    """
    hc, r = geom.head_chunks, geom.row_elems
    dt = arena_ref.dtype
    cfg = _KernelConfig(
        head_chunks=hc, row_elems=r, tokens_per_page=geom.tokens_per_page,
        rows_per_page=geom.rows_per_page, kv_heads=geom.spec.kv_heads,
        head_stride_rows=geom.head_stride_rows, dtype=dt, group_shift=group.bit_length() - 1,
        tokens_per_wg=ROWS_PER_WG // group, block_t=block_t, piece=piece,
        n_pieces=block_t // piece, stages=stages, num_splits=num_splits,
        zero_piece=tbl_ref.shape[0] * geom.spec.kv_heads * 2 * hc, max_pages=tbl_ref.shape[1],
        num_pages=arena_ref.shape[0] // geom.rows_per_page, scale=scale, soft_cap=soft_cap,
        window=window)

    def body(*scratch):
        smem = _SharedMem(*scratch)
        cta = _cta_work(meta_ref, cfg)
        pl.when(cta.wg < COMPUTE_WGS)(
            functools.partial(_compute_warpgroup, q_ref, o_ref, lse_ref, cfg, smem, cta))
        pl.when(cta.wg == COMPUTE_WGS)(
            functools.partial(_memory_warpgroup, tbl_ref, arena_ref, tails_ref, cfg, smem, cta))

    tile = dict(transforms=(plgpu.TilingTransform((8, 128 // jnp.dtype(dt).itemsize)),
                            plgpu.SwizzleTransform(128)))
    copies = cfg.n_pieces * hc  # TMA copies arriving at a K (or V) barrier per step
    pl.run_scoped(
        body,
        plgpu.SMEM((COMPUTE_WGS, hc, ROWS_PER_WG, r), dt, **tile),
        plgpu.SMEM((stages, hc, block_t, r), dt, **tile),
        plgpu.SMEM((stages, hc, block_t, r), dt, **tile),
        plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG), jnp.float32),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
        plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
        *([plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, block_t), dt, **tile)] if p_in_smem else []),
        collective_axes="wg",
    )


_STATIC = ("geom", "scale", "soft_cap", "window", "backend", "block_t", "stages", "num_splits",
           "return_lse")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _prefill_mgpu(q, arena, page_table, kv_lens, cu_q_lens, *, geom, scale, soft_cap, window,
                  backend, block_t, stages, num_splits, return_lse):
    """`paged_prefill_attention_mgpu` after its checks: pack the query blocks, launch, combine
    the splits, scatter the rows back to token order."""
    t, hq, d = q.shape
    kvh, hc, r = geom.spec.kv_heads, geom.head_chunks, geom.row_elems
    g = hq // kvh
    gp = next_pow2(g)
    bq = BLOCK_ROWS // gp  # tokens per query block
    dt = arena.dtype
    kv_lens = kv_lens.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    page_table = page_table.astype(jnp.int32)
    piece = math.gcd(geom.tokens_per_page, block_t)

    qg = jnp.pad(q.reshape(t, kvh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    qp = pack_query_chunks(qg, geom, (d,)).astype(dt)  # [T, KVH, Gp, HC * R]
    blk_seq, pos0, nq, tok_idx = query_blocks(cu_q_lens, kv_lens, t, bq)
    nb = blk_seq.shape[0]
    qrows = jnp.take(qp, tok_idx.reshape(-1), axis=0, mode="fill", fill_value=0)
    qb = qrows.reshape(nb, bq, kvh, gp, hc, r).transpose(0, 2, 4, 1, 3, 5)
    qb = qb.reshape(nb, kvh, hc, COMPUTE_WGS, ROWS_PER_WG, r).transpose(0, 1, 3, 2, 4, 5)

    interpret = None
    if backend == "interpret":
        from jax._src.pallas.mosaic_gpu.interpret import params

        interpret = params.InterpretGPUParams()
    kernel = functools.partial(
        _kernel, geom=geom, group=gp, block_t=block_t, piece=piece, stages=stages,
        num_splits=num_splits, scale=scale, soft_cap=soft_cap, window=window,
        p_in_smem=backend == "interpret")
    o, lse = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((nb, kvh, num_splits, COMPUTE_WGS, hc, ROWS_PER_WG, r), dt),
            jax.ShapeDtypeStruct((nb, kvh, num_splits, COMPUTE_WGS, ROWS_PER_WG), jnp.float32),
        ),
        grid=(num_splits, kvh, nb),  # Mosaic GPU maps the last axis to CUDA's x: blocks fastest
        grid_names=("split", "head", "blk"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        # row reductions of the WGMMA layout stay within a warp: no shared-memory scratch (its
        # default 2 KiB would leave 3 stages of 128 keys 120 bytes short)
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=interpret,
    )(block_meta(blk_seq, pos0, nq, kv_lens, block_t, window), page_table, qb,
      arena.reshape(-1, r), tail_pieces(arena, page_table, kv_lens, geom, piece))

    w = hc * r
    o = o.transpose(0, 1, 2, 3, 5, 4, 6).reshape(nb, kvh, num_splits, BLOCK_ROWS, w)
    lse = lse.reshape(nb, kvh, num_splits, BLOCK_ROWS)
    if num_splits == 1:
        o, lse = o[:, :, 0], lse[:, :, 0]
    else:
        o, lse = split_softmax_combine(o.astype(jnp.float32), lse,
                                       jnp.isfinite(lse).astype(jnp.float32), axis=2,
                                       return_lse=True)
    o = o.reshape(nb, kvh, bq, gp, w).transpose(0, 2, 1, 3, 4).reshape(nb * bq, kvh, gp, w)
    # back to token order as a gather in o's dtype (bf16 unless splits were combined in f32)
    rows = token_block_rows(cu_q_lens, t, bq)
    out = jnp.take(o, rows, axis=0, mode="fill", fill_value=0)
    out = out[:, :, :g, :d].reshape(t, hq, d).astype(q.dtype)
    if not return_lse:
        return out
    lse = lse.reshape(nb, kvh, bq, gp).transpose(0, 2, 1, 3).reshape(nb * bq, kvh, gp)
    lse_out = jnp.take(lse, rows, axis=0, mode="fill", fill_value=-jnp.inf)
    return out, lse_out[:, :, :g].reshape(t, hq)


def paged_prefill_attention_mgpu(
    q: jax.Array,
    arena: jax.Array,
    page_table: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    geom: PageGeometry,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    window: int | None = None,
    backend: str = "gpu",
    block_t: int | None = None,
    stages: int | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Chunked-prefill attention (GQA/MQA/MHA) over paged KV on Hopper tensor cores (module doc).

    q: [T, num_q_heads, head_dim] the chunk queries of all sequences, packed (cast to the arena's
      dtype for the tensor cores).
    arena: [num_pages, rows_per_page, R] bf16/f16; page_table: [B, max_pages] int32 (-1 past a
      sequence's pages); kv_lens: [B] int32 tokens in each sequence's cache INCLUDING this chunk;
      cu_q_lens: [B + 1] int32 prefix offsets of each sequence's queries in q.
    scale: score scale (default head_dim ** -0.5); soft_cap: ``cap * tanh(s / cap)`` on the scaled
      scores; window: sliding window (a query at position p sees keys in ``(p - window, p]``).
    backend: "gpu" (Mosaic GPU) or "interpret" (its interpreter on CPU).
    block_t: keys per KV step, 64 or 128 (default 128); stages: K/V shared-memory slots (default
      2); num_splits: KV splits per query block (default `default_num_splits`).
    Returns [T, num_q_heads, head_dim] in q's dtype (rows outside every sequence 0); with
    ``return_lse`` the pair ``(out, lse)``, lse [T, num_q_heads] float32 the natural-log sum-exp
    of each row's scaled (soft-capped) scores over the keys it sees (-inf where it sees none).
    Raises ValueError for what the kernel cannot do (module doc, "Requirements").
    """
    block_t = block_t or DEFAULT_BLOCK_T
    stages = stages or DEFAULT_STAGES
    check_args(q, arena, kv_lens, cu_q_lens, geom, backend=backend, block_t=block_t, stages=stages)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if num_splits is None:
        gp = next_pow2(q.shape[1] // geom.spec.kv_heads)
        nb = -(-q.shape[0] * gp // BLOCK_ROWS) + kv_lens.shape[0]
        max_tokens = page_table.shape[1] * geom.tokens_per_page
        if window is not None:
            max_tokens = min(max_tokens, window + BLOCK_ROWS // gp)
        num_splits = default_num_splits(nb, geom.spec.kv_heads, max_tokens, block_t)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")
    return _prefill_mgpu(q, arena, page_table, kv_lens, cu_q_lens, geom=geom, scale=scale,
                         soft_cap=None if soft_cap is None else float(soft_cap), window=window,
                         backend=backend, block_t=block_t, stages=stages, num_splits=num_splits,
                         return_lse=return_lse)


def check_args(q: jax.Array, arena: jax.Array, kv_lens: jax.Array, cu_q_lens: jax.Array,
               geom: PageGeometry, *, backend: str, block_t: int, stages: int) -> None:
    """Raises ValueError for a call `paged_prefill_attention_mgpu` cannot run (module doc)."""
    if backend not in ("gpu", "interpret"):
        raise ValueError(f"backend {backend!r}: expected 'gpu' or 'interpret'")
    check_gqa_prefill_args(q, kv_lens, cu_q_lens, geom, "paged_prefill_attention_mgpu")
    dt = jnp.dtype(arena.dtype)
    if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"wgmma needs a bf16/f16 arena, got {dt}")
    r = geom.row_elems
    if r not in (64, 128) or arena.shape[-1] != r:
        raise ValueError(f"arena row width R={r}: expected 64 or 128 (whole 128-byte swizzle tiles)")
    group = q.shape[1] // geom.spec.kv_heads
    if group > ROWS_PER_WG:
        raise ValueError(f"GQA group {group} > {ROWS_PER_WG} query heads per KV head")
    if block_t not in (64, 128):
        raise ValueError(f"block_t={block_t}: expected 64 or 128")
    piece = math.gcd(geom.tokens_per_page, block_t)
    if piece % 8:
        raise ValueError(f"tokens_per_page={geom.tokens_per_page}: gcd with block_t={block_t} is "
                         f"{piece}, not a multiple of 8 rows (one TMA piece)")
    if geom.rows_per_page % 8:
        raise ValueError(f"rows_per_page={geom.rows_per_page}: not a multiple of 8 (the kernel "
                         "asserts its TMA row offsets are)")
    if stages < 2:
        raise ValueError(f"stages={stages} must be >= 2")
    need = smem_bytes(geom.head_chunks, r, block_t, stages, dt.itemsize)
    if need > SMEM_BYTES - SMEM_SLACK:
        raise ValueError(f"block_t={block_t}, {stages} stages, {geom.head_chunks} head chunks: "
                         f"{need} bytes of shared memory, over {SMEM_BYTES - SMEM_SLACK}")


__all__ = ["block_meta", "check_args", "default_num_splits", "paged_prefill_attention_mgpu",
           "smem_bytes", "tail_pieces"]
