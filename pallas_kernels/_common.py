"""Shared pieces of the paged attention kernels: backend choice, the GPU-style block loop, combine.

The GPU kernels (Pallas, Triton lowering) are written against *refs of whole arrays* with explicit
gathers (``ref.at[int_vector]``), masked loads and dynamic-bound loops. The same kernel bodies run
on CPU under ``interpret=True`` (the generic Pallas interpreter), which is how CI tests them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.page_layout import PageGeometry

BACKENDS = ("gpu", "tpu", "interpret", "tpu_interpret", "reference")
"""gpu: Pallas Triton lowering. tpu: Mosaic TPU. interpret: the GPU kernel under the generic Pallas
interpreter (CPU). tpu_interpret: the TPU kernel under ``pltpu.InterpretParams()`` (CPU).
reference: the plain-jnp reference (any platform)."""


def resolve_backend(backend: str | None) -> str:
    """The backend to use: ``backend`` if given, else from ``jax.default_backend()``.

    gpu/cuda/rocm -> "gpu", tpu -> "tpu", anything else (cpu) -> "interpret".
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        return backend
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "interpret"


def gather_rows(ref, rows: jax.Array, width: int):
    """``ref.at[rows, :width]`` as a pure integer-array (gather) indexer: a [len(rows), width] view.

    Both the Triton lowering and the Pallas interpreter accept two broadcast integer indexers
    (the interpreter rejects mixing an integer array with a slice).
    """
    cols = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    return ref.at[rows[:, None], cols]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def dot_precision(dtype: jnp.dtype) -> lax.Precision | None:
    """fp32 operands get IEEE fp32 dots (HIGHEST); on GPU the default would be tf32."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def split_softmax_combine(
    o: jax.Array, m: jax.Array, den: jax.Array, axis: int, return_lse: bool = False
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Combines split-KV partial results along ``axis``.

    o: [..., S, ..., W] unnormalised partial outputs (f32), m/l: the matching running max and sum
    (m = -inf and l = 0 for an empty split). Returns ``sum_s w_s o_s / sum_s w_s l_s`` with
    ``w_s = exp(m_s - max_s m_s)``; rows with no key at all (all splits empty) come out as 0.
    return_lse: also return the combined log-sum-exp ``max_s m_s + log(sum_s w_s l_s)`` (m's
    shape without ``axis``; -inf for rows with no key), as ``(out, lse)``.
    """
    m_max = jnp.max(m, axis=axis, keepdims=True)
    m_safe = jnp.where(jnp.isneginf(m_max), 0.0, m_max)
    w = jnp.where(jnp.isneginf(m), 0.0, jnp.exp(m - m_safe))
    l_tot = jnp.sum(w * den, axis=axis)
    o_tot = jnp.sum(w[..., None] * o, axis=axis)
    safe_l = jnp.where(l_tot > 0, l_tot, 1.0)
    out = jnp.where((l_tot > 0)[..., None], o_tot / safe_l[..., None], 0.0)
    if not return_lse:
        return out
    return out, lse_from(jnp.squeeze(m_safe, axis), l_tot)


def lse_from(m: jax.Array, den: jax.Array) -> jax.Array:
    """``m + log(den)`` for an online-softmax state (max m, sum den); -inf where den is 0."""
    return jnp.where(den > 0, m + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)


def softcap_scores(s: jax.Array, soft_cap: float | None) -> jax.Array:
    if soft_cap is None:
        return s
    return soft_cap * jnp.tanh(s / soft_cap)


