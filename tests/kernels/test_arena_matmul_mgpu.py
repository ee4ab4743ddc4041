"""`pallas_kernels.arena_matmul_mgpu` (Mosaic GPU, one warpgroup) under Mosaic GPU's interpreter on
CPU, against a numpy product of the column-panel weight layout; and its item table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.prefill_matmul import arena_of, numpy_product
from pallas_kernels.arena_matmul_mgpu import arena_grouped_matmul_mgpu, item_table


@pytest.mark.parametrize(("m", "k", "n", "sizes", "block_m"), [
    (200, 128, 256, [70, 0, 100], 64),  # an empty group, a 30-row tail, M not a block multiple
    (200, 128, 384, [70, 0, 100], 128),  # 3 column panels
    (96, 64, 128, [0, 0, 0], 64),  # nothing routed here: all zeros
])
def test_matches_numpy_on_ragged_groups(m, k, n, sizes, block_m):
    arena, offs = arena_of(len(sizes), k, n, 64)
    x = jax.random.normal(jax.random.key(3), (m, k), jnp.bfloat16)
    sz = np.asarray(sizes, np.int32)
    got = np.asarray(arena_grouped_matmul_mgpu(x, arena, jnp.asarray(offs), jnp.asarray(sz), n,
                                               backend="interpret", block_m=block_m,
                                               max_concurrent_steps=2), np.float64)
    want = numpy_product(x, arena, offs, sz, k, n, panels=True)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)
    assert np.all(got[int(sz.sum()):] == 0.0)


def test_item_table_covers_every_row_once():
    # groups of 70, 0, 100 rows (then a 30-row tail) in 64-row blocks: hand-checked items
    items = np.asarray(item_table(jnp.asarray([70, 0, 100], jnp.int32),
                                  jnp.asarray([8, 16, 24], jnp.int32), 200, 64))
    want = [(0, 0, 64, 8), (1, 0, 6, 8), (1, 6, 58, 24), (2, 0, 42, 24), (2, 42, 22, -1),
            (3, 0, 8, -1), (0, 0, 0, -1)]
    assert [tuple(int(v) for v in items[:, i]) for i in range(items.shape[1])] == want
    covered = np.zeros(200, int)
    for block, first, rows, _ in want:
        covered[block * 64 + first: block * 64 + first + rows] += 1
    assert np.all(covered == 1)


def test_rejects_what_wgmma_cannot_do():
    arena, offs = arena_of(2, 64, 128, 64)
    x = jnp.ones((16, 64), jnp.bfloat16)
    o, s = jnp.asarray(offs), jnp.asarray([8, 8], jnp.int32)
    with pytest.raises(ValueError, match="bf16/f16"):
        arena_grouped_matmul_mgpu(x, arena.astype(jnp.float32), o, s, 128, backend="interpret")
    with pytest.raises(ValueError, match="block_k"):
        arena_grouped_matmul_mgpu(x, arena, o, s, 128, backend="interpret", block_k=128)
    with pytest.raises(ValueError, match="block_m"):
        arena_grouped_matmul_mgpu(x, arena, o, s, 128, backend="interpret", block_m=96)
