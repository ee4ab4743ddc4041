"""Hopper tensor-core (Mosaic GPU, wgmma) kernel of `pallas_kernels.arena_matmul` for many rows.

Contract: `pallas_kernels.arena_matmul` (weights read in place from the arena's flat rows), except
for the weight layout (below). Written for the calls with many rows per group (prefill: a
2,048-token chunk routes 16,384 rows over 64-128 experts). NOT used by the engine: on one H200 it
ran 0.6-1.0x the Triton kernel (`pallas_kernels.arena_matmul_gpu`) at those shapes
(docs/benchmarks.md, "Prefill expert matmuls"); `benchmarks/prefill_matmul.py` measures it.

Tiling. Work items are (group, row block) pairs: a group whose rows ``[start_g, end_g)`` touch row
blocks ``b0 .. b1`` of ``block_m`` rows gets one item per block, and the rows past ``sum(sizes)``
(the tail) are one more group whose items store zeros. ``sum_g cdiv(s_g, block_m) + G`` bounds the
items, so the item table is static-shaped: [grid_m] rows of (block, first row within the block,
rows, weight row). It is computed by a few jnp ops on [G] vectors before the launch (not inside
the kernel, so the kernel's code does not grow with G). The kernel is persistent: one CTA per SM
walks (item, column block) pairs in a planar snake; per pair it streams ``K / block_k`` steps of a
``[block_m, block_k]`` x tile and a ``[block_k, block_n]`` weight tile through shared memory with
TMA (``max_concurrent_steps`` in flight), accumulates with wgmma in f32 registers, and stores the
item's own rows of the ``[block_m, block_n]`` result with TMA stores of power-of-two row counts
(a TMA box has a static size; any count up to block_m is a sum of distinct powers of two).

Weight tiles ("panels" layout). The arena is ``[num_rows, R]``; weight ``g`` of ``[K, N]`` is
stored from row ``offsets[g]`` as ``N / R`` column panels, each a contiguous row-major ``[K, R]``
block (element ``(k, n)`` at row ``offsets[g] + (n // R) * K + k``, column ``n % R``), so the
``[block_k, R]`` tile at ``(k0, column block j)`` is one contiguous TMA box. Hence ``block_n == R``.
(A row-major weight would need a strided box of every ``N / R``-th row: Mosaic GPU lowers that only
through a reshape of the slice, which its interpreter cannot run.) The engine's arena stores
weights row-major today; this layout is what the kernel would need it to write.

Requirements (checked): bf16 or f16 operands (wgmma), ``K % block_k == 0``, ``R in (64, 128,
256)``; x is padded to a multiple of ``block_m`` rows. Not checked: ``offsets`` multiples of 8 and
the arena's row count a multiple of 8 (Mosaic's layout inference needs them proven, which the
kernel asserts with ``pl.multiple_of``).

Backends: "gpu" (Mosaic GPU) and "interpret" (Mosaic GPU's interpreter on CPU, which simulates
TMA, barriers and shared memory: tests/kernels/test_arena_matmul_mgpu.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import attention_core

ITEM_FIELDS = 4  # block, first row within the block, rows, weight row (-1: the tail, zeros)


def item_table(sizes: jax.Array, offsets: jax.Array, m: int, block_m: int) -> jax.Array:
    """[ITEM_FIELDS, cdiv(m, block_m) + G] int32: the work items (see module doc), live ones first.

    sizes, offsets: [G] int32 (sizes clipped so that sum <= m). An item with 0 rows is idle.
    """
    g = sizes.shape[0]
    sz = jnp.maximum(sizes.astype(jnp.int32), 0)
    end = jnp.minimum(jnp.cumsum(sz), m)
    start = jnp.minimum(end - sz, m)
    total = end[-1] if g else jnp.int32(0)
    # the tail as one more group
    start = jnp.concatenate([start, total[None]])
    end = jnp.concatenate([end, jnp.full((1,), m, jnp.int32)])
    woff = jnp.concatenate([offsets.astype(jnp.int32), jnp.full((1,), -1, jnp.int32)])
    size = end - start
    b0 = start // block_m
    nblk = jnp.where(size > 0, (end - 1) // block_m - b0 + 1, 0)
    first = jnp.cumsum(nblk) - nblk
    n_items = -(-m // block_m) + g
    t = jnp.arange(n_items, dtype=jnp.int32)
    grp = jnp.clip(jnp.searchsorted(jnp.cumsum(nblk), t, side="right"), 0, g).astype(jnp.int32)
    live = t < jnp.sum(nblk)
    block = b0[grp] + t - first[grp]
    lo = jnp.maximum(start[grp], block * block_m)
    hi = jnp.minimum(end[grp], (block + 1) * block_m)
    rows = jnp.where(live, jnp.maximum(hi - lo, 0), 0)
    return jnp.stack([jnp.where(live, block, 0), jnp.where(live, lo - block * block_m, 0), rows,
                      woff[grp]]).astype(jnp.int32)


def _store_rows(o_smem, o_gmem, row0, first, rows, col0, block_m: int, block_n: int) -> None:
    """TMA-stores rows [first, first + rows) of o_smem [block_m, block_n] to o_gmem rows
    row0 + first ..., columns col0 ...: one box per set bit of `rows` (static box sizes)."""
    at = first
    size = block_m
    while size >= 1:
        bit = size

        @pl.when((rows & bit) != 0)
        def _(at=at, bit=bit):  # run at once by pl.when; the defaults just bind this iteration's
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(at, bit)],
                                    o_gmem.at[pl.ds(row0 + at, bit), pl.ds(col0, block_n)])

        at = at + (rows & bit)
        size //= 2


def _kernel(items_ref, x_gmem, w_gmem, o_gmem, *, k: int, n: int, block_m: int, block_k: int,
            steps: int, grid_block_n: int, n_items: int):
    block_n = w_gmem.shape[1]
    grid_n = n // block_n

    @plgpu.nd_loop((n_items * grid_n,), collective_axes="sm")
    def _(info):
        mi, ni = plgpu.planar_snake(info.index[0], (n_items, grid_n), 1, grid_block_n)
        block = items_ref[0, mi]
        first = items_ref[1, mi]
        rows = items_ref[2, mi]
        woff = items_ref[3, mi]

        @pl.when(rows > 0)
        def _():
            def acc_scope(acc_ref):
                @pl.when(woff >= 0)
                def _():
                    w = w_gmem.at[pl.ds(pl.multiple_of(woff + ni * k, 8), k)]  # column panel ni: [K, R]
                    plgpu.emit_pipeline(
                        lambda _, x_smem, w_smem: plgpu.wgmma(acc_ref, x_smem, w_smem),
                        grid=(k // block_k,),
                        in_specs=[
                            plgpu.BlockSpec((block_m, block_k), lambda kb: (block, kb),
                                            delay_release=1),
                            plgpu.BlockSpec((block_k, block_n), lambda kb: (kb, 0),
                                            delay_release=1),
                        ],
                        max_concurrent_steps=steps,
                    )(x_gmem, w)

                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n)))

            @functools.partial(pl.run_scoped,
                               o_smem=plgpu.SMEM((block_m, block_n), dtype=o_gmem.dtype))
            def _(o_smem):
                o_smem[...] = acc.astype(o_smem.dtype)
                plgpu.commit_smem()
                _store_rows(o_smem, o_gmem, block * block_m, first, rows, ni * block_n, block_m,
                            block_n)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("n", "backend", "block_m", "block_k",
                                             "max_concurrent_steps", "grid_block_n", "out_dtype"))
def arena_grouped_matmul_mgpu(
    x: jax.Array,
    arena_rows: jax.Array,
    offsets: jax.Array,
    sizes: jax.Array,
    n: int,
    *,
    backend: str = "gpu",
    block_m: int = 128,
    block_k: int = 64,
    max_concurrent_steps: int = 4,
    grid_block_n: int = 1,
    out_dtype: str = "float32",
) -> jax.Array:
    """`pallas_kernels.arena_matmul.arena_grouped_matmul` on Hopper tensor cores (module doc).

    x: [M, K] (cast to the arena's dtype); arena_rows: [num_rows, R] bf16/f16; offsets, sizes:
    [G] int32; n: N (static, a multiple of R). backend: "gpu" or "interpret".
    Returns [M, N] `out_dtype` (f32 accumulation); rows past ``sum(sizes)`` are 0.
    """
    check_wgmma_args(x, arena_rows, offsets, sizes, n, backend, block_m, block_k)
    kernel = functools.partial(_kernel, k=x.shape[1], n=n, block_m=block_m, block_k=block_k,
                               steps=max_concurrent_steps, grid_block_n=grid_block_n)
    return launch_over_items(kernel, x, arena_rows, offsets, sizes, n, backend=backend,
                             block_m=block_m, out_dtype=out_dtype)


def check_wgmma_args(x: jax.Array, arena_rows: jax.Array, offsets: jax.Array, sizes: jax.Array,
                     n: int, backend: str, block_m: int, block_k: int) -> None:
    """The checks every Mosaic kernel of this contract makes (`arena_matmul.check_args`, then
    what wgmma and TMA need); raises ValueError."""
    from pallas_kernels.arena_matmul import check_args

    check_args(x, arena_rows, offsets, sizes, n)
    if backend not in ("gpu", "interpret"):
        raise ValueError(f"backend {backend!r}: expected 'gpu' or 'interpret'")
    dt = jnp.dtype(arena_rows.dtype)
    if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"wgmma needs bf16/f16 weights, got {dt}")
    r = arena_rows.shape[1]
    if r not in (64, 128, 256):
        raise ValueError(f"arena row width R={r}: expected 64, 128 or 256 (one wgmma N tile)")
    if x.shape[1] % block_k:
        raise ValueError(f"K={x.shape[1]} must be a multiple of block_k={block_k}")
    if block_m % 64 or block_m > 256:
        raise ValueError(f"block_m={block_m}: a multiple of 64 up to 256 (one warpgroup's wgmma)")


def launch_over_items(kernel: Any, x: jax.Array, arena_rows: jax.Array, offsets: jax.Array,
                      sizes: jax.Array, n: int, *, backend: str, block_m: int, out_dtype: str,
                      **kernel_kwargs: Any) -> jax.Array:
    """Runs ``kernel(items_ref, x_gmem, w_gmem, o_gmem, n_items=...)`` persistently (one CTA per
    SM; 2 in the interpreter) over the work items of `item_table`, with x cast to the arena's dtype
    and padded to a multiple of `block_m` rows; `kernel_kwargs` go to `plgpu.kernel` (e.g. the
    warpgroups of a warp-specialized kernel). Returns [M, N] `out_dtype` (M = x's rows)."""
    m = x.shape[0]
    if m == 0 or offsets.shape[0] == 0:
        return jnp.zeros((m, n), out_dtype)
    mp = -(-m // block_m) * block_m
    xp = x.astype(arena_rows.dtype)
    if mp != m:
        xp = jnp.pad(xp, ((0, mp - m), (0, 0)))
    items = item_table(sizes, offsets, m, block_m)
    interpret = None
    if backend == "interpret":
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        interpret = InterpretGPUParams()
    out = plgpu.kernel(
        functools.partial(kernel, n_items=items.shape[1]),
        out_type=jax.ShapeDtypeStruct((mp, n), jnp.dtype(out_dtype)),
        grid=(2 if backend == "interpret" else attention_core.num_sms(),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
        **kernel_kwargs,
    )(items, xp, arena_rows)
    return out[:m] if mp != m else out


__all__ = ["arena_grouped_matmul_mgpu", "check_wgmma_args", "item_table", "launch_over_items"]
