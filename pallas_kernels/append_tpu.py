"""Mosaic TPU KV append: DMA each new token's row chunks from VMEM into its page, in place.

The arena stays in HBM (``memory_space=ANY``) and is aliased to the output; the slots are
scalar-prefetched into SMEM. Grid over blocks of ``block_n`` tokens; for each valid token the
kernel issues one [1, R] DMA per chunk (chunk c of slot ``page * T + off`` goes to row
``c * T + off`` of that page), all of a token's DMAs in flight together.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import interpret_flag
from pallas_kernels.page_layout import PageGeometry


def _kernel(slots_ref, rows_ref, arena_in_ref, arena_ref, sem, *, geom: PageGeometry,
            block_n: int, num_chunks: int):
    del arena_in_ref  # the same buffer as arena_ref (aliased)
    i = pl.program_id(0)
    t_pp = geom.tokens_per_page

    def token(t, carry):
        slot = slots_ref[i * block_n + t]

        @pl.when(slot >= 0)
        def _write():
            page = slot // t_pp
            off = slot % t_pp
            copies = [
                pltpu.make_async_copy(
                    rows_ref.at[t, pl.ds(c, 1), :],
                    arena_ref.at[page, pl.ds(c * t_pp + off, 1), :],
                    sem,
                )
                for c in range(num_chunks)
            ]
            for cp in copies:
                cp.start()
            for cp in copies:
                cp.wait()

        return carry

    lax.fori_loop(0, block_n, token, jnp.int32(0))


def append_rows_tpu(arena: jax.Array, slots: jax.Array, rows: jax.Array, geom: PageGeometry,
                    backend: str, block_n: int = 8) -> jax.Array:
    """arena: [num_pages, rows_per_page, R]; slots: [N]; rows: [N, chunks, R] -> new arena."""
    n = slots.shape[0]
    n_pad = -(-max(n, 1) // block_n) * block_n
    slots = jnp.pad(slots.astype(jnp.int32), (0, n_pad - n), constant_values=-1)
    rows = jnp.pad(rows.astype(arena.dtype), ((0, n_pad - n), (0, 0), (0, 0)))
    c = rows.shape[1]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(n_pad // block_n,),
        in_specs=[
            pl.BlockSpec((block_n, c, geom.row_elems), lambda i, s: (i, 0, 0)),
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        scratch_shapes=[pltpu.SemaphoreType.DMA(())],
    )
    return pl.pallas_call(
        functools.partial(_kernel, geom=geom, block_n=block_n, num_chunks=c),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(arena.shape, arena.dtype),
        input_output_aliases={2: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret_flag(backend),
        name="kv_append_tpu",
    )(slots, rows, arena)
