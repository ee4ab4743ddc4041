"""Grouped matmul whose weights live in a device's arena: ``y = x @ W_g`` for row groups ``g``.

The one-program step (crosspool_jax/execution/pooled_step.py) keeps every weight a device holds inside the
same per-device arena as the KV pages (docs/design.md, "The unified arena"), so weights are read in
place through a table of row offsets, exactly like KV pages through a page table. This is the
matmul that reads them. It also serves a plain projection (one group) and the routed experts of a
MoE layer (one group per local expert, rows sorted by expert).

Contract (every backend):

* ``x``: [M, K] activations; rows ``[start_g, start_g + sizes[g])`` (``start_g`` = the sum of the
  earlier sizes) use weight ``g``; rows past ``sum(sizes)`` produce 0.
* ``arena_rows``: [num_rows, R] the arena's flat row view (`pallas_kernels._common.flat_rows`),
  in the weights' dtype.
* weight ``g`` is a row-major ``[K, N]`` matrix starting at arena row ``offsets[g]``: element
  ``(k, n)`` is flat element ``k * N + n`` counted from that row, so it spans ``K * N / R`` rows.
  ``N % R == 0`` is required (the arena writer pads N).
* ``sizes``/``offsets``: [G] int32. A group of size 0 reads nothing (kernels skip it): that is how
  a device that holds no part of a phase (a KV device in the FFN phase) does no work in it.
* Returns [M, N] float32 (``preferred_element_type``), accumulation in f32.
* Optional fusions around the product (`arena_grouped_matmul`'s arguments): rows of x read through
  an index table, a SwiGLU epilogue, per-row scales and a scattered store. The MoE layer uses all
  four, so neither its permuted copy of the tokens nor its [rows, 2 * inter] and [rows, D] f32
  intermediates are written to memory and read back.

Backends: "reference" (plain jnp: each group's weight sliced out, then ``lax.ragged_dot``);
"gpu"/"interpret": a Pallas kernel (see `arena_grouped_matmul`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import resolve_backend


def _group_weights(arena_rows: jax.Array, offsets: jax.Array, k: int, n: int) -> jax.Array:
    """[G, K, N]: each group's weight sliced out of the arena (a copy; reference path only)."""
    r = arena_rows.shape[1]
    rows = k * n // r

    def one(off: jax.Array) -> jax.Array:
        return lax.dynamic_slice_in_dim(arena_rows, off, rows, axis=0).reshape(k, n)

    return jax.vmap(one)(offsets.astype(jnp.int32))


def apply_fusions(y: jax.Array, *, swiglu: int = 0, row_scale: jax.Array | None = None,
                  out_rows: jax.Array | None = None, out_dtype: str = "float32") -> jax.Array:
    """The epilogue of a fused call in plain jnp, on the f32 product y [M, N] (see `Fusion`)."""
    if swiglu:
        y = jax.nn.silu(y[:, :swiglu]) * y[:, swiglu:2 * swiglu]
    if row_scale is not None:
        y = y * row_scale.astype(jnp.float32)[:, None]
    y = y.astype(out_dtype)
    if out_rows is not None:
        y = jnp.zeros_like(y).at[out_rows].set(y)
    return y


def arena_grouped_matmul_reference(
    x: jax.Array, arena_rows: jax.Array, offsets: jax.Array, sizes: jax.Array, n: int, *,
    x_rows: jax.Array | None = None, swiglu: int = 0, row_scale: jax.Array | None = None,
    out_rows: jax.Array | None = None, out_dtype: str = "float32",
) -> jax.Array:
    """Plain-jnp `arena_grouped_matmul` (slices the weights, then one `lax.ragged_dot`; the
    fusions as separate jnp ops)."""
    k = x.shape[1]
    w = _group_weights(arena_rows, offsets, k, n)
    prec = lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
    xs = x if x_rows is None else jnp.take(x, x_rows, axis=0)
    y = lax.ragged_dot(xs.astype(w.dtype), w, sizes.astype(jnp.int32),
                       preferred_element_type=jnp.float32, precision=prec)
    return apply_fusions(y, swiglu=swiglu, row_scale=row_scale, out_rows=out_rows,
                         out_dtype=out_dtype)


def check_args(x: jax.Array, arena_rows: jax.Array, offsets: jax.Array, sizes: jax.Array,
               n: int) -> None:
    if x.ndim != 2 or arena_rows.ndim != 2:
        raise ValueError(f"x {x.shape} must be [M, K] and arena_rows {arena_rows.shape} [rows, R]")
    r = arena_rows.shape[1]
    if n % r:
        raise ValueError(f"N={n} must be a multiple of the arena row width R={r}")
    if offsets.shape != sizes.shape or offsets.ndim != 1:
        raise ValueError(f"offsets {offsets.shape} and sizes {sizes.shape} must be the same [G]")


def arena_grouped_matmul(
    x: jax.Array,
    arena_rows: jax.Array,
    offsets: jax.Array,
    sizes: jax.Array,
    n: int,
    *,
    backend: str | None = None,
    x_rows: jax.Array | None = None,
    swiglu: int = 0,
    row_scale: jax.Array | None = None,
    out_rows: jax.Array | None = None,
    out_dtype: str = "float32",
    group_rows: int | None = None,
) -> jax.Array:
    """``y[rows of g] = x[rows of g] @ W_g`` with W_g read in place from the arena (see module doc).

    x: [M, K] (or [T, K] read through x_rows); arena_rows: [num_rows, R]; offsets, sizes: [G]
    int32; n: N (static). backend: None (from the platform), "reference", "gpu", "interpret".
    Fusions (each optional, `arena_matmul_gpu.Fusion`; the reference applies them as jnp ops):
      x_rows [M] int32: product row i reads ``x[x_rows[i]]``;
      swiglu (static inter): ``silu(y[:, :inter]) * y[:, inter:2 * inter]``, [M, inter];
      row_scale [M] f32: row i times row_scale[i];
      out_rows [M] int32, a permutation of [0, M): row i is stored at out_rows[i].
    The GPU kernel fuses them when ``swiglu`` is a multiple of R (else its SwiGLU, scale and
    scatter run as jnp ops after an unfused product).
    group_rows: the rows a non-empty group is expected to hold, a tiling hint for the GPU kernel
    (None: M / G; the result does not depend on it).
    Returns [M, N] (or [M, swiglu]) in out_dtype, accumulated in f32.
    """
    check_args(x, arena_rows, offsets, sizes, n)
    be = resolve_backend(backend)
    fused = dict(x_rows=x_rows, swiglu=swiglu, row_scale=row_scale, out_rows=out_rows,
                 out_dtype=out_dtype)
    if be in ("reference", "tpu", "tpu_interpret"):
        # TPU: no Mosaic kernel yet; XLA's ragged_dot over sliced weights is the fallback.
        return arena_grouped_matmul_reference(x, arena_rows, offsets, sizes, n, **fused)
    from pallas_kernels.arena_matmul_gpu import arena_grouped_matmul_gpu

    if swiglu % arena_rows.shape[1]:  # the up columns do not start on an arena row
        y = arena_grouped_matmul_gpu(x, arena_rows, offsets, sizes, n, backend=be, x_rows=x_rows)
        return apply_fusions(y, swiglu=swiglu, row_scale=row_scale, out_rows=out_rows,
                             out_dtype=out_dtype)
    return arena_grouped_matmul_gpu(x, arena_rows, offsets, sizes, n, backend=be,
                                    group_rows=group_rows, **fused)


__all__ = ["apply_fusions", "arena_grouped_matmul", "arena_grouped_matmul_reference"]
