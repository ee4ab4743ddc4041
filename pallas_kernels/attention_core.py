"""The one paged-attention core behind decode and chunked prefill (GQA and MLA alike).

Callers cut their queries into *query blocks*: block i holds ``M`` rows of one sequence
``blk_seq[i]``, ``rows_per_token`` rows per query token (the GQA group or the MLA heads of one
token), for the tokens at absolute positions ``blk_pos0[i] + [0, blk_nq[i])``. Each row attends
causally to the paged KV of its sequence (positions ``<= its own``, and ``> own - window`` with a
sliding window). Decode is the special case of one token per block at position ``length - 1``.

Backends:

* gpu / interpret: `_blocks_gpu` -- grid ``(blocks, kv_heads * group_blocks, splits)``, each
  program a split of the block's KV range, then a jnp log-sum-exp combine of the splits; or the
  persistent kernel (`pallas_kernels.persistent`).
* tpu / tpu_interpret: `pallas_kernels.attention_tpu`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import (
    attend_range_gpu,
    flat_rows,
    gpu_compiler_params,
    interpret_flag,
    split_softmax_combine,
)
from pallas_kernels.page_layout import PageGeometry

DEFAULT_NUM_SMS = 132  # H100 / H200 SXM; used when the device does not report a core count


# The split grid's table rule: at least one KV split per this many tokens of the page table
# (prefill, MLA decode; the Mosaic MLA decode kernel's own rule uses it too).
TOKENS_PER_SPLIT = 16384
# GQA decode: one KV split per this many tokens of the page table instead. Measured on one
# H100, 2026-12-06 (docs/benchmarks.md): OLMoE-1B-7B's decode call of 1 request at 43K tokens in
# an 8-slot, 4,096-page bucket 23.6 -> 18.4 ms (its attention 14.5 -> 9.2 ms), the full bucket of
# 8 x 7.4K 29.1 -> 29.3 ms; 4,096 tokens gave 19.1 ms and 30.5 ms (5% slower on the full bucket).
DECODE_TOKENS_PER_SPLIT = 8192
# A Triton launch's shared memory on an H100 / H200 (bytes a CTA may ask; XLA refuses more)
TRITON_SMEM_BYTES = 232448


def fit_block_t(block_t: int, stages: int, q_rows: int, q_width: int, kv_width: int,
                itemsize: int, smem_bytes: int = TRITON_SMEM_BYTES) -> int:
    """The largest block_t (halving from `block_t`, at least 16) whose query tile [q_rows,
    q_width] plus `stages` KV tiles [block_t, kv_width] fit `smem_bytes`: the Triton kernels'
    shared memory by the tiles they stage (DeepSeek's MLA in the engine's 128-wide arena rows:
    5 chunks of 128 = 640 elements a token, 64 query rows, 64-token blocks, 2 stages asked
    245,760 bytes of an H100's 232,448, 2026-12-06; 576 at 64-wide rows fits)."""
    while block_t > 16 and (q_rows * q_width + stages * block_t * kv_width) * itemsize > smem_bytes:
        block_t //= 2
    return block_t


def num_sms() -> int:
    """Streaming multiprocessors of the default device (DEFAULT_NUM_SMS when not reported)."""
    try:
        n = getattr(jax.devices()[0], "core_count", None)
        return int(n) if n else DEFAULT_NUM_SMS
    except Exception:  # pragma: no cover - device query is best effort
        return DEFAULT_NUM_SMS


def kv_range(pos0, nq, kv_len, window: int | None):
    """[lo, hi) of KV positions a block of queries at ``pos0 + [0, nq)`` can see (hi >= lo)."""
    hi = jnp.minimum(kv_len, pos0 + nq)
    lo = jnp.maximum(pos0 - window + 1, 0) if window is not None else jnp.zeros_like(hi)
    return lo, jnp.maximum(hi, lo)


def _blocks_gpu_kernel(
    seq_ref, pos0_ref, nq_ref, kvlen_ref, split_ref, tbl_ref, q_ref, arena_ref,
    o_ref, m_ref, l_ref,
    *, geom: PageGeometry, rows_per_token: int, num_gb: int, num_splits: int, max_pages: int,
    block_t: int, scale: float, soft_cap: float | None, window: int | None, num_pages: int,
):
    hg = pl.program_id(0)  # heads fastest: MLA head blocks sharing one KV range run together
    blk = pl.program_id(1)
    s = pl.program_id(2)
    h = hg // num_gb
    r = geom.row_elems
    b_raw = seq_ref[blk]
    b = jnp.maximum(b_raw, 0)
    pos0 = pos0_ref[blk]
    nq = jnp.where(b_raw >= 0, nq_ref[blk], 0)
    lo_all, hi_all = kv_range(pos0, nq, kvlen_ref[b], window)
    split = split_ref[0]
    lo = jnp.minimum(lo_all + s * split, hi_all)
    hi = jnp.minimum(lo + split, hi_all)
    kv_dtype = arena_ref.dtype
    m_rows = q_ref.shape[2]
    q_chunks = [q_ref[blk, hg, :, pl.ds(c * r, r)].astype(kv_dtype)
                for c in range(len(geom.score_chunk_rows))]
    q_pos = pos0 + jax.lax.broadcasted_iota(jnp.int32, (m_rows,), 0) // rows_per_token
    m, den, accs = attend_range_gpu(
        q_chunks, arena_ref, tbl_ref,
        table_base=b * max_pages, head_base=h * geom.head_stride_rows, lo=lo, hi=hi,
        geom=geom, block_t=block_t, scale=scale, soft_cap=soft_cap, q_pos=q_pos, window=window,
        num_pages=num_pages,
    )
    idx = (blk * pl.num_programs(0) + hg) * num_splits + s
    for c, acc in enumerate(accs):
        o_ref[idx, :, pl.ds(c * r, r)] = acc
    m_ref[idx, :] = m
    l_ref[idx, :] = den


def blocks_gpu(
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
    num_splits: int,
    block_t: int,
    backend: str,
    num_warps: int,
    num_stages: int,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Split-KV paged attention of query blocks (GPU Triton lowering, or interpret on CPU).

    Grid ``(KVH * num_gb, NB, num_splits)``, heads fastest, so the programs of the head blocks
    that read the same KV (MLA) are launched together and share it through L2.

    qb: [NB, KVH * num_gb, M, q_width] query rows (KV dtype or f32), head index = axis1 // num_gb.
    blk_seq / blk_pos0 / blk_nq: [NB] int32 (blk_seq -1: unused block, output 0).
    kv_lens: [B] int32; page_table: [B, max_pages] int32; arena: [num_pages, rows_per_page, R].
    Returns [NB, KVH * num_gb, M, out_width] f32, normalised (rows that see no key: 0).
    return_lse: return ``(out, lse)``, lse [NB, KVH * num_gb, M] f32 the natural-log sum-exp of
    each row's scaled (soft-capped) scores over the keys it sees (-inf where it sees none).
    """
    nb, hgs, m_rows, _ = qb.shape
    max_pages = page_table.shape[1]
    b_ok = blk_seq >= 0
    kvl = kv_lens[jnp.maximum(blk_seq, 0)]
    lo, hi = kv_range(blk_pos0, jnp.where(b_ok, blk_nq, 0), kvl, window)
    longest = jnp.max(hi - lo) if nb else jnp.int32(0)
    split = (longest + num_splits - 1) // num_splits
    split = ((split + block_t - 1) // block_t * block_t).astype(jnp.int32).reshape(1)
    n_prog = nb * hgs * num_splits
    wv = geom.out_width
    kernel = functools.partial(
        _blocks_gpu_kernel, geom=geom, rows_per_token=rows_per_token, num_gb=num_gb,
        num_splits=num_splits, max_pages=max_pages, block_t=block_t, scale=scale,
        soft_cap=soft_cap, window=window, num_pages=arena.shape[0],
    )
    o, m, den = pl.pallas_call(
        kernel,
        grid=(hgs, nb, num_splits),
        out_shape=(
            jax.ShapeDtypeStruct((n_prog, m_rows, wv), jnp.float32),
            jax.ShapeDtypeStruct((n_prog, m_rows), jnp.float32),
            jax.ShapeDtypeStruct((n_prog, m_rows), jnp.float32),
        ),
        interpret=interpret_flag(backend),
        compiler_params=None if backend != "gpu" else gpu_compiler_params(num_warps, num_stages),
        name="paged_attention",
    )(blk_seq.astype(jnp.int32), blk_pos0.astype(jnp.int32), blk_nq.astype(jnp.int32),
      kv_lens.astype(jnp.int32), split, page_table.reshape(-1).astype(jnp.int32), qb,
      flat_rows(arena))
    shape = (nb, hgs, num_splits, m_rows)
    return split_softmax_combine(o.reshape(*shape, wv), m.reshape(shape), den.reshape(shape),
                                 axis=2, return_lse=return_lse)


def default_num_splits(num_blocks: int, programs_per_block: int, max_tokens: int,
                       block_t: int, tokens_per_split: int = TOKENS_PER_SPLIT) -> int:
    """Static split-KV factor: enough programs for about 2 waves on the GPU, and at least one
    split per `tokens_per_split` tokens the page table can hold (a wide table means a long
    sequence may be there), never a split under one block. The split's length is set at run time
    from the longest live range, so with few live sequences in a wide bucket every split has
    work (GQA decode passes `DECODE_TOKENS_PER_SPLIT`).

    Only shapes are known here: a batch whose lengths are very uneven is better served by the
    persistent schedule (docs/kernels.md, "Measured").
    """
    want = -(-2 * num_sms() // max(1, num_blocks * programs_per_block))
    want = max(want, -(-max_tokens // tokens_per_split))
    return int(max(1, min(want, -(-max_tokens // block_t))))


def run_blocks(
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
    schedule: str = "split",
    num_splits: int | None = None,
    block_t: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    max_kv_tokens: int | None = None,
    num_programs: int | None = None,
    items_per_program: int = 2,
    return_lse: bool = False,
    tokens_per_split: int = TOKENS_PER_SPLIT,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Dispatches query blocks to the backend's kernel. Shapes as `blocks_gpu`.

    schedule: "split" (grid over blocks x heads x splits) or "persistent" (GPU/interpret only:
    one program per SM walking a (block, head, split) work list).
    block_t / num_stages default to 64 / 2, except 128 / 3 for a persistent GQA launch.
    max_kv_tokens: static upper bound of one block's KV range (default: the page table's).
    num_programs / items_per_program: persistent schedule only: programs in the launch (default
    2 x SM count) and work items aimed at per program.
    return_lse: return ``(out, lse)`` as `blocks_gpu` (every backend and schedule).
    tokens_per_split: split schedule without `num_splits`: `default_num_splits`' table rule.
    """
    if backend in ("tpu", "tpu_interpret"):
        from pallas_kernels.attention_tpu import blocks_tpu

        return blocks_tpu(qb, blk_seq, blk_pos0, blk_nq, kv_lens, page_table, arena, geom,
                          rows_per_token=rows_per_token, num_gb=num_gb, scale=scale,
                          soft_cap=soft_cap, window=window, backend=backend,
                          return_lse=return_lse)
    n_tiles = len(set(geom.score_chunk_rows) | set(geom.value_chunk_rows))
    if schedule == "persistent" and n_tiles <= 4:
        # GQA: the best persistent configuration measured on H200 (docs/kernels.md).
        bt, stages = block_t or 128, num_stages or 3
    else:  # MLA keeps 9 [block_t, R] tiles live: 128-token blocks would spill registers.
        bt, stages = block_t or 64, num_stages or 2
    if block_t is None:  # the default shortened until its tiles fit shared memory
        bt = fit_block_t(bt, stages, qb.shape[2], qb.shape[3], n_tiles * geom.row_elems,
                         jnp.dtype(arena.dtype).itemsize)
    if schedule == "persistent":
        from pallas_kernels.persistent import blocks_persistent

        return blocks_persistent(qb, blk_seq, blk_pos0, blk_nq, kv_lens, page_table, arena, geom,
                                 rows_per_token=rows_per_token, num_gb=num_gb, scale=scale,
                                 soft_cap=soft_cap, window=window, block_t=bt, backend=backend,
                                 num_warps=num_warps, num_stages=stages,
                                 num_programs=num_programs,
                                 items_per_program=items_per_program, return_lse=return_lse)
    if schedule != "split":
        raise ValueError(f"unknown schedule {schedule!r}")
    max_tokens = max_kv_tokens or page_table.shape[1] * geom.tokens_per_page
    if window is not None:
        max_tokens = min(max_tokens, window + qb.shape[2] // rows_per_token)
    ns = num_splits or default_num_splits(qb.shape[0], qb.shape[1], max_tokens, bt,
                                           tokens_per_split)
    return blocks_gpu(qb, blk_seq, blk_pos0, blk_nq, kv_lens, page_table, arena, geom,
                      rows_per_token=rows_per_token, num_gb=num_gb, scale=scale,
                      soft_cap=soft_cap, window=window, num_splits=ns, block_t=bt,
                      backend=backend, num_warps=num_warps, num_stages=stages,
                      return_lse=return_lse)
