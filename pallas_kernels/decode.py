"""Paged decode attention: one query token per sequence over its paged KV, ragged lengths.

Public API (each picks the backend from the platform unless ``backend=`` says otherwise):

* `paged_decode_attention` -- GQA / MQA / MHA (any ``num_q_heads % kv_heads == 0`` ratio).
* `paged_mla_decode_attention` -- DeepSeek MLA in its absorbed (latent) form.
* `paged_decode_attention_reference`, `paged_mla_decode_attention_reference` -- plain jnp.

Decode is the shared core (`pallas_kernels.attention_core`) with one query block per sequence at
position ``length - 1``. GPU (Pallas, Triton lowering) and CPU (the same kernel,
``interpret=True``): grid ``(kv_heads * group_blocks, B, num_splits)``; each program walks its
split of the sequence in blocks of ``block_t`` tokens, gathering each token's rows through the
page table, and writes an unnormalised partial (o, m, l); a small jnp combine merges the splits
(log-sum-exp). TPU (Mosaic): `pallas_kernels.attention_tpu`. The persistent GPU variant:
`pallas_kernels.persistent`.

``return_lse=True`` (every function, every backend and schedule) also returns the float32
log-sum-exp of each query head's scores, for merging partial attentions of one sequence whose KV
is split across devices (docs/kernels.md, "Log-sum-exp output").
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
from pallas_kernels.attention_core import DECODE_TOKENS_PER_SPLIT, run_blocks
from pallas_kernels.page_layout import KVKind, PageGeometry
from pallas_kernels.paged_reference import read_features

# ---- references -------------------------------------------------------------------------------


def _dense_attention(
    scores_parts: list[tuple[jax.Array, jax.Array]],
    values: jax.Array,
    valid: jax.Array,
    scale: float,
    soft_cap: float | None,
) -> tuple[jax.Array, jax.Array]:
    """scores = sum_i einsum(q_i, k_i) over [B, K, G, L]; values: [B, K, L, W]; valid: [B, L].

    Returns (out [B, K, G, W] f32, lse [B, K, G] f32: log-sum-exp of the masked scores, -inf
    for a row with no valid key).
    """
    hp = lax.Precision.HIGHEST
    s = sum(
        jnp.einsum("bkgd,bkld->bkgl", qi.astype(jnp.float32), ki.astype(jnp.float32), precision=hp)
        for qi, ki in scores_parts
    )
    s = softcap_scores(s * scale, soft_cap)
    mask = valid[:, None, None, :]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    v = jnp.where(valid[:, None, :, None], values.astype(jnp.float32), 0.0)
    o = jnp.einsum("bkgl,bklw->bkgw", p, v, precision=hp)
    out = jnp.where(denom > 0, o / jnp.where(denom > 0, denom, 1.0), 0.0)
    return out, lse_from(m[..., 0], denom[..., 0])


def _decode_valid(lengths: jax.Array, max_len: int, window: int | None) -> jax.Array:
    pos = jnp.arange(max_len, dtype=jnp.int32)[None, :]
    valid = pos < lengths[:, None]
    if window is not None:
        valid = valid & (pos >= lengths[:, None] - window)
    return valid


def paged_decode_attention_reference(
    q: jax.Array,
    arena: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    geom: PageGeometry,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Plain-jnp GQA decode attention over the pages (fp32 math). Same contract as the kernel."""
    b, hq, d = q.shape
    kvh = geom.spec.kv_heads
    scale = d**-0.5 if scale is None else scale
    max_len = page_table.shape[1] * geom.tokens_per_page
    f = read_features(arena, geom, page_table, max_len)
    qg = q.reshape(b, kvh, hq // kvh, d)
    o, lse = _dense_attention([(qg, f["k"])], f["v"], _decode_valid(lengths, max_len, window),
                              scale, soft_cap)
    out = o.reshape(b, hq, d).astype(q.dtype)
    return (out, lse.reshape(b, hq)) if return_lse else out


def paged_mla_decode_attention_reference(
    q_latent: jax.Array,
    q_rope: jax.Array,
    arena: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    geom: PageGeometry,
    *,
    scale: float,
    soft_cap: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Plain-jnp MLA (absorbed) decode attention. Same contract as the kernel."""
    max_len = page_table.shape[1] * geom.tokens_per_page
    f = read_features(arena, geom, page_table, max_len)
    lat = f["latent"][:, None]  # [B, 1, L, C]
    parts = [(q_latent[:, None], lat)]
    if geom.spec.rope_dim:
        parts.append((q_rope[:, None], f["rope"][:, None]))
    o, lse = _dense_attention(parts, lat, _decode_valid(lengths, max_len, window), scale,
                              soft_cap)
    out = o[:, 0].astype(q_latent.dtype)
    return (out, lse[:, 0]) if return_lse else out


# ---- kernels ------------------------------------------------------------------------------------


def _run_decode(
    qp: jax.Array,
    arena: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    geom: PageGeometry,
    *,
    group_block: int,
    return_lse: bool = False,
    **kw,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """qp: [B, KVH, Gp, q_width] packed queries -> [B, KVH, Gp, out_width] f32 (normalised).

    One query block per sequence at position ``length - 1``; ``group_block`` rows per program.
    return_lse: also return lse [B, KVH, Gp] f32 (-inf for an empty slot).
    """
    b, kvh, gp, wq = qp.shape
    if gp % group_block:
        raise ValueError(f"group_block={group_block} must divide the padded group {gp}")
    num_gb = gp // group_block
    qb = qp.reshape(b, kvh * num_gb, group_block, wq)
    lengths = lengths.astype(jnp.int32)
    out = run_blocks(
        qb, jnp.arange(b, dtype=jnp.int32), lengths - 1, (lengths > 0).astype(jnp.int32),
        lengths, page_table, arena, geom, rows_per_token=group_block, num_gb=num_gb,
        return_lse=return_lse, **kw,
    )
    if not return_lse:
        return out.reshape(b, kvh, gp, -1)
    out, lse = out
    return out.reshape(b, kvh, gp, -1), lse.reshape(b, kvh, gp)


def _check_common(arena: jax.Array, page_table: jax.Array, lengths: jax.Array,
                  geom: PageGeometry) -> None:
    if arena.ndim != 3 or arena.shape[1:] != (geom.rows_per_page, geom.row_elems):
        raise ValueError(f"arena {arena.shape} does not match geometry "
                         f"[*, {geom.rows_per_page}, {geom.row_elems}]")
    if page_table.ndim != 2 or lengths.shape != (page_table.shape[0],):
        raise ValueError(f"page_table {page_table.shape} / lengths {lengths.shape} mismatch")


def _min_rows(backend: str) -> int:
    # Triton dots need M >= 16 and power-of-two shapes; TPU wants whole sublane tiles.
    return 16 if backend in ("gpu", "interpret") else 8


@functools.partial(
    jax.jit,
    static_argnames=("geom", "scale", "soft_cap", "window", "backend", "schedule", "num_splits",
                     "block_t", "group_block", "num_warps", "num_stages", "num_programs",
                     "items_per_program", "return_lse"),
)
def _paged_decode_attention(q, arena, page_table, lengths, *, geom, scale, soft_cap, window,
                            backend, schedule, num_splits, block_t, group_block, num_warps,
                            num_stages, num_programs, items_per_program, return_lse=False):
    b, hq, d = q.shape
    kvh = geom.spec.kv_heads
    g = hq // kvh
    gp = max(_min_rows(backend), next_pow2(g))
    qg = q.reshape(b, kvh, g, d)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    qp = pack_query_chunks(qg, geom, (d,))
    out = _run_decode(qp, arena, page_table, lengths, geom, group_block=group_block or gp,
                      scale=scale, soft_cap=soft_cap, window=window, backend=backend,
                      schedule=schedule, num_splits=num_splits, block_t=block_t,
                      num_warps=num_warps, num_stages=num_stages,
                      num_programs=num_programs, items_per_program=items_per_program,
                      return_lse=return_lse, tokens_per_split=DECODE_TOKENS_PER_SPLIT)
    if not return_lse:
        return out[:, :, :g, :d].reshape(b, hq, d).astype(q.dtype)
    out, lse = out
    return (out[:, :, :g, :d].reshape(b, hq, d).astype(q.dtype),
            lse[:, :, :g].reshape(b, hq))


def paged_decode_attention(
    q: jax.Array,
    arena: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    geom: PageGeometry,
    *,
    scale: float | None = None,
    soft_cap: float | None = None,
    window: int | None = None,
    backend: str | None = None,
    schedule: str = "split",
    num_splits: int | None = None,
    block_t: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    num_programs: int | None = None,
    items_per_program: int = 2,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Decode attention (one new token per sequence) for a GQA/MQA/MHA model over paged KV.

    q: [B, num_q_heads, head_dim] (bf16 or f32); query head i reads kv head
      ``i // (num_q_heads // kv_heads)``.
    arena: [num_pages, rows_per_page, R] the device's KV arena (bf16 or f32), read in place.
    page_table: [B, max_pages] int32, page ids of each sequence's KV for THIS layer, in token
      order (entries past a sequence's last page are ignored; any value is safe).
    lengths: [B] int32 tokens in each sequence's cache, the new token's K/V included (append it
      first with `kv_append`). 0 = empty slot: its output is 0.
    geom: the model's `PageGeometry` in this pool (GQA kind).
    scale: softmax scale (default head_dim ** -0.5); soft_cap: logits -> cap * tanh(logits / cap)
      after scaling; window: attend only to the last ``window`` tokens (None: all).
    backend: None (from the platform), "gpu", "tpu", "interpret", "tpu_interpret", "reference".
    schedule: GPU/interpret only: "split" (a grid of sequences x heads x splits) or "persistent"
      (one program per SM walking a work list of (sequence, head, KV split) items; see
      `pallas_kernels.persistent`). TPU ignores it.
    num_splits / block_t / num_warps / num_stages: GPU tuning (split-KV factor, tokens per inner
      step, Triton warps and pipeline stages; block_t / num_stages default to 64 / 2, and to
      128 / 3 for a "persistent" GQA launch); num_programs / items_per_program: persistent
      launch size (default 2 x SM count) and work items aimed at per program.
    return_lse: also return the log-sum-exp of each head's scores (every backend and schedule).
    Returns [B, num_q_heads, head_dim] in q's dtype; with ``return_lse`` the pair ``(out, lse)``,
    lse [B, num_q_heads] float32 = ``log(sum_j exp(s_j))`` over the keys the query attends to
    (s: scaled, soft-capped scores), -inf for an empty slot. Partial results of one sequence
    over disjoint parts of its KV merge as ``o = sum_i exp(lse_i - M) o_i / sum_i exp(lse_i - M)``
    (M = max_i lse_i) into the attention over all of it, with ``lse = M + log(sum_i ...)``.
    """
    if geom.spec.kind != KVKind.GQA:
        raise ValueError("paged_decode_attention needs a GQA geometry; use paged_mla_decode_attention")
    _check_common(arena, page_table, lengths, geom)
    if q.shape[1] % geom.spec.kv_heads or q.shape[2] != geom.spec.head_dim:
        raise ValueError(f"q {q.shape} does not fit {geom.spec}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    be = resolve_backend(backend)
    if be == "reference":
        return paged_decode_attention_reference(q, arena, page_table, lengths, geom, scale=scale,
                                                soft_cap=soft_cap, window=window,
                                                return_lse=return_lse)
    return _paged_decode_attention(q, arena, page_table, lengths, geom=geom, scale=scale,
                                   soft_cap=soft_cap, window=window, backend=be,
                                   schedule=schedule, num_splits=num_splits, block_t=block_t,
                                   group_block=None,
                                   num_warps=num_warps, num_stages=num_stages,
                                   num_programs=num_programs,
                                   items_per_program=items_per_program, return_lse=return_lse)


@functools.partial(
    jax.jit,
    static_argnames=("geom", "scale", "soft_cap", "window", "backend", "schedule", "num_splits",
                     "block_t", "group_block", "num_warps", "num_stages", "num_programs",
                     "items_per_program", "return_lse"),
)
def _paged_mla_decode(q_latent, q_rope, arena, page_table, lengths, *, geom, scale, soft_cap,
                      window, backend, schedule, num_splits, block_t, group_block, num_warps,
                      num_stages, num_programs, items_per_program, return_lse=False):
    _, h, c = q_latent.shape
    hp = max(_min_rows(backend), next_pow2(h))
    q = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)
    q = jnp.pad(q, ((0, 0), (0, hp - h), (0, 0)))[:, None]  # [B, 1, Hp, C + Rd]
    qp = pack_query_chunks(q, geom, (c, geom.spec.rope_dim) if geom.spec.rope_dim else (c,))
    # 16 query heads per program measured fastest on H200 (docs/kernels.md "Measured").
    gb = group_block if group_block is not None else min(hp, 16)
    out = _run_decode(qp, arena, page_table, lengths, geom, group_block=gb, scale=scale,
                      soft_cap=soft_cap, window=window, backend=backend, schedule=schedule,
                      num_splits=num_splits, block_t=block_t, num_warps=num_warps,
                      num_stages=num_stages, num_programs=num_programs,
                      items_per_program=items_per_program, return_lse=return_lse)
    if not return_lse:
        return out[:, 0, :h, :c].astype(q_latent.dtype)
    out, lse = out
    return out[:, 0, :h, :c].astype(q_latent.dtype), lse[:, 0, :h]


def paged_mla_decode_attention(
    q_latent: jax.Array,
    q_rope: jax.Array,
    arena: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    geom: PageGeometry,
    *,
    scale: float,
    soft_cap: float | None = None,
    window: int | None = None,
    backend: str | None = None,
    schedule: str = "split",
    num_splits: int | None = None,
    block_t: int | None = None,
    group_block: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    num_programs: int | None = None,
    items_per_program: int = 2,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """DeepSeek MLA decode attention in absorbed form over paged latents.

    q_latent: [B, H, kv_lora_rank] queries already multiplied by W_UK (in the latent space);
    q_rope: [B, H, rope_dim] the rotary part of the queries.
    arena / page_table / lengths: as `paged_decode_attention`; geom: an MLA `PageGeometry`.
    scale: softmax scale (DeepSeek: (qk_nope_head_dim + qk_rope_head_dim) ** -0.5, times the
      yarn mscale factor if any) -- required, since it is not a function of these shapes.
    group_block: query heads per program on GPU (default 16); the head blocks of one sequence
      run side by side and share the latents through L2; larger blocks need more registers.
    Returns [B, H, kv_lora_rank]: the attention-weighted latent (the caller applies W_UV), in
    q_latent's dtype; with ``return_lse`` the pair ``(out, lse [B, H] float32)`` as
    `paged_decode_attention`.
    """
    if geom.spec.kind != KVKind.MLA:
        raise ValueError("paged_mla_decode_attention needs an MLA geometry")
    _check_common(arena, page_table, lengths, geom)
    if q_latent.shape[-1] != geom.spec.kv_lora_rank or q_rope.shape[-1] != geom.spec.rope_dim:
        raise ValueError(f"q_latent {q_latent.shape} / q_rope {q_rope.shape} do not fit {geom.spec}")
    be = resolve_backend(backend)
    if be == "reference":
        return paged_mla_decode_attention_reference(q_latent, q_rope, arena, page_table, lengths,
                                                    geom, scale=scale, soft_cap=soft_cap,
                                                    window=window, return_lse=return_lse)
    return _paged_mla_decode(q_latent, q_rope, arena, page_table, lengths, geom=geom,
                             scale=float(scale), soft_cap=soft_cap, window=window, backend=be,
                             schedule=schedule, num_splits=num_splits, block_t=block_t,
                             group_block=group_block,
                             num_warps=num_warps, num_stages=num_stages,
                             num_programs=num_programs,
                             items_per_program=items_per_program, return_lse=return_lse)


def decode_kv_bytes(lengths, geom: PageGeometry, window: int | None = None) -> int:
    """Bytes of KV a decode step must read: sum of attended tokens x bytes per token (used rows)."""
    total = 0
    for n in lengths:
        n = int(n)
        total += min(n, window) if window is not None else n
    return total * geom.bytes_per_token_used


__all__ = [
    "decode_kv_bytes",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_mla_decode_attention",
    "paged_mla_decode_attention_reference",
]
