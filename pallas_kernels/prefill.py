"""Chunked-prefill attention over paged KV, ragged over several sequences in one call.

Public API (backend from the platform unless ``backend=`` says otherwise):

* `paged_prefill_attention` -- GQA / MQA / MHA.
* `paged_mla_prefill_attention` -- DeepSeek MLA, absorbed (latent) form, over the paged latents.
* `paged_prefill_attention_reference`, `paged_mla_prefill_attention_reference` -- plain jnp.

Contract: the chunk's own K/V are appended to the pages FIRST (`pallas_kernels.append`), so the
kernel only reads pages. Sequence b contributes ``q_len_b = cu_q_lens[b+1] - cu_q_lens[b]`` query
tokens (rows ``cu_q_lens[b] : cu_q_lens[b+1]`` of q) at absolute positions
``kv_lens[b] - q_len_b + [0, q_len_b)``; each attends to positions ``<= its own`` (the paged
prefix plus, causally, the chunk), and with a sliding window only to ``> own - window``.

MLA: a prefill chunk may also be computed by the caller in the non-absorbed form (expanding the
latents into per-head K/V with a dense attention); the absorbed form here reads only the pages.

Internally the queries are cut into blocks of ``block_q`` tokens of one sequence and run by the
shared core (`pallas_kernels.attention_core`), the same kernels as decode.

``return_lse=True`` also returns each query row's float32 log-sum-exp (see
`pallas_kernels.decode.paged_decode_attention`); -inf for rows outside every sequence.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import (
    lse_from,
    next_pow2,
    pack_query_chunks,
    resolve_backend,
    softcap_scores,
)
from pallas_kernels.attention_core import num_sms, run_blocks
from pallas_kernels.page_layout import KVKind, PageGeometry
from pallas_kernels.paged_reference import read_features


def row_seq_pos(cu_q_lens: jax.Array, kv_lens: jax.Array, num_tokens: int):
    """(sequence [T], position [T], valid [T]) of each query row."""
    rows = jnp.arange(num_tokens, dtype=jnp.int32)
    b = jnp.searchsorted(cu_q_lens[1:], rows, side="right").astype(jnp.int32)
    valid = (rows >= cu_q_lens[0]) & (rows < cu_q_lens[-1])
    b = jnp.minimum(b, kv_lens.shape[0] - 1)
    q_len = cu_q_lens[b + 1] - cu_q_lens[b]
    pos = kv_lens[b] - q_len + (rows - cu_q_lens[b])
    return b, pos, valid


def _prefill_dense(parts, values, cu_q_lens, kv_lens, max_len, scale, soft_cap, window):
    """parts: [(q [T, K, G, d], k [B, K, L, d])...], values [B, K, L, W].

    Returns (out [T, K, G, W] f32, lse [T, K, G] f32; -inf for a row that sees no key).
    """
    t = parts[0][0].shape[0]
    b, pos, valid = row_seq_pos(cu_q_lens, kv_lens, t)
    hp = lax.Precision.HIGHEST
    s = sum(
        jnp.einsum("tkgd,tkld->tkgl", qi.astype(jnp.float32), ki[b].astype(jnp.float32),
                   precision=hp)
        for qi, ki in parts
    )
    s = softcap_scores(s * scale, soft_cap)
    kpos = jnp.arange(max_len, dtype=jnp.int32)[None, :]
    mask = (kpos <= pos[:, None]) & (kpos < kv_lens[b][:, None]) & valid[:, None]
    if window is not None:
        mask = mask & (kpos > pos[:, None] - window)
    m4 = mask[:, None, None, :]
    s = jnp.where(m4, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isneginf(mx), 0.0, mx)
    p = jnp.where(m4, jnp.exp(s - mx), 0.0)
    den = jnp.sum(p, axis=-1, keepdims=True)
    v = values[b].astype(jnp.float32)  # [T, K, L, W]
    v = jnp.where(mask[:, None, :, None], v, 0.0)
    o = jnp.einsum("tkgl,tklw->tkgw", p, v, precision=hp)
    out = jnp.where(den > 0, o / jnp.where(den > 0, den, 1.0), 0.0)
    return out, lse_from(mx[..., 0], den[..., 0])


def paged_prefill_attention_reference(
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
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Plain-jnp GQA chunked-prefill attention (fp32 math). Same contract as the kernel."""
    t, hq, d = q.shape
    kvh = geom.spec.kv_heads
    scale = d**-0.5 if scale is None else scale
    max_len = page_table.shape[1] * geom.tokens_per_page
    f = read_features(arena, geom, page_table, max_len)
    qg = q.reshape(t, kvh, hq // kvh, d)
    o, lse = _prefill_dense([(qg, f["k"])], f["v"], cu_q_lens, kv_lens, max_len, scale,
                            soft_cap, window)
    out = o.reshape(t, hq, d).astype(q.dtype)
    return (out, lse.reshape(t, hq)) if return_lse else out


def paged_mla_prefill_attention_reference(
    q_latent: jax.Array,
    q_rope: jax.Array,
    arena: jax.Array,
    page_table: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    geom: PageGeometry,
    *,
    scale: float,
    soft_cap: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Plain-jnp MLA (absorbed) chunked-prefill attention. Same contract as the kernel."""
    max_len = page_table.shape[1] * geom.tokens_per_page
    f = read_features(arena, geom, page_table, max_len)
    lat = f["latent"][:, None]
    parts = [(q_latent[:, None], lat)]
    if geom.spec.rope_dim:
        parts.append((q_rope[:, None], f["rope"][:, None]))
    o, lse = _prefill_dense(parts, lat, cu_q_lens, kv_lens, max_len, scale, soft_cap, window)
    out = o[:, 0].astype(q_latent.dtype)
    return (out, lse[:, 0]) if return_lse else out


def _blocks_per_sequence(cu_q_lens: jax.Array, block_q: int, skip_one_row: bool
                         ) -> tuple[jax.Array, jax.Array]:
    """(q_lens [B], query blocks of each sequence [B]); with skip_one_row a one-query sequence
    has none."""
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    nblk = (q_lens + block_q - 1) // block_q
    if skip_one_row:
        nblk = jnp.where(q_lens == 1, 0, nblk)
    return q_lens, nblk


def query_blocks(cu_q_lens: jax.Array, kv_lens: jax.Array, num_tokens: int, block_q: int,
                 skip_one_row: bool = False):
    """Cuts each sequence's queries into blocks of ``block_q`` tokens.

    Returns (blk_seq, blk_pos0, blk_nq: [NB] int32, tok_idx: [NB, block_q] int32 row of q for
    each block slot, ``num_tokens`` where unused) with the static
    ``NB = ceil(num_tokens / block_q) + B``; unused blocks have blk_seq = -1.
    skip_one_row: sequences with exactly one query get no block (the caller runs them otherwise).
    """
    nseq = kv_lens.shape[0]
    q_lens, nblk = _blocks_per_sequence(cu_q_lens, block_q, skip_one_row)
    ends = jnp.cumsum(nblk)
    max_blocks = -(-num_tokens // block_q) + nseq
    i = jnp.arange(max_blocks, dtype=jnp.int32)
    b = jnp.searchsorted(ends, i, side="right", method="compare_all").astype(jnp.int32)
    b = jnp.minimum(b, nseq - 1)
    live = i < ends[-1]
    j = i - (ends[b] - nblk[b])
    q0 = j * block_q
    nq = jnp.where(live, jnp.clip(q_lens[b] - q0, 0, block_q), 0)
    pos0 = kv_lens[b] - q_lens[b] + q0
    slot = jnp.arange(block_q, dtype=jnp.int32)[None, :]
    tok_idx = jnp.where(slot < nq[:, None], cu_q_lens[b][:, None] + q0[:, None] + slot,
                        num_tokens)
    return jnp.where(live, b, -1), pos0, nq, tok_idx


def token_block_rows(cu_q_lens: jax.Array, num_tokens: int, block_q: int,
                     skip_one_row: bool = False) -> jax.Array:
    """The inverse of `query_blocks`' tok_idx: [num_tokens] int32, each query row's place in the
    flat block order ``[NB * block_q]`` (block ``i`` slot ``j`` is ``i * block_q + j``), or
    ``NB * block_q`` (out of range) for rows in no block (before the first sequence or past the
    last; with skip_one_row, those of one-query sequences). Reading a kernel's blocked output
    through it (`jnp.take` with ``mode="fill"``) puts rows back in token order as a gather, in
    the output's own dtype, instead of a scatter into a zeroed f32 array."""
    nseq = cu_q_lens.shape[0] - 1
    _, nblk = _blocks_per_sequence(cu_q_lens, block_q, skip_one_row)
    first_blk = jnp.cumsum(nblk) - nblk
    none = (-(-num_tokens // block_q) + nseq) * block_q
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    s = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right", method="compare_all") - 1, 0, nseq - 1)
    p = t - cu_q_lens[s]
    ok = (t >= cu_q_lens[0]) & (t < cu_q_lens[-1]) & (p < nblk[s] * block_q)
    return jnp.where(ok, (first_blk[s] + p // block_q) * block_q + p % block_q, none).astype(jnp.int32)


def _run_prefill(qp, arena, page_table, kv_lens, cu_q_lens, geom, *, group_block, block_q,
                 return_lse=False, skip_one_row=False, **kw):
    """qp: [T, KVH, Gp, q_width] -> [T, KVH, Gp, out_width] f32 (rows outside sequences: 0).

    return_lse: also return lse [T, KVH, Gp] f32 (rows outside sequences: -inf).
    skip_one_row: leave the rows of one-query sequences out (0; lse -inf).
    """
    t, kvh, gp, wq = qp.shape
    num_gb = gp // group_block
    blk_seq, pos0, nq, tok_idx = query_blocks(cu_q_lens, kv_lens, t, block_q, skip_one_row)
    nb = blk_seq.shape[0]
    qrows = jnp.take(qp, tok_idx.reshape(-1), axis=0, mode="fill", fill_value=0)
    qb = qrows.reshape(nb, block_q, kvh, num_gb, group_block, wq)
    qb = qb.transpose(0, 2, 3, 1, 4, 5).reshape(nb, kvh * num_gb, block_q * group_block, wq)
    out = run_blocks(qb, blk_seq, pos0, nq, kv_lens, page_table, arena, geom,
                     rows_per_token=group_block, num_gb=num_gb, return_lse=return_lse, **kw)
    if return_lse:
        out, lse = out
    wv = out.shape[-1]
    out = out.reshape(nb, kvh, num_gb, block_q, group_block, wv).transpose(0, 3, 1, 2, 4, 5)
    out = out.reshape(nb * block_q, kvh, gp, wv)
    rows = token_block_rows(cu_q_lens, t, block_q, skip_one_row)
    res = jnp.take(out.astype(jnp.float32), rows, axis=0, mode="fill", fill_value=0)
    if not return_lse:
        return res
    lse = lse.reshape(nb, kvh, num_gb, block_q, group_block).transpose(0, 3, 1, 2, 4)
    lse = lse.reshape(nb * block_q, kvh, gp)
    return res, jnp.take(lse, rows, axis=0, mode="fill", fill_value=-jnp.inf)


# GQA / MHA chunked prefill on GPU, unless the caller sets them: 128 query rows per program (block_q
# = 128 / the padded group), 128-token KV blocks, 8 warps, 3 stages (and then 4 KV splits). Measured on one
# H200 (benchmarks/prefill_attention.py, docs/kernels.md, 2026-12-04): the fastest of 9
# configurations at 8K and 32K tokens of context for OLMoE (16/16 heads: 1.22x and 1.44x the
# previous 64 rows / 64-token blocks / 4 warps / 2 stages / 1 split) and Qwen3-30B-A3B (32/4 heads:
# 1.02x, 1.08x), and faster than those in all 8 cases of that sweep (a second run: 1.24-1.45x at
# 8K-32K; one case slower, OLMoE with no context, 313 vs 131 us, the process's first timed kernel).
GPU_PREFILL_DEFAULTS = {"rows": 128, "block_t": 128, "num_warps": 8, "num_stages": 3}
# KV splits on GPU, unless the caller sets them: `prefill_num_splits`. Measured on one H100
# (benchmarks/prefill_attention.py, docs/kernels.md, 2026-12-06), chunks of 2,048 tokens after 0 /
# 2K / 30K tokens of context and of 512 after 0 / 8K / 32K, at 1, 2 and 4 splits: OLMoE (16/16
# heads; 17 or 5 query blocks read each KV head) is fastest at 2 / 2 / 4 and 4 / 4 / 4 splits (1
# split up to 1.31x slower at 30K); Qwen3-30B-A3B (32/4 heads; 129 or 33 query blocks read each
# KV head) at 1 split in every case (4 splits up to 1.5x slower: the 512-token chunk with no
# context). Each split adds an f32 partial output that the jnp combine reads (the 4K prefill's
# `input_scatter_fusion`, 62 us a layer for OLMoE at 4).
PREFILL_SHARED_KV_BLOCKS = 32  # a chunk of this many query blocks: 1 split (they fill the GPU)
PREFILL_PROGRAMS_PER_SM = 4  # else programs aimed at: this many per SM, to the nearest split
PREFILL_TOKENS_PER_SPLIT = 8192  # and at least one split per this many tokens of the page table
PREFILL_MAX_SPLITS = 4


def prefill_num_splits(num_blocks: int, kv_heads: int, sequences: int, max_tokens: int,
                       block_t: int) -> int:
    """KV splits of a GPU prefill launch from static shapes.

    One split when the chunk's tokens fill `PREFILL_SHARED_KV_BLOCKS` query blocks or more
    (``ceil(T / block_q)``, whatever the slots: an engine's prefill call pads its slots, and its
    chunk is mostly one or a few sequences, so many programs read each KV head and more splits
    only add partial outputs to combine); else the nearest whole number of splits to
    `PREFILL_PROGRAMS_PER_SM` programs per SM, or one per `PREFILL_TOKENS_PER_SPLIT` tokens of
    the page table if more; 1 to `PREFILL_MAX_SPLITS`, never a split under one KV block.

    num_blocks: query blocks of the launch (``ceil(T / block_q) + B``); kv_heads: programs per
    block (KV heads x head blocks); sequences: B; max_tokens: the longest KV range a block can
    see (tokens)."""
    if num_blocks - sequences >= PREFILL_SHARED_KV_BLOCKS:
        return 1
    programs = max(1, num_blocks * kv_heads)
    want = max(round(PREFILL_PROGRAMS_PER_SM * num_sms() / programs),
               -(-max_tokens // PREFILL_TOKENS_PER_SPLIT))
    return int(max(1, min(want, PREFILL_MAX_SPLITS, -(-max_tokens // block_t))))


def _min_rows(backend: str) -> int:
    return 16 if backend in ("gpu", "interpret") else 8


def _default_block_q(rows_per_token: int, backend: str) -> int:
    return max(1, max(64, _min_rows(backend)) // rows_per_token)


_STATIC = ("geom", "scale", "soft_cap", "window", "backend", "schedule", "block_q", "num_splits",
           "block_t", "group_block", "num_warps", "num_stages", "return_lse")


def _one_row_decode(q, arena, page_table, kv_lens, cu_q_lens, out, lse, *, geom, scale, soft_cap,
                    window, backend):
    """Writes the rows of one-query sequences into (out [T, Hq, d], lse [T, Hq] or None) from the
    decode kernel: a one-row sequence is a decode step (its query at position kv_len - 1), and the
    decode kernel's KV split rule serves a long context with enough programs, where a prefill
    query block would spend block_q rows of tensor-core work on it."""
    from pallas_kernels.decode import paged_decode_attention

    t = q.shape[0]
    starts = cu_q_lens[:-1]
    one = (cu_q_lens[1:] - starts) == 1
    qd = jnp.take(q, jnp.clip(starts, 0, t - 1), axis=0)  # [B, Hq, d]
    res = paged_decode_attention(qd, arena, page_table, jnp.where(one, kv_lens, 0), geom,
                                 scale=scale, soft_cap=soft_cap, window=window, backend=backend,
                                 return_lse=lse is not None)
    rows = jnp.where(one, starts, t)  # t: dropped
    if lse is None:
        return out.at[rows].set(res.astype(out.dtype), mode="drop"), None
    od, ld = res
    return (out.at[rows].set(od.astype(out.dtype), mode="drop"),
            lse.at[rows].set(ld, mode="drop"))


@functools.partial(jax.jit, static_argnames=(*_STATIC, "one_row_decode"))
def _paged_prefill(q, arena, page_table, kv_lens, cu_q_lens, *, geom, scale, soft_cap, window,
                   backend, schedule, block_q, num_splits, block_t, group_block, num_warps,
                   num_stages, return_lse=False, one_row_decode=False):
    t, hq, d = q.shape
    kvh = geom.spec.kv_heads
    g = hq // kvh
    gp = next_pow2(g)
    if gp < _min_rows(backend) and block_q is not None and block_q * gp < _min_rows(backend):
        gp = _min_rows(backend)
    qg = jnp.pad(q.reshape(t, kvh, g, d), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    qp = pack_query_chunks(qg, geom, (d,))
    bq = block_q or _default_block_q(gp, backend)
    out = _run_prefill(qp, arena, page_table, kv_lens.astype(jnp.int32),
                       cu_q_lens.astype(jnp.int32), geom, group_block=gp, block_q=bq,
                       scale=scale, soft_cap=soft_cap, window=window, backend=backend,
                       schedule=schedule, num_splits=num_splits or 1, block_t=block_t,
                       num_warps=num_warps, num_stages=num_stages, return_lse=return_lse,
                       skip_one_row=one_row_decode)
    lse = None
    if return_lse:
        out, lse = out
        lse = lse[:, :, :g].reshape(t, hq)
    out = out[:, :, :g, :d].reshape(t, hq, d).astype(q.dtype)
    if one_row_decode:
        out, lse = _one_row_decode(q, arena, page_table, kv_lens.astype(jnp.int32),
                                   cu_q_lens.astype(jnp.int32), out, lse, geom=geom, scale=scale,
                                   soft_cap=soft_cap, window=window, backend=backend)
    return out if not return_lse else (out, lse)


def check_gqa_prefill_args(q: jax.Array, kv_lens: jax.Array, cu_q_lens: jax.Array,
                           geom: PageGeometry, caller: str) -> None:
    """The shape checks of a GQA chunked-prefill call (`caller` names it); raises ValueError."""
    if geom.spec.kind != KVKind.GQA:
        raise ValueError(f"{caller} needs a GQA geometry")
    if q.ndim != 3 or q.shape[1] % geom.spec.kv_heads or q.shape[2] != geom.spec.head_dim:
        raise ValueError(f"q {q.shape} does not fit {geom.spec}")
    if cu_q_lens.shape != (kv_lens.shape[0] + 1,):
        raise ValueError(f"cu_q_lens {cu_q_lens.shape} must be [B + 1] for kv_lens {kv_lens.shape}")


def paged_prefill_attention(
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
    backend: str | None = None,
    schedule: str = "split",
    block_q: int | None = None,
    num_splits: int | None = None,
    block_t: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    return_lse: bool = False,
    one_row_decode: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Chunked-prefill attention for a GQA/MQA/MHA model over paged KV (chunk already appended).

    q: [T, num_q_heads, head_dim] the chunk queries of all sequences, packed.
    arena: [num_pages, rows_per_page, R]; page_table: [B, max_pages] int32.
    kv_lens: [B] int32 tokens in each sequence's cache INCLUDING this chunk.
    cu_q_lens: [B + 1] int32 prefix offsets of each sequence's queries in q (non-decreasing;
      ``cu_q_lens[b+1] - cu_q_lens[b] <= kv_lens[b]``). Rows of q outside ``[cu[0], cu[B])``
      produce 0. A sequence with no queries is allowed.
    scale / soft_cap / window / backend / schedule: as `paged_decode_attention`.
    block_q: query tokens per program; num_splits: KV splits per query block; block_t: KV tokens
      per inner block; num_warps / num_stages: the Triton launch. Defaults: on GPU
      `GPU_PREFILL_DEFAULTS` (128 rows / padded group, 128, 8, 3) and `prefill_num_splits` (1 to
      4 splits from the launch's programs and the page table's width); elsewhere 64 rows /
      padded group, 64-token blocks, 4 warps, 2 stages, 1 split.
    return_lse: as `paged_decode_attention` (every backend and schedule).
    one_row_decode: sequences with exactly one query (a mixed step's decode rows) run in the decode
      kernel (`paged_decode_attention`, its split rule) instead of a query block of block_q rows,
      a second launch beside the prefill one (same result; the reference backend ignores it).
    Returns [T, num_q_heads, head_dim] in q's dtype; with ``return_lse`` the pair ``(out, lse)``,
    lse [T, num_q_heads] float32 the log-sum-exp of each row's scores over the keys it sees
    (-inf for rows outside every sequence).
    """
    check_gqa_prefill_args(q, kv_lens, cu_q_lens, geom, "paged_prefill_attention")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    be = resolve_backend(backend)
    if be == "reference":
        return paged_prefill_attention_reference(q, arena, page_table, kv_lens, cu_q_lens, geom,
                                                 scale=scale, soft_cap=soft_cap, window=window,
                                                 return_lse=return_lse)
    if be == "gpu":
        d = GPU_PREFILL_DEFAULTS
        group = next_pow2(q.shape[1] // geom.spec.kv_heads)
        block_q = block_q or max(1, d["rows"] // group)
        # The defaults fill shared memory at bf16 and head_dim 128 (a KV tile is 32 KiB); wider
        # elements or heads take shorter KV blocks (f32 at 128 keys asked 262,656 bytes of the
        # H200's 232,448, 2026-12-05)
        fit = max(16, d["block_t"] * 256 // (jnp.dtype(arena.dtype).itemsize * q.shape[-1]))
        block_t = block_t or min(d["block_t"], 1 << (fit.bit_length() - 1))
        num_warps = num_warps or d["num_warps"]
        num_stages = num_stages or d["num_stages"]
        if not num_splits:
            max_tokens = page_table.shape[1] * geom.tokens_per_page
            if window is not None:
                max_tokens = min(max_tokens, window + block_q)
            b = page_table.shape[0]
            num_splits = prefill_num_splits(-(-q.shape[0] // block_q) + b, geom.spec.kv_heads, b,
                                            max_tokens, block_t)
    num_warps = num_warps or 4
    return _paged_prefill(q, arena, page_table, kv_lens, cu_q_lens, geom=geom, scale=scale,
                          soft_cap=soft_cap, window=window, backend=be, schedule=schedule,
                          block_q=block_q, num_splits=num_splits, block_t=block_t,
                          group_block=None, num_warps=num_warps, num_stages=num_stages,
                          return_lse=return_lse, one_row_decode=one_row_decode)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _paged_mla_prefill(q_latent, q_rope, arena, page_table, kv_lens, cu_q_lens, *, geom, scale,
                       soft_cap, window, backend, schedule, block_q, num_splits, block_t,
                       group_block, num_warps, num_stages, return_lse=False):
    _, h, c = q_latent.shape
    hp = max(_min_rows(backend), next_pow2(h))
    q = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)
    q = jnp.pad(q, ((0, 0), (0, hp - h), (0, 0)))[:, None]  # [T, 1, Hp, C + Rd]
    qp = pack_query_chunks(q, geom, (c, geom.spec.rope_dim) if geom.spec.rope_dim else (c,))
    gb = min(group_block or 64, hp)
    bq = block_q or _default_block_q(gb, backend)
    out = _run_prefill(qp, arena, page_table, kv_lens.astype(jnp.int32),
                       cu_q_lens.astype(jnp.int32), geom, group_block=gb, block_q=bq,
                       scale=scale, soft_cap=soft_cap, window=window, backend=backend,
                       schedule=schedule, num_splits=num_splits or 1, block_t=block_t,
                       num_warps=num_warps, num_stages=num_stages, return_lse=return_lse)
    if not return_lse:
        return out[:, 0, :h, :c].astype(q_latent.dtype)
    out, lse = out
    return out[:, 0, :h, :c].astype(q_latent.dtype), lse[:, 0, :h]


def paged_mla_prefill_attention(
    q_latent: jax.Array,
    q_rope: jax.Array,
    arena: jax.Array,
    page_table: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    geom: PageGeometry,
    *,
    scale: float,
    soft_cap: float | None = None,
    window: int | None = None,
    backend: str | None = None,
    schedule: str = "split",
    block_q: int | None = None,
    num_splits: int | None = None,
    block_t: int | None = None,
    group_block: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """MLA chunked prefill in absorbed form: q_latent [T, H, kv_lora_rank], q_rope [T, H, rope].

    Same contract as `paged_prefill_attention`; ``scale`` is required (see the MLA decode).
    Returns [T, H, kv_lora_rank], the attention-weighted latents, in q_latent's dtype; with
    ``return_lse`` the pair ``(out, lse [T, H] float32)``.
    """
    if geom.spec.kind != KVKind.MLA:
        raise ValueError("paged_mla_prefill_attention needs an MLA geometry")
    if q_latent.shape[-1] != geom.spec.kv_lora_rank or q_rope.shape[-1] != geom.spec.rope_dim:
        raise ValueError(f"q_latent {q_latent.shape} / q_rope {q_rope.shape} do not fit {geom.spec}")
    be = resolve_backend(backend)
    if be == "reference":
        return paged_mla_prefill_attention_reference(q_latent, q_rope, arena, page_table, kv_lens,
                                                     cu_q_lens, geom, scale=scale,
                                                     soft_cap=soft_cap, window=window,
                                                     return_lse=return_lse)
    return _paged_mla_prefill(q_latent, q_rope, arena, page_table, kv_lens, cu_q_lens, geom=geom,
                              scale=float(scale), soft_cap=soft_cap, window=window, backend=be,
                              schedule=schedule, block_q=block_q, num_splits=num_splits,
                              block_t=block_t, group_block=group_block, num_warps=num_warps,
                              num_stages=num_stages, return_lse=return_lse)
