"""MLA chunked prefill on Hopper tensor cores, through the Mosaic GPU MLA decode kernel.

What it computes: `pallas_kernels.prefill.paged_mla_prefill_attention` (same arguments, same
result): the absorbed-form attention of every query token of a chunk over its sequence's KV up to
and including its own position.

How. In absorbed form every query head reads the same [latent | rope] keys, so one query token
is exactly one decode row of `mla_decode_mgpu` (its 64-head blocks are the wgmma rows) whose
length is its position + 1. The T tokens of a chunk become T decode rows: row t takes its
sequence's page-table row and the length ``kv_len - q_len + i + 1`` for its index i in the
chunk (0 for rows past the last chunk, whose output is then 0 and lse -inf). Nothing is masked
inside a block beyond the decode kernel's own tail mask, so causal masking costs no wasted
score blocks.

Cost. Each row re-reads its sequence's KV; the rows of one sequence run side by side (the
kernel's grid has sequences outermost), so the re-reads are L2 hits, and per KV byte a row does
``2 * heads * (latent + rope + latent) / (latent + rope) / itemsize`` FLOPs (about 240 at
DeepSeek-V3's 128 heads, bf16): above the H200's ~165 FLOP/byte ridge, i.e. compute-bound even
if every re-read went to HBM. The per-row page-table gather is ``T * max_pages`` int32.

Requirements: those of `paged_mla_decode_attention_mgpu` (ValueError otherwise, so a caller can
fall back to the Triton kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import attention_core
from pallas_kernels.mla_decode_mgpu import HEADS_PER_CTA, paged_mla_decode_attention_mgpu
from pallas_kernels.page_layout import KVKind, PageGeometry
from pallas_kernels.prefill import row_seq_pos


def prefill_rows(kv_lens: jax.Array, cu_q_lens: jax.Array, num_tokens: int):
    """Each query row's sequence and the number of keys it sees.

    kv_lens: [B] int32, each sequence's KV length with its chunk; cu_q_lens: [B + 1] int32, the
    chunk boundaries in the rows of q. Returns (seq [T] int32, length [T] int32) for the
    ``num_tokens`` = T rows: its position + 1 (`prefill.row_seq_pos`), 0 for a row outside
    every chunk (its seq is clamped to a valid index).
    """
    seq, pos, valid = row_seq_pos(cu_q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32),
                                  num_tokens)
    return seq, jnp.where(valid, pos + 1, 0)


def paged_mla_prefill_attention_mgpu(
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
    backend: str = "gpu",
    num_splits: int | None = None,
    block_t: int | None = None,
    stages: int | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """MLA chunked prefill in absorbed form on Hopper tensor cores (module doc).

    q_latent: [T, H, kv_lora_rank]; q_rope: [T, H, rope_dim]; arena: [num_pages, rows_per_page,
    R] bf16/f16; page_table: [B, max_pages] int32; kv_lens: [B] int32 (KV length with the
    chunk); cu_q_lens: [B + 1] int32. scale / soft_cap / window / backend / block_t / stages: as
    `paged_mla_decode_attention_mgpu`; num_splits: KV splits per row, by default 1 once the rows'
    head blocks fill the SMs, else the decode kernel's default.
    Returns [T, H, kv_lora_rank] in q_latent's dtype (0 for rows outside every chunk); with
    ``return_lse`` also lse [T, H] f32 (-inf there).
    """
    if geom.spec.kind != KVKind.MLA:
        raise ValueError("paged_mla_prefill_attention_mgpu needs an MLA geometry")
    if cu_q_lens.shape != (kv_lens.shape[0] + 1,) or page_table.shape[0] != kv_lens.shape[0]:
        raise ValueError(f"cu_q_lens {cu_q_lens.shape} / page_table {page_table.shape} do not fit "
                         f"kv_lens {kv_lens.shape}")
    t, h = q_latent.shape[:2]
    if num_splits is None:  # enough CTAs without splitting: a split only adds partials to merge
        rows = t * -(-h // HEADS_PER_CTA)
        num_splits = 1 if rows >= attention_core.num_sms() else None
    seq, length = prefill_rows(kv_lens, cu_q_lens, t)
    return paged_mla_decode_attention_mgpu(
        q_latent, q_rope, arena, page_table.astype(jnp.int32)[seq], length, geom, scale=scale,
        soft_cap=soft_cap, window=window, backend=backend, num_splits=num_splits,
        block_t=block_t, stages=stages, return_lse=return_lse)


__all__ = ["paged_mla_prefill_attention_mgpu", "prefill_rows"]
