"""Warp-specialized Hopper (Mosaic GPU) kernel of `pallas_kernels.arena_matmul` for many rows.

Contract and weight layout: as `pallas_kernels.arena_matmul_mgpu` (weights read in place from the
arena, each ``[K, N]`` weight stored as ``N / R`` contiguous row-major ``[K, R]`` column panels;
element ``(k, n)`` at arena row ``offsets[g] + (n // R) * K + k``, column ``n % R``), the same work
items (`arena_matmul_mgpu.item_table`: (row block, first row, rows, weight row), the tail of rows
past ``sum(sizes)`` an item of weight row -1 that stores zeros) and the same store of an item's own
rows as a ladder of power-of-two TMA boxes (`arena_matmul_mgpu._store_rows`). What differs is the
structure, that of the fast Hopper GEMMs (jax's ``hopper_matmul_mgpu``):

* Warp specialization. A CTA runs 3 warpgroups: one memory warpgroup that only issues TMA loads and
  two compute warpgroups that only issue wgmma (`plgpu.emit_pipeline_warp_specialized`,
  ``memory_registers=40``, the compute warpgroups get the rest of the register file).
* CTA tile ``block_m x 2R``. A column block is a pair of panels ``(2j, 2j + 1)`` of the item's
  weight; compute warpgroup ``w`` owns panel ``2j + w`` (an f32 ``[block_m, R]`` accumulator,
  `plgpu.ACC`). Per K step the memory warpgroup loads one ``[block_m, block_k]`` x tile, shared by
  both, and the two ``[block_k, R]`` weight tiles (each one contiguous TMA box) into one
  ``[2, stages, block_k, R]`` shared-memory buffer, so that a warpgroup picks its tile by its own
  index. If ``N / R`` is odd, the last column block loads panel ``N / R - 1`` twice and warpgroup 1
  computes it but does not store it (simple; it costs one panel of wasted work per item).
* Persistent. One CTA per SM walks the (item, column block) pairs in a planar snake
  (``grid_block_n`` column blocks wide); per pair the K loop streams ``K / block_k`` steps with
  ``max_concurrent_steps`` stages in flight. The pipeline buffers live across the loop, so the
  memory warpgroup loads the next pair's first stages while the compute warpgroups run the
  epilogue. ``wgmma_in_flight=0`` waits for each step's wgmma before releasing its stage (jax's
  Hopper matmul does this; the other compute warpgroup keeps the tensor cores busy meanwhile);
  ``wgmma_in_flight=1`` keeps one wgmma in flight and releases a stage one step late (manual
  consumed barriers; the last stage once the last wgmma is done, since the memory warpgroup
  refills it for the next pair).
* Epilogue. Each compute warpgroup converts its accumulator to ``out_dtype`` in column chunks of
  ``epi_n`` columns (as wide as shared memory allows, at most R) through its own shared-memory
  slots (2 when the chunk count is even, so a chunk's conversion overlaps the previous chunk's
  store) and TMA-stores the item's rows of each chunk. A tail item (weight row -1) stores zeros
  without loading weights; an item of 0 rows does nothing.

Requirements (checked): bf16 or f16 operands (wgmma), ``K % block_k == 0``, ``block_k`` a multiple
of 64 (a 128-byte swizzled bf16 row), ``R in (64, 128, 256)``, ``block_m`` a multiple of 64 up to
256, and the buffers within shared memory (a stage holds ``(block_m + 2R) * block_k`` operands: at
block_m 128, 4 stages of ``block_k=64`` or 2 of ``block_k=128`` fit); x is padded to a multiple of
``block_m`` rows. Not checked: ``offsets`` multiples of 8 and the arena's row count a multiple of 8
(asserted to Mosaic with ``pl.multiple_of``, which its layout inference needs).

Backends: "gpu" (Mosaic GPU) and "interpret" (Mosaic GPU's interpreter on CPU, which runs the three
warpgroups as threads and simulates TMA, barriers and shared memory:
tests/kernels/test_arena_matmul_mgpu_ws.py).

Status (NOT used by the engine, whose arena stores weights row-major). On one H200 (2026-12-04,
`benchmarks/prefill_matmul.py`'s correctness step) every configuration matched numpy on the small
cases (K = 128, N = 256 / 384, ragged groups, a zero tail) and failed with
CUDA_ERROR_MISALIGNED_ADDRESS at M = 4,096, G = 64, K = 2,048, N = 1,024: f32 output went out in
16-column chunks, 64-byte rows, and a TMA store from an odd row of such a chunk is not 128-byte
aligned (the small cases' item rows started at even offsets). Chunks are now at least 128-byte rows
(`epilogue_tiling`); that fix has not run on a GPU yet (no device time was left), nor has any
timing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.arena_matmul_mgpu import _store_rows, check_wgmma_args, launch_over_items

COMPUTE_WGS = 2  # compute warpgroups per CTA (each owns one R-column panel); + 1 memory warpgroup
MEMORY_REGISTERS = 40  # registers per thread of the memory warpgroup (jax's Hopper matmul's value)
SMEM_BYTES = 227 * 1024  # an H100/H200 CTA's dynamic shared memory
SMEM_SLACK = 2048  # barriers and alignment


TMA_SMEM_ALIGN = 128  # bytes: a TMA copy's shared-memory address must be a multiple of this


def epilogue_tiling(block_m: int, r: int, out_itemsize: int, free_bytes: int) -> tuple[int, int]:
    """(epi_n, slots): the widest output chunk (columns, a power of two dividing R) whose
    per-warpgroup buffers fit in ``free_bytes`` of shared memory, with 2 slots if the chunk count
    is even and they fit, else 1. (0, 0) if nothing fits. A chunk row is at least
    `TMA_SMEM_ALIGN` bytes: the item's rows start at any row of the chunk, and a TMA store from a
    row of 64 bytes at an odd offset is misaligned (CUDA_ERROR_MISALIGNED_ADDRESS on the H200 with
    16 f32 columns, 2026-12-04)."""
    epi_n = r
    while epi_n * out_itemsize >= TMA_SMEM_ALIGN:
        for slots in ((2, 1) if (r // epi_n) % 2 == 0 else (1,)):
            if COMPUTE_WGS * slots * block_m * epi_n * out_itemsize <= free_bytes:
                return epi_n, slots
        epi_n //= 2
    return 0, 0


def smem_plan(block_m: int, block_k: int, r: int, stages: int, in_itemsize: int,
              out_itemsize: int) -> tuple[int, int, int]:
    """(pipeline bytes, epi_n, epilogue slots) of the shared memory the kernel allocates."""
    pipe = stages * (block_m * block_k + COMPUTE_WGS * block_k * r) * in_itemsize
    epi_n, slots = epilogue_tiling(block_m, r, out_itemsize, SMEM_BYTES - SMEM_SLACK - pipe)
    return pipe, epi_n, slots


def _kernel(items_ref, x_gmem, w_gmem, o_gmem, *, k: int, n: int, block_m: int, block_k: int,
            stages: int, grid_block_n: int, n_items: int, epi_n: int, epi_slots: int,
            wgmma_in_flight: int) -> None:
    r = w_gmem.shape[1]
    dt = x_gmem.dtype
    out_dt = o_gmem.dtype
    panels = n // r
    grid_n = -(-panels // COMPUTE_WGS)
    k_steps = k // block_k
    swizzle = plgpu.find_swizzle(block_k * jnp.dtype(dt).itemsize * 8)
    sw = swizzle // jnp.dtype(dt).itemsize
    x_tf = (plgpu.TilingTransform((8, sw)), plgpu.SwizzleTransform(swizzle))
    w_swizzle = plgpu.find_swizzle(r * jnp.dtype(dt).itemsize * 8)
    w_sw = w_swizzle // jnp.dtype(dt).itemsize
    w_tf = (plgpu.TilingTransform((8, w_sw)), plgpu.SwizzleTransform(w_swizzle))

    def wg_body(idxs, x_smem, w0_smem, w1_smem, *rest, w_buf, consumed):
        del w0_smem, w1_smem  # the same tiles as w_buf.at[0/1, slot]; a warpgroup picks its own
        acc_ref = rest[-1]
        step = idxs[0]
        slot = lax.rem(step, stages)  # the pipeline's slot of this step (it starts at step 0)
        plgpu.wgmma(acc_ref, x_smem, w_buf.at[lax.axis_index("wg"), slot])
        plgpu.wgmma_wait(wgmma_in_flight)
        if wgmma_in_flight:
            # This step's wgmma may still read its stage: release the previous step's stage now
            # and the last one once every wgmma is done (the memory warpgroup waits for all).
            @pl.when(step > 0)
            def _():
                for bar in consumed:
                    plgpu.barrier_arrive(bar.at[lax.rem(step + stages - 1, stages)])

            @pl.when(step == k_steps - 1)
            def _():
                plgpu.wgmma_wait(0)
                for bar in consumed:
                    plgpu.barrier_arrive(bar.at[slot])
        return acc_ref

    def make_pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=MEMORY_REGISTERS,
            in_specs=[
                plgpu.BlockSpec((block_m, block_k), lambda kb: (0, kb), transforms=x_tf),
                plgpu.BlockSpec((block_k, r), lambda kb: (kb, 0), transforms=w_tf),
                plgpu.BlockSpec((block_k, r), lambda kb: (kb, 0), transforms=w_tf),
            ],
            wg_axis="wg",
            num_compute_wgs=COMPUTE_WGS,
            max_concurrent_steps=stages,
            manual_consumed_barriers=bool(wgmma_in_flight),
            compute_context=compute_context,
        )

    allocs = make_pipeline(lambda *_: None, lambda *_: None).get_allocations(
        x_gmem.at[pl.ds(0, block_m)], w_gmem.at[pl.ds(0, k)], w_gmem.at[pl.ds(0, k)])
    # Both weight tiles of a stage in one buffer, indexable by the warpgroup.
    x_alloc = allocs["flat_in_smem_refs"][0]
    allocs["flat_in_smem_refs"] = [x_alloc, plgpu.SMEM((COMPUTE_WGS, stages, block_k, r), dt,
                                                       transforms=w_tf)]

    @functools.partial(
        pl.run_scoped,
        allocs=allocs,
        o_smem=plgpu.SMEM((COMPUTE_WGS, epi_slots, block_m, epi_n), out_dt),
        collective_axes="wg",
    )
    def _scope(allocs, o_smem):
        x_buf, w_buf = allocs["flat_in_smem_refs"]
        allocs = dict(allocs, flat_in_smem_refs=[x_buf, w_buf.at[0], w_buf.at[1]])
        wg = lax.axis_index("wg")
        is_compute = wg < COMPUTE_WGS

        def store(values, row0, first, rows, panel) -> None:
            """This compute warpgroup's epilogue: `values(c)` ([block_m, epi_n] of chunk c) to rows
            [first, first + rows) of the item, columns of `panel`."""
            for c in range(r // epi_n):
                slot = c % epi_slots
                buf = o_smem.at[wg, slot]
                # the store that last read this slot is at least epi_slots groups old
                plgpu.wait_smem_to_gmem(epi_slots - 1, wait_read_only=True)
                buf[...] = values(c)
                plgpu.commit_smem()
                _store_rows(buf, o_gmem, row0, first, rows, panel * r + c * epi_n, block_m, epi_n)

        @plgpu.nd_loop((n_items * grid_n,), collective_axes="sm")
        def _(info):
            mi, ni = plgpu.planar_snake(info.index[0], (n_items, grid_n), 1, grid_block_n)
            block = items_ref[0, mi]
            first = items_ref[1, mi]
            rows = items_ref[2, mi]
            woff = items_ref[3, mi]
            row0 = block * block_m
            panel = ni * COMPUTE_WGS + wg  # this compute warpgroup's panel (>= panels: none)
            stores = (rows > 0) & (panel < panels)

            @pl.when((rows > 0) & (woff >= 0))
            def _():
                def compute_context(run_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((block_m, r), jnp.float32))
                    def _(acc_ref):
                        run_pipeline(acc_ref)
                        acc = acc_ref[...]

                        @pl.when(stores)
                        def _():
                            store(lambda c: acc[:, c * epi_n:(c + 1) * epi_n].astype(out_dt), row0,
                                  first, rows, panel)

                p0 = ni * COMPUTE_WGS
                p1 = jnp.minimum(p0 + 1, panels - 1)  # odd panel count: the last one again
                body = functools.partial(wg_body, w_buf=w_buf,
                                         consumed=allocs["flat_consumed_barrier_refs"])
                make_pipeline(body, compute_context)(
                    x_gmem.at[pl.ds(pl.multiple_of(row0, block_m), block_m)],
                    w_gmem.at[pl.ds(pl.multiple_of(woff + p0 * k, 8), k)],
                    w_gmem.at[pl.ds(pl.multiple_of(woff + p1 * k, 8), k)],
                    allocations=allocs,
                )

            @pl.when(is_compute & stores & (woff < 0))
            def _():
                store(lambda c: jnp.zeros((block_m, epi_n), out_dt), row0, first, rows, panel)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("n", "backend", "block_m", "block_k",
                                             "max_concurrent_steps", "grid_block_n", "out_dtype",
                                             "wgmma_in_flight"))
def arena_grouped_matmul_mgpu_ws(
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
    wgmma_in_flight: int = 0,
) -> jax.Array:
    """`pallas_kernels.arena_matmul.arena_grouped_matmul`, warp-specialized on Hopper (module doc).

    x: [M, K] (cast to the arena's dtype); arena_rows: [num_rows, R] bf16/f16 (weights as column
    panels); offsets, sizes: [G] int32; n: N (static, a multiple of R). backend: "gpu" or
    "interpret". wgmma_in_flight: 0 (each K step waits for its wgmma before releasing its stage, as
    jax's Hopper matmul does) or 1 (a step's wgmma overlaps the next step's issue; the stage is
    released one step late through manual consumed barriers). Returns [M, N] `out_dtype` (f32
    accumulation); rows past ``sum(sizes)`` are 0.
    """
    check_wgmma_args(x, arena_rows, offsets, sizes, n, backend, block_m, block_k)
    k = x.shape[1]
    if block_k % 64:
        raise ValueError(f"K={k} must be a multiple of block_k={block_k}, a multiple of 64")
    if max_concurrent_steps < 1 or grid_block_n < 1:
        raise ValueError(f"max_concurrent_steps={max_concurrent_steps} and "
                         f"grid_block_n={grid_block_n} must be >= 1")
    if wgmma_in_flight not in (0, 1):
        raise ValueError(f"wgmma_in_flight={wgmma_in_flight}: expected 0 or 1")
    stages = min(max_concurrent_steps, k // block_k)
    pipe, epi_n, epi_slots = smem_plan(block_m, block_k, arena_rows.shape[1], stages,
                                       jnp.dtype(arena_rows.dtype).itemsize,
                                       jnp.dtype(out_dtype).itemsize)
    if not epi_n:
        raise ValueError(f"block_m={block_m}, block_k={block_k}, {stages} stages: {pipe} bytes of "
                         f"pipeline buffers leave no room for the epilogue in {SMEM_BYTES} bytes of "
                         "shared memory")
    kernel = functools.partial(_kernel, k=k, n=n, block_m=block_m, block_k=block_k, stages=stages,
                               grid_block_n=grid_block_n, epi_n=epi_n, epi_slots=epi_slots,
                               wgmma_in_flight=wgmma_in_flight)
    return launch_over_items(kernel, x, arena_rows, offsets, sizes, n, backend=backend,
                             block_m=block_m, out_dtype=out_dtype, num_threads=COMPUTE_WGS + 1,
                             thread_name="wg")


__all__ = ["arena_grouped_matmul_mgpu_ws", "epilogue_tiling", "smem_plan"]
