"""Shared builders for the kernel tests: paged KV cases with ragged lengths and shuffled pages.

Every case starts from a NaN-poisoned arena and writes only the tokens that exist, so a kernel
that reads a slot it does not own (or a page of another sequence) produces NaN and fails.
Dense copies of everything written are kept, so tests can also check the references against
an independent numpy computation that never touches the paged layout.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from pallas_kernels.append import kv_append_reference, mla_kv_append_reference
from pallas_kernels.page_layout import KVSpec, PageGeometry, PoolLayout, page_geometry
from pallas_kernels.paged_reference import slots_from_positions


@dataclasses.dataclass
class Case:
    pool: PoolLayout
    geom: PageGeometry
    arena: jnp.ndarray  # [num_pages, rows_per_page, R], NaN where nothing was written
    table: jnp.ndarray  # [B, max_pages] int32, shuffled page ids, -1 past each sequence's pages
    lens: jnp.ndarray  # [B] int32
    dense: list[dict[str, np.ndarray]]  # per sequence: the values written, [len, ...] each


def page_bytes_for(spec: KVSpec, row_elems: int, dtype: str, tokens: int) -> int:
    """Page size that holds exactly ``tokens`` tokens of ``spec`` (rows padded to row_elems)."""
    chunks = sum(-(-w // row_elems) for w in spec.feature_widths)
    return tokens * chunks * row_elems * jnp.dtype(dtype).itemsize


def edge_lengths(t_pp: int) -> list[int]:
    """Empty slot, 1, page-1, page, page+1 and a long one (several pages, ragged tail)."""
    return [0, 1, t_pp - 1, t_pp, t_pp + 1, 4 * t_pp + 3]


def make_case(
    rng: np.random.Generator,
    spec: KVSpec,
    lens: list[int],
    *,
    dtype: str = "float32",
    row_elems: int = 32,
    page_bytes: int = 4096,
    platform: str = "gpu",
    spare_pages: int = 3,
    extra_table_cols: int = 1,
    reserve: int = 0,
) -> Case:
    """A pool, its arena holding ``lens[b]`` random tokens of each sequence b, and the dense truth.

    Pages are handed out from a random permutation (so tables are not in order and sequences
    interleave); the table has ``extra_table_cols`` columns of -1 beyond the longest sequence.
    reserve: pages are allocated for ``lens[b] + reserve`` tokens (room for an append).
    """
    pool = PoolLayout(page_bytes=page_bytes, dtype=dtype, row_elems=row_elems)
    geom = page_geometry(spec, pool, platform=platform)
    t_pp = geom.tokens_per_page
    need = [-(-(n + reserve) // t_pp) for n in lens]
    num_pages = sum(need) + spare_pages
    max_pages = max(need) + extra_table_cols
    perm = rng.permutation(num_pages).astype(np.int32)
    table = np.full((len(lens), max_pages), -1, np.int32)
    at = 0
    for b, k in enumerate(need):
        table[b, :k] = perm[at:at + k]
        at += k
    jdt = jnp.dtype(dtype)
    arena = jnp.full(pool.arena_shape(num_pages), jnp.nan, jdt)
    seq = np.concatenate([np.full(n, b) for b, n in enumerate(lens)] + [np.zeros(0)]).astype(
        np.int32)
    pos = np.concatenate([np.arange(n) for n in lens] + [np.zeros(0)]).astype(np.int32)
    slots = slots_from_positions(jnp.asarray(np.maximum(table, 0)), jnp.asarray(seq),
                                 jnp.asarray(pos), t_pp)
    n = len(seq)

    def rand(*shape):
        # Round through the KV dtype so the dense truth equals what the pages hold.
        return np.asarray(jnp.asarray(rng.standard_normal(shape), jdt).astype(jnp.float32))

    if spec.kind == "gqa":
        k = rand(n, spec.kv_heads, spec.head_dim)
        v = rand(n, spec.kv_heads, spec.head_dim)
        arena = kv_append_reference(arena, slots, jnp.asarray(k, jdt), jnp.asarray(v, jdt), geom)
        parts = {"k": k, "v": v}
    else:
        lat = rand(n, spec.kv_lora_rank)
        rope = rand(n, spec.rope_dim)
        arena = mla_kv_append_reference(arena, slots, jnp.asarray(lat, jdt),
                                        jnp.asarray(rope, jdt), geom)
        parts = {"latent": lat, "rope": rope}
    dense = [{name: x[seq == b] for name, x in parts.items()} for b in range(len(lens))]
    return Case(pool, geom, arena, jnp.asarray(table), jnp.asarray(lens, jnp.int32), dense)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives inf."""
    o = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(ref).astype(jnp.float32), np.float64)
    if not np.all(np.isfinite(o)):
        return float("inf")
    return float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))


def tol(dtype: str) -> float:
    """Relative-error bound: fp32 math must be far under 1e-3; bf16 operands under 1e-2."""
    return 1e-5 if dtype == "float32" else 1e-2


def np_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_pos: np.ndarray, *,
                 scale: float, soft_cap: float | None = None,
                 window: int | None = None) -> np.ndarray:
    """Dense float64 attention of one sequence: q [T, H, d], k [L, H, d], v [L, H, dv].

    Query t sees keys j <= q_pos[t] (and j > q_pos[t] - window); no key: output 0.
    """
    s = np.einsum("thd,lhd->thl", q.astype(np.float64), k.astype(np.float64)) * scale
    if soft_cap is not None:
        s = soft_cap * np.tanh(s / soft_cap)
    j = np.arange(k.shape[0])[None, None, :]
    mask = j <= q_pos[:, None, None]
    if window is not None:
        mask = mask & (j > q_pos[:, None, None] - window)
    s = np.where(mask, s, -np.inf)
    out = np.zeros((q.shape[0], q.shape[1], v.shape[-1]))
    for t in range(q.shape[0]):
        for h in range(q.shape[1]):
            row = s[t, h]
            if not np.isfinite(row).any():
                continue
            p = np.exp(row - row[np.isfinite(row)].max())
            p = np.where(np.isfinite(row), p, 0.0)
            out[t, h] = p @ v[:, h].astype(np.float64) / p.sum()
    return out
