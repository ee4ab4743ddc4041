"""`pallas_kernels.arena_matmul_mgpu_ws` (Mosaic GPU, warp-specialized) on this CPU-only machine.

* Under Mosaic GPU's interpreter (its 3 warpgroups run as threads, TMA / barriers / shared memory
  simulated) with its happens-before race detector on, against a float64 numpy product of the
  column-panel weight layout: ragged groups, an empty group, a tail that must be exactly 0, an odd
  panel count, both wgmma modes. (The interpreter runs a wgmma synchronously, so it cannot see a
  stage refilled while an asynchronous wgmma still reads it; that ordering is the barriers' job.)
* Cross-lowered to Mosaic GPU for an abstract H200 at the prefill shapes: the whole Pallas -> Mosaic
  GPU lowering, layout inference and the shared-memory check run here; only the final compile
  needs the chip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from mgpu_check import lowered_for_h200, races_detected

from benchmarks.prefill_matmul import arena_of, numpy_product
from pallas_kernels.arena_matmul_mgpu_ws import arena_grouped_matmul_mgpu_ws, epilogue_tiling, smem_plan

S = jax.ShapeDtypeStruct


@pytest.fixture
def race_detection(monkeypatch):
    """The kernel's interpret backend with the race detector on (fresh traces)."""
    with races_detected(monkeypatch, arena_grouped_matmul_mgpu_ws):
        yield


@pytest.mark.parametrize(("m", "k", "n", "sizes", "kw"), [
    # an empty group, a 30-row tail, M not a block multiple; 4 K steps through 2 stages
    (200, 256, 256, [70, 0, 100], {"block_m": 64, "max_concurrent_steps": 2}),
    # 3 panels: the second column block's warpgroup 1 has no panel
    (200, 128, 384, [70, 0, 100], {"block_m": 128, "max_concurrent_steps": 2}),
    # one wgmma in flight, manual consumed barriers, 3 stages over 4 K steps; bf16 output
    (200, 256, 384, [70, 0, 100], {"block_m": 64, "max_concurrent_steps": 3, "wgmma_in_flight": 1,
                                   "out_dtype": "bfloat16"}),
    # one K step (one stage), a single panel (warpgroup 1 never stores)
    (200, 64, 128, [0, 130, 50], {"wgmma_in_flight": 1}),
    # block_k 128; nothing routed here: all zeros
    (96, 128, 256, [0, 0, 0], {"block_m": 64, "block_k": 128}),
])
def test_matches_numpy_on_ragged_groups(race_detection, m, k, n, sizes, kw):
    arena, offs = arena_of(len(sizes), k, n, 128)
    x = jax.random.normal(jax.random.key(3), (m, k), jnp.bfloat16)
    sz = np.asarray(sizes, np.int32)
    out = arena_grouped_matmul_mgpu_ws(x, arena, jnp.asarray(offs), jnp.asarray(sz), n,
                                       backend="interpret", **kw)
    assert not interpret_pallas_call.get_races().races_found
    got = np.asarray(out.astype(jnp.float32), np.float64)
    want = numpy_product(x, arena, offs, sz, k, n, panels=True)
    assert out.shape == (m, n) and out.dtype == jnp.dtype(kw.get("out_dtype", "float32"))
    assert np.all(got[int(sz.sum()):] == 0.0)
    if sz.sum():
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
        if out.dtype == jnp.float32:
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)


# Every configuration recommended for the prefill shapes (benchmarks/prefill_matmul.py).
LOWERED = [
    (2048, 2048, {}),
    (2048, 2048, {"block_m": 64}),
    (2048, 2048, {"block_k": 128, "max_concurrent_steps": 2}),
    (2048, 2048, {"max_concurrent_steps": 3, "grid_block_n": 4}),
    (2048, 2048, {"wgmma_in_flight": 1}),
    (2048, 2048, {"out_dtype": "bfloat16"}),
    (2048, 1536, {}),  # 12 panels (Qwen3 gate/up)
    (768, 2048, {"block_m": 64, "wgmma_in_flight": 1}),  # Qwen3 down
    (2048, 640, {"out_dtype": "bfloat16"}),  # 5 panels: odd
    (2048, 128, {"block_m": 64}),  # 1 panel
]


@pytest.mark.parametrize(("k", "n", "kw"), LOWERED)
def test_lowers_to_mosaic_gpu_for_h200(monkeypatch, k, n, kw):
    g = 64
    args = (S((16384, k), jnp.bfloat16), S((g * (k * n // 128) + 64, 128), jnp.bfloat16),
            S((g,), jnp.int32), S((g,), jnp.int32))
    fn = functools.partial(arena_grouped_matmul_mgpu_ws, n=n, backend="gpu", **kw)
    text = lowered_for_h200(monkeypatch, fn, args)
    assert "mosaic_gpu" in text


def test_shared_memory_plan():
    # block_m 128, block_k 64, 4 stages: 192 KiB of pipeline; 33 KiB left: f32 out gets one slot
    # of 32 columns per warpgroup (128-byte rows: never the 16 columns of 64 bytes that the H200
    # rejected as a misaligned TMA store), bf16 out one slot of 64
    assert smem_plan(128, 64, 128, 4, 2, 4) == (4 * (128 * 64 + 2 * 64 * 128) * 2, 32, 1)
    assert smem_plan(128, 64, 128, 4, 2, 2)[1:] == (64, 1)
    assert smem_plan(64, 64, 128, 2, 2, 4)[1:] == (128, 1)  # one chunk: one slot
    assert smem_plan(128, 128, 128, 3, 2, 4)[1:] == (0, 0)  # 288 KiB of pipeline: too much
    assert epilogue_tiling(128, 128, 4, 10**9) == (128, 1)
    assert epilogue_tiling(128, 128, 4, 2 * 128 * 128 * 4) == (128, 1)
    assert epilogue_tiling(128, 128, 4, 2 * 128 * 128 * 4 - 1) == (64, 1)  # 2 slots of 64: too big
    assert epilogue_tiling(128, 128, 4, 20000) == (0, 0)  # 16 columns would be 64-byte rows


def test_rejects_what_it_cannot_do():
    arena, offs = arena_of(2, 128, 128, 128)
    x = jnp.ones((16, 128), jnp.bfloat16)
    o, s = jnp.asarray(offs), jnp.asarray([8, 8], jnp.int32)
    call = functools.partial(arena_grouped_matmul_mgpu_ws, x, arena, o, s, 128, backend="interpret")
    with pytest.raises(ValueError, match="bf16/f16"):
        arena_grouped_matmul_mgpu_ws(x, arena.astype(jnp.float32), o, s, 128, backend="interpret")
    with pytest.raises(ValueError, match="block_k"):
        call(block_k=32)
    with pytest.raises(ValueError, match="block_m"):
        call(block_m=96)
    with pytest.raises(ValueError, match="wgmma_in_flight"):
        call(wgmma_in_flight=2)
    x2 = jnp.ones((16, 512), jnp.bfloat16)
    arena2, offs2 = arena_of(2, 512, 128, 128)
    with pytest.raises(ValueError, match="shared memory"):
        arena_grouped_matmul_mgpu_ws(x2, arena2, jnp.asarray(offs2), s, 128, backend="interpret",
                                     block_k=128, max_concurrent_steps=3)
