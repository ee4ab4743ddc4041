"""KV append: write new tokens' K/V (or MLA latent + rope) into their pages, in place.

Public API:

* `kv_append(arena, slots, k, v, geom)` -- GQA/MQA/MHA.
* `mla_kv_append(arena, slots, latent, rope, geom)` -- MLA.
* `kv_append_reference`, `mla_kv_append_reference` -- plain jnp (an XLA scatter).

``slots[i]`` is the flat slot id of token i: ``page_id * tokens_per_page + offset_in_page`` (see
`pallas_kernels.paged_reference.slots_from_positions`); -1 skips the token (padding). One call
serves decode (one token per sequence) and prefill chunks (many tokens, any mix of sequences).
Slots must be distinct among the valid tokens of one call.

What the kernels read: the TPU kernels and the reference take each token's chunks packed as one
[N, chunks, R] array in page order (`pack_token_rows`, an XLA concatenate). The GPU GQA kernel,
when head_dim is a multiple of R, reads k and v [N, kv_heads, head_dim] themselves and cuts the
chunks in the kernel, so no packed copy of K/V is made; otherwise (padding needed, or MLA) it too
takes the packed rows.

In place: the arena argument is donated (``donate_argnames="arena"``) and the kernel aliases it
to its output (``input_output_aliases``), so no copy of the arena is made; the caller must use the
returned array and drop the one it passed. Inside a larger jit the donation is the outer jit's
business: pass the arena in with ``donate_argnums`` there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
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


def _block_targets(slot_ref, arena_ref, geom: PageGeometry, block_n: int):
    """Program ``pl.program_id(0)``'s block_n tokens: flat arena row of each one's chunk 0
    ([block_n] int32) and the store mask ([block_n, R] bool, False for slot -1)."""
    i = pl.program_id(0)
    t = geom.tokens_per_page
    slots = slot_ref[pl.ds(i * block_n, block_n)]
    ok = slots >= 0
    s = jnp.maximum(slots, 0)
    # Skipped tokens point past the arena: their stores are masked off on GPU, and the Pallas
    # interpreter (which writes masked lanes back as read) then drops them instead of racing a
    # real write to the same row.
    base = jnp.where(ok, (s // t) * geom.rows_per_page + s % t, arena_ref.shape[0])
    return base, jnp.broadcast_to(ok[:, None], (block_n, geom.row_elems))


def _append_kernel(slot_ref, rows_ref, arena_in_ref, arena_ref, *, geom: PageGeometry,
                   block_n: int, num_chunks: int):
    """Packed rows: rows_ref [N_pad, num_chunks, R]; chunk c of a token goes to its chunk row c."""
    del arena_in_ref  # aliased with arena_ref (the output)
    i = pl.program_id(0)
    base, mask = _block_targets(slot_ref, arena_ref, geom, block_n)
    for c in range(num_chunks):
        vals = rows_ref[pl.ds(i * block_n, block_n), c, :]
        dst = gather_rows(arena_ref, base + c * geom.tokens_per_page, geom.row_elems)
        pltriton.store(dst, vals, mask=mask)


def _append_kv_kernel(slot_ref, k_ref, v_ref, arena_in_ref, arena_ref, *, geom: PageGeometry,
                      block_n: int):
    """K and V read in place: k_ref, v_ref [N, KVH * D] (arena dtype, D % R == 0).

    Chunk ``(2 * h + part) * (D // R) + sub`` of token n is elements ``[sub * R, (sub + 1) * R)``
    of head h of K (part 0) or V (part 1): the page order `_gqa_rows` packs.
    """
    del arena_in_ref  # aliased with arena_ref (the output)
    i = pl.program_id(0)
    base, mask = _block_targets(slot_ref, arena_ref, geom, block_n)
    t, r, d = geom.tokens_per_page, geom.row_elems, geom.spec.head_dim
    subs = geom.head_chunks
    # The last block's tokens past N (slot -1, stores masked) re-read token N - 1, so k and v
    # need no padded copy.
    tok = jnp.minimum(i * block_n + lax.broadcasted_iota(jnp.int32, (block_n, 1), 0),
                      k_ref.shape[0] - 1)
    cols = lax.broadcasted_iota(jnp.int32, (1, r), 1)
    for h in range(geom.spec.kv_heads):
        for part, src in enumerate((k_ref, v_ref)):
            for sub in range(subs):
                vals = pltriton.load(src.at[tok, h * d + sub * r + cols])
                dst = gather_rows(arena_ref, base + ((2 * h + part) * subs + sub) * t, r)
                pltriton.store(dst, vals, mask=mask)


def _num_programs(n: int, block_n: int) -> int:
    return -(-max(n, 1) // block_n)


def _append_call(kernel, arena: jax.Array, slots: jax.Array, inputs: list[jax.Array],
                 backend: str, block_n: int) -> jax.Array:
    """Runs ``kernel(slot_ref, *input_refs, arena_in_ref, arena_ref)`` over blocks of block_n
    tokens, the flat arena [num_pages * rows_per_page, R] aliased to the output; slots padded
    with -1 to a whole number of blocks."""
    grid = _num_programs(slots.shape[0], block_n)
    slots = jnp.pad(slots.astype(jnp.int32), (0, grid * block_n - slots.shape[0]),
                    constant_values=-1)
    flat = flat_rows(arena)
    out = pl.pallas_call(
        kernel,
        grid=(grid,),
        out_shape=jax.ShapeDtypeStruct(flat.shape, flat.dtype),
        input_output_aliases={1 + len(inputs): 0},
        interpret=interpret_flag(backend),
        compiler_params=None if backend != "gpu" else gpu_compiler_params(4, 1),
        name="kv_append",
    )(slots, *inputs, flat)
    return out.reshape(arena.shape)


def _append_rows_gpu(arena: jax.Array, slots: jax.Array, rows: jax.Array, geom: PageGeometry,
                     backend: str, block_n: int) -> jax.Array:
    """Packed rows [N, chunks, R] -> arena (zero-padded to whole blocks of tokens)."""
    n = slots.shape[0]
    n_pad = _num_programs(n, block_n) * block_n
    rows = jnp.pad(rows.astype(arena.dtype), ((0, n_pad - n), (0, 0), (0, 0)))
    kernel = functools.partial(_append_kernel, geom=geom, block_n=block_n,
                               num_chunks=rows.shape[1])
    return _append_call(kernel, arena, slots, [rows], backend, block_n)


def _append_kv_gpu(arena: jax.Array, slots: jax.Array, k: jax.Array, v: jax.Array,
                   geom: PageGeometry, backend: str, block_n: int) -> jax.Array:
    """k, v [N, KVH, D] (N >= 1, D % R == 0) -> arena, read by the kernel with no packed copy."""
    n, kvh, d = k.shape
    # The reshape is a bitcast; astype is a no-op when the dtypes agree (the usual bf16 case) and
    # otherwise an XLA pass over k and v.
    k = k.astype(arena.dtype).reshape(n, kvh * d)
    v = v.astype(arena.dtype).reshape(n, kvh * d)
    kernel = functools.partial(_append_kv_kernel, geom=geom, block_n=block_n)
    return _append_call(kernel, arena, slots, [k, v], backend, block_n)


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
    # N == 0: the direct kernel would have no token N - 1 to clamp its reads to.
    direct = (backend in ("gpu", "interpret") and geom.spec.head_dim % geom.row_elems == 0
              and slots.shape[0] > 0)
    if direct:
        return _append_kv_gpu(arena, slots, k, v, geom, backend, block_n)
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
