"""KV append: rows land in their pages, nothing else changes, buffers are donated/aliased."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kvcase import make_case

from pallas_kernels.append import (
    kv_append,
    kv_append_reference,
    mla_kv_append,
    mla_kv_append_reference,
)
from pallas_kernels.page_layout import KVSpec, PoolLayout, page_geometry
from pallas_kernels.paged_reference import read_features, slots_from_positions

CONFIGS = [  # (backend, dtype, row_elems, page_bytes, platform)
    ("interpret", "float32", 32, 4096, "gpu"),
    ("interpret", "bfloat16", 64, 4096, "gpu"),
    ("tpu_interpret", "float32", 128, 16384, "tpu"),
    ("tpu_interpret", "bfloat16", 128, 16384, "tpu"),
]


def _random_arena(rng, pool: PoolLayout, num_pages: int):
    return jnp.asarray(rng.standard_normal(pool.arena_shape(num_pages)), jnp.dtype(pool.dtype))


def _slots(rng, geom, num_pages: int, n: int, n_skip: int) -> jnp.ndarray:
    s = rng.choice(num_pages * geom.tokens_per_page, n - n_skip, replace=False)
    s = np.concatenate([s, np.full(n_skip, -1)])
    return jnp.asarray(rng.permutation(s), jnp.int32)


@pytest.mark.parametrize("backend,dtype,row_elems,page_bytes,platform", CONFIGS)
def test_gqa_append_writes_only_its_rows(backend, dtype, row_elems, page_bytes, platform):
    rng = np.random.default_rng(11)
    pool = PoolLayout(page_bytes=page_bytes, dtype=dtype, row_elems=row_elems)
    geom = page_geometry(KVSpec.gqa(2, 64 if row_elems < 128 else 128), pool, platform=platform)
    num_pages, n = 6, 23  # prefill-sized: tokens of several pages, two padding slots
    before = _random_arena(rng, pool, num_pages)
    slots = _slots(rng, geom, num_pages, n, n_skip=2)
    d = geom.spec.head_dim
    k = jnp.asarray(rng.standard_normal((n, 2, d)), jnp.dtype(dtype))
    v = jnp.asarray(rng.standard_normal((n, 2, d)), jnp.dtype(dtype))
    want = kv_append_reference(before, slots, k, v, geom)
    got = kv_append(jnp.array(before), slots, k, v, geom, backend=backend)
    assert bool(jnp.array_equal(got, want))
    # Exactly the rows of the valid tokens changed; every other row (other slots, page tails)
    # is bit-identical to before.
    changed = np.asarray(jnp.any(got != before, axis=-1))
    n_valid = int((slots >= 0).sum())
    assert changed.sum() == n_valid * geom.chunks_per_token
    assert changed[:, geom.used_rows:].sum() == 0
    # Reading the pages back gives the written K/V (a one-page table per written slot).
    t = geom.tokens_per_page
    ok = np.asarray(slots) >= 0
    s = np.asarray(slots)[ok]
    feats = read_features(got, geom, jnp.asarray((s // t)[:, None], jnp.int32), t)
    rows = np.arange(len(s))
    np.testing.assert_array_equal(np.asarray(feats["k"])[rows, :, s % t],
                                  np.asarray(k)[ok])
    np.testing.assert_array_equal(np.asarray(feats["v"])[rows, :, s % t],
                                  np.asarray(v)[ok])


@pytest.mark.parametrize("backend,dtype,row_elems,page_bytes,platform",
                         [CONFIGS[1], CONFIGS[2]])
def test_mla_append_decode_step(backend, dtype, row_elems, page_bytes, platform):
    """One token per sequence (decode), written into the next slot of each sequence's pages."""
    rng = np.random.default_rng(12)
    lens = [0, 5, 16, 33]
    case = make_case(rng, KVSpec.mla(128, 32), lens, dtype=dtype, row_elems=row_elems,
                     page_bytes=page_bytes * 2, platform=platform, spare_pages=2,
                     reserve=1)
    geom = case.geom
    b = len(lens)
    slots = slots_from_positions(jnp.maximum(case.table, 0), jnp.arange(b, dtype=jnp.int32),
                                 case.lens, geom.tokens_per_page)
    lat = jnp.asarray(rng.standard_normal((b, 128)), jnp.dtype(dtype))
    rope = jnp.asarray(rng.standard_normal((b, 32)), jnp.dtype(dtype))
    want = mla_kv_append_reference(case.arena, slots, lat, rope, geom)
    got = mla_kv_append(jnp.array(case.arena), slots, lat, rope, geom, backend=backend)
    assert bool(jnp.array_equal(got, want, equal_nan=True))  # untouched slots are still NaN
    feats = read_features(got, geom, jnp.maximum(case.table, 0), max(lens) + 1)
    for i, n in enumerate(lens):
        np.testing.assert_array_equal(np.asarray(feats["latent"][i, n]), np.asarray(lat[i]))
        np.testing.assert_array_equal(np.asarray(feats["rope"][i, n]), np.asarray(rope[i]))
        if n:  # the earlier tokens are intact
            np.testing.assert_array_equal(np.asarray(feats["latent"][i, :n], np.float32),
                                          case.dense[i]["latent"])


def test_append_donates_and_aliases_the_arena():
    rng = np.random.default_rng(13)
    pool = PoolLayout(page_bytes=4096, dtype="float32", row_elems=32)
    geom = page_geometry(KVSpec.gqa(1, 32), pool)
    arena = _random_arena(rng, pool, 4)
    k = jnp.ones((2, 1, 32))
    out = kv_append(arena, jnp.array([0, 9], jnp.int32), k, k, geom, backend="interpret")
    assert arena.is_deleted()  # the input buffer was donated to the call
    assert out.shape == pool.arena_shape(4)
    np.testing.assert_array_equal(np.asarray(out[0, 0]), np.ones(32))
    # That the kernel's output aliases its arena input is checked on the GPU/TPU lowerings in
    # test_lowering.py.
