"""KV append: write new tokens' K/V (or MLA latent + rope) into their pages, in place.

Public API:

* `kv_append(arena, slots, k, v, geom)` -- GQA/MQA/MHA.
* `mla_kv_append(arena, slots, latent, rope, geom)` -- MLA.
* `kv_append_reference`, `mla_kv_append_reference` -- plain jnp (an XLA scatter).

``slots[i]`` is the flat slot id of token i: ``page_id * tokens_per_page + offset_in_page`` (see
`pallas_kernels.paged_reference.slots_from_positions`); -1 skips the token (padding). One call
serves decode (one token per sequence) and prefill chunks (many tokens, any mix of sequences).
Slots must be distinct among the valid tokens of one call.

In place: the arena argument is donated (``donate_argnames="arena"``) and the kernel aliases it
to its output (``input_output_aliases``), so no copy of the arena is made; the caller must use the
returned array and drop the one it passed. Inside a larger jit the donation is the outer jit's
business: pass the arena in with ``donate_argnums`` there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import (
    flat_rows,
    gather_rows,
    gpu_compiler_params,
    interpret_flag,
    resolve_backend,
)
from pallas_kernels.page_layout import KVKind, PageGeometry
from pallas_kernels.paged_reference import token_rows


def pack_token_rows(parts: list[jax.Array], widths: list[int], r: int) -> jax.Array:
    """Cuts each token's feature vectors into row chunks in page order: [N, chunks, R].

    parts: arrays [N, w_i] in page order (GQA: K0, V0, K1, V1, ...; MLA: latent, rope); each is
    zero-padded to a multiple of R.
    """
    out = []
    for p, w in zip(parts, widths, strict=True):
        pad = (-w) % r
        if pad:
            p = jnp.pad(p, ((0, 0), (0, pad)))
        out.append(p.reshape(p.shape[0], -1, r))
    return jnp.concatenate(out, axis=1)


def _gqa_rows(k: jax.Array, v: jax.Array, geom: PageGeometry, dtype) -> jax.Array:
    _, kvh, d = k.shape
    parts, widths = [], []
    for h in range(kvh):
        parts += [k[:, h].astype(dtype), v[:, h].astype(dtype)]
        widths += [d, d]
    return pack_token_rows(parts, widths, geom.row_elems)


def _mla_rows(latent: jax.Array, rope: jax.Array, geom: PageGeometry, dtype) -> jax.Array:
    parts, widths = [latent.astype(dtype)], [geom.spec.kv_lora_rank]
    if geom.spec.rope_dim:
        parts.append(rope.astype(dtype))
        widths.append(geom.spec.rope_dim)
    return pack_token_rows(parts, widths, geom.row_elems)


def _append_rows_reference(arena: jax.Array, slots: jax.Array, rows: jax.Array,
                           geom: PageGeometry) -> jax.Array:
    n_pages, rpp, r = arena.shape
    flat = arena.reshape(n_pages * rpp, r)
    t = geom.tokens_per_page
    base = token_rows(geom, jnp.maximum(slots, 0))
    chunk_off = jnp.arange(rows.shape[1], dtype=jnp.int32) * t
    idx = base[:, None] + chunk_off[None, :]
    idx = jnp.where((slots >= 0)[:, None], idx, n_pages * rpp)  # out of range -> dropped
    flat = flat.at[idx].set(rows.astype(arena.dtype), mode="drop")
    return flat.reshape(n_pages, rpp, r)


def _append_kernel(slot_ref, rows_ref, arena_in_ref, arena_ref, *, geom: PageGeometry,
                   block_n: int, num_chunks: int):
    del arena_in_ref  # aliased with arena_ref (the output)
    i = pl.program_id(0)
    t = geom.tokens_per_page
    slots = slot_ref[pl.ds(i * block_n, block_n)]
    ok = slots >= 0
    s = jnp.maximum(slots, 0)
    # Skipped tokens point past the arena: their stores are masked off on GPU, and the Pallas
    # interpreter (which writes masked lanes back as read) then drops them instead of racing a
    # real write to the same row.
    base = jnp.where(ok, (s // t) * geom.rows_per_page + s % t, arena_ref.shape[0])
    mask = jnp.broadcast_to(ok[:, None], (block_n, geom.row_elems))
    for c in range(num_chunks):
        vals = rows_ref[pl.ds(i * block_n, block_n), c, :]
        pltriton.store(gather_rows(arena_ref, base + c * t, geom.row_elems), vals, mask=mask)


def _append_rows_gpu(arena: jax.Array, slots: jax.Array, rows: jax.Array, geom: PageGeometry,
                     backend: str, block_n: int) -> jax.Array:
    n = slots.shape[0]
    n_pad = -(-max(n, 1) // block_n) * block_n
    slots = jnp.pad(slots.astype(jnp.int32), (0, n_pad - n), constant_values=-1)
    rows = jnp.pad(rows.astype(arena.dtype), ((0, n_pad - n), (0, 0), (0, 0)))
    flat = flat_rows(arena)
    out = pl.pallas_call(
        functools.partial(_append_kernel, geom=geom, block_n=block_n, num_chunks=rows.shape[1]),
        grid=(n_pad // block_n,),
        out_shape=jax.ShapeDtypeStruct(flat.shape, flat.dtype),
        input_output_aliases={2: 0},
        interpret=interpret_flag(backend),
        compiler_params=None if backend != "gpu" else gpu_compiler_params(4, 1),
        name="kv_append",
    )(slots, rows, flat)
    return out.reshape(arena.shape)


def _append_rows(arena, slots, rows, geom, backend, block_n):
    if backend == "reference":
        return _append_rows_reference(arena, slots, rows, geom)
    if backend in ("tpu", "tpu_interpret"):
        from pallas_kernels.append_tpu import append_rows_tpu

        return append_rows_tpu(arena, slots, rows, geom, backend)
    return _append_rows_gpu(arena, slots, rows, geom, backend, block_n)


@functools.partial(jax.jit, static_argnames=("geom", "backend", "block_n"),
                   donate_argnames=("arena",))
def _kv_append(arena, slots, k, v, *, geom, backend, block_n):
    return _append_rows(arena, slots, _gqa_rows(k, v, geom, arena.dtype), geom, backend, block_n)


@functools.partial(jax.jit, static_argnames=("geom", "backend", "block_n"),
                   donate_argnames=("arena",))
def _mla_kv_append(arena, slots, latent, rope, *, geom, backend, block_n):
    return _append_rows(arena, slots, _mla_rows(latent, rope, geom, arena.dtype), geom, backend,
                        block_n)


def kv_append(
    arena: jax.Array,
    slots: jax.Array,
    k: jax.Array,
    v: jax.Array,
    geom: PageGeometry,
    *,
    backend: str | None = None,
    block_n: int = 16,
) -> jax.Array:
    """Writes K/V of N tokens of a GQA model into the arena, in place (arena donated).

    arena: [num_pages, rows_per_page, R]; slots: [N] int32 flat slot ids (-1: skip);
    k, v: [N, kv_heads, head_dim] (cast to the arena's dtype). Returns the updated arena; every
    row not belonging to a valid slot's token is left untouched.
    """
    if geom.spec.kind != KVKind.GQA:
        raise ValueError("kv_append needs a GQA geometry; use mla_kv_append")
    want = (slots.shape[0], geom.spec.kv_heads, geom.spec.head_dim)
    if k.shape != want or v.shape != want:
        raise ValueError(f"k {k.shape} / v {v.shape}: expected {want}")
    return _kv_append(arena, slots, k, v, geom=geom, backend=resolve_backend(backend),
                      block_n=block_n)


def mla_kv_append(
    arena: jax.Array,
    slots: jax.Array,
    latent: jax.Array,
    rope: jax.Array,
    geom: PageGeometry,
    *,
    backend: str | None = None,
    block_n: int = 16,
) -> jax.Array:
    """Writes the MLA latent [N, kv_lora_rank] and rope key [N, rope_dim] of N tokens, in place.

    Same contract as `kv_append` (arena donated, slots -1 skipped).
    """
    if geom.spec.kind != KVKind.MLA:
        raise ValueError("mla_kv_append needs an MLA geometry")
    n = slots.shape[0]
    if latent.shape != (n, geom.spec.kv_lora_rank) or rope.shape != (n, geom.spec.rope_dim):
        raise ValueError(f"latent {latent.shape} / rope {rope.shape} do not fit {geom.spec}")
    return _mla_kv_append(arena, slots, latent, rope, geom=geom, backend=resolve_backend(backend),
                          block_n=block_n)


def kv_append_reference(arena: jax.Array, slots: jax.Array, k: jax.Array, v: jax.Array,
                        geom: PageGeometry) -> jax.Array:
    """Plain-jnp `kv_append` (functional scatter; not donated)."""
    return _append_rows_reference(arena, slots, _gqa_rows(k, v, geom, arena.dtype), geom)


def mla_kv_append_reference(arena: jax.Array, slots: jax.Array, latent: jax.Array,
                            rope: jax.Array, geom: PageGeometry) -> jax.Array:
    """Plain-jnp `mla_kv_append` (functional scatter; not donated)."""
    return _append_rows_reference(arena, slots, _mla_rows(latent, rope, geom, arena.dtype), geom)
