"""Plain-jnp readers and writers of the paged arena (the ground truth the kernels are tested on).

Nothing here is fast: these build dense copies of the KV of each sequence. They exist for the
``*_reference`` functions, for tests and for debugging a pool's contents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.page_layout import KVKind, PageGeometry


def _rows_for_positions(
    geom: PageGeometry, page_table: jax.Array, positions: jax.Array
) -> jax.Array:
    """Flat arena row of chunk 0 (kv head 0) for each (sequence, position): [B, L] int32.

    page_table: [B, max_pages] int32; positions: [L] int32. Positions past the table read page
    index 0 of the row (callers mask them).
    """
    t = geom.tokens_per_page
    page_idx = jnp.clip(positions // t, 0, page_table.shape[1] - 1)
    pages = page_table[:, page_idx]  # [B, L]
    return pages * geom.rows_per_page + (positions % t)[None, :]


def read_features(
    arena: jax.Array, geom: PageGeometry, page_table: jax.Array, max_len: int
) -> dict[str, jax.Array]:
    """Dense per-sequence features of positions ``[0, max_len)`` (garbage past each length).

    arena: [num_pages, rows_per_page, R]. Returns, for GQA, ``k`` and ``v``: [B, kv_heads, L, D];
    for MLA, ``latent``: [B, L, kv_lora_rank] and ``rope``: [B, L, rope_dim]. Dtype: the arena's.
    Page ids are clipped into the arena, so a garbage table entry reads some page, never faults.
    """
    n, rpp, r = arena.shape
    flat = arena.reshape(n * rpp, r)
    page_table = jnp.clip(page_table, 0, n - 1)
    pos = jnp.arange(max_len, dtype=jnp.int32)
    base = _rows_for_positions(geom, page_table, pos)  # [B, L]
    t = geom.tokens_per_page

    def gather(offsets: tuple[int, ...], width: int) -> jax.Array:
        parts = [flat[base + off] for off in offsets]  # each [B, L, R]
        return jnp.concatenate(parts, axis=-1)[..., :width]

    if geom.spec.kind == KVKind.GQA:
        ks, vs = [], []
        for h in range(geom.spec.kv_heads):
            hb = h * geom.head_stride_rows
            ks.append(gather(tuple(hb + o for o in geom.score_chunk_rows), geom.spec.head_dim))
            vs.append(gather(tuple(hb + o for o in geom.value_chunk_rows), geom.spec.head_dim))
        return {"k": jnp.stack(ks, axis=1), "v": jnp.stack(vs, axis=1)}
    lat_rows = tuple(c * t for c in range(geom.head_chunks))
    rope_rows = tuple((geom.head_chunks + c) * t for c in range(geom.rope_chunks))
    out = {"latent": gather(lat_rows, geom.spec.kv_lora_rank)}
    out["rope"] = (
        gather(rope_rows, geom.spec.rope_dim)
        if rope_rows
        else jnp.zeros((*base.shape, 0), arena.dtype)
    )
    return out


def token_rows(geom: PageGeometry, slots: jax.Array) -> jax.Array:
    """Flat arena row of chunk 0 / kv head 0 for each flat slot id (``page * T + offset``): [N]."""
    t = geom.tokens_per_page
    return (slots // t) * geom.rows_per_page + slots % t


def slots_from_positions(
    page_table: jax.Array, seq_ids: jax.Array, positions: jax.Array, tokens_per_page: int
) -> jax.Array:
    """Flat slot ids (``page_id * tokens_per_page + offset``) of tokens given by sequence/position.

    page_table: [B, max_pages] int32; seq_ids, positions: [N] int32. A negative seq_id or position
    gives slot -1 (the append kernels skip it).
    """
    ok = (seq_ids >= 0) & (positions >= 0)
    sid = jnp.where(ok, seq_ids, 0)
    pos = jnp.where(ok, positions, 0)
    page = page_table[sid, jnp.clip(pos // tokens_per_page, 0, page_table.shape[1] - 1)]
    return jnp.where(ok, page * tokens_per_page + pos % tokens_per_page, -1).astype(jnp.int32)