def attend_range_gpu(
    q_chunks: Sequence[jax.Array],
    arena_ref,
    table_ref,
    *,
    table_base,
    head_base,
    lo,
    hi,
    geom: PageGeometry,
    block_t: int,
    scale: float,
    soft_cap: float | None,
    q_pos: jax.Array | None = None,
    window: int | None = None,
    num_pages: int,
):
    """Online-softmax attention of M query rows over the paged tokens ``[lo, hi)`` of one sequence.

    q_chunks: score-chunk tiles of the query, each [M, R] in the KV dtype.
    arena_ref: [num_pages * rows_per_page, R] rows (KV dtype). table_ref: flat page table (int32);
    the sequence's page i is ``table_ref[table_base + i]``. head_base: row offset of the kv head.
    q_pos: [M] absolute position of each query row, for causal (and window) masking; None means
    every row sees all of ``[lo, hi)`` (decode: the window is applied by the caller through lo).
    Returns (m [M], l [M], accs: list of [M, R] f32 per value chunk), unnormalised.
    Tokens outside the mask are loaded as 0 (masked loads), so garbage or NaN in unwritten slots
    can never reach the result.
    """
    t_pp = geom.tokens_per_page
    rpp = geom.rows_per_page
    r = geom.row_elems
    m_rows = q_chunks[0].shape[0]
    kv_dtype = arena_ref.dtype
    prec = dot_precision(kv_dtype)
    score_rows = geom.score_chunk_rows
    value_rows = geom.value_chunk_rows
    n_blocks = jnp.maximum(hi - lo + block_t - 1, 0) // block_t

    def body(i, carry):
        m_i, l_i, accs = carry
        tok = lo + i * block_t + lax.broadcasted_iota(jnp.int32, (block_t,), 0)
        valid = tok < hi
        page = pltriton.load(table_ref.at[table_base + tok // t_pp], mask=valid, other=0)
        page = jnp.clip(page, 0, num_pages - 1)
        row0 = page * rpp + head_base + tok % t_pp
        vmask = jnp.broadcast_to(valid[:, None], (block_t, r))
        tiles = {}

        def tile(off):
            if off not in tiles:
                tiles[off] = pltriton.load(gather_rows(arena_ref, row0 + off, r), mask=vmask,
                                           other=0)
            return tiles[off]

        s = None
        for qc, off in zip(q_chunks, score_rows, strict=True):
            part = lax.dot_general(
                qc, tile(off), (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32, precision=prec,
            )
            s = part if s is None else s + part
        s = softcap_scores(s * scale, soft_cap)
        mask = jnp.broadcast_to(valid[None, :], (m_rows, block_t))
        if q_pos is not None:
            mask = mask & (tok[None, :] <= q_pos[:, None])
            if window is not None:
                mask = mask & (tok[None, :] > q_pos[:, None] - window)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_i - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l_new = l_i * alpha + jnp.sum(p, axis=1)
        pv = p.astype(kv_dtype)
        new_accs = tuple(
            acc * alpha[:, None]
            + lax.dot_general(
                pv, tile(off), (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32, precision=prec,
            )
            for acc, off in zip(accs, value_rows, strict=True)
        )
        return m_new, l_new, new_accs

    init = (
        jnp.full((m_rows,), -jnp.inf, jnp.float32),
        jnp.zeros((m_rows,), jnp.float32),
        tuple(jnp.zeros((m_rows, r), jnp.float32) for _ in value_rows),
    )
    return lax.fori_loop(0, n_blocks, body, init)


def pack_query_chunks(q: jax.Array, geom: PageGeometry, widths: Sequence[int]) -> jax.Array:
    """Pads each part of the query to whole row chunks and concatenates: [..., q_width].

    q: [..., sum(widths)] with parts of ``widths`` (GQA: [head_dim]; MLA: [kv_lora_rank, rope]).
    """
    r = geom.row_elems
    parts, start = [], 0
    for w in widths:
        part = q[..., start:start + w]
        pad = (-w) % r
        if pad:
            part = jnp.pad(part, [(0, 0)] * (q.ndim - 1) + [(0, pad)])
        parts.append(part)
        start += w
    out = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    assert out.shape[-1] == geom.q_width, (out.shape, geom.q_width)
    return out


def flat_rows(arena: jax.Array) -> jax.Array:
    """[num_pages, rows_per_page, R] -> [num_pages * rows_per_page, R] (a row-major bitcast)."""
    n, rows, r = arena.shape
    return arena.reshape(n * rows, r)


def interpret_flag(backend: str):
    """The ``interpret=`` argument of pallas_call for a backend."""
    if backend == "interpret":
        return True
    if backend == "tpu_interpret":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return False


def gpu_compiler_params(num_warps: int, num_stages: int):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


__all__ = [
    "BACKENDS",
    "attend_range_gpu",
    "dot_precision",
    "flat_rows",
    "gather_rows",
    "gpu_compiler_params",
    "interpret_flag",
    "lse_from",
    "next_pow2",
    "pack_query_chunks",
    "pl",
    "resolve_backend",
    "softcap_scores",
    "split_softmax_combine",
]
