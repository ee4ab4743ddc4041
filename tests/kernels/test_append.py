"""KV append: rows land in their pages, nothing else changes, buffers are donated/aliased."""

from __future__ import annotations

import jax
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


# K/V read in place by the GPU kernel (head_dim % R == 0) vs the packed path (padding needed):
# (kv_heads, head_dim, R, arena dtype, k/v dtype, block_n).
DIRECT = [
    (1, 32, 32, "float32", "float32", 16),
    (2, 64, 32, "float32", "bfloat16", 8),  # cast to the arena dtype first
    (4, 64, 64, "bfloat16", "bfloat16", 16),
    (4, 128, 64, "bfloat16", "bfloat16", 8),
    (2, 64, 64, "bfloat16", "float32", 16),
    (1, 256, 128, "bfloat16", "bfloat16", 16),
]
PACKED = [(2, 48, 32, "float32", "float32", 16), (1, 96, 64, "bfloat16", "bfloat16", 8)]


def _geom(kvh: int, d: int, r: int, dtype: str, tail_rows: int = 3):
    """8 tokens per page plus ``tail_rows`` rows of page-tail padding."""
    chunks = 2 * kvh * -(-d // r)
    itemsize = jnp.dtype(dtype).itemsize
    pool = PoolLayout(page_bytes=(8 * chunks + tail_rows) * r * itemsize, dtype=dtype, row_elems=r)
    geom = page_geometry(KVSpec.gqa(kvh, d), pool)
    assert geom.tokens_per_page == 8
    return pool, geom


def _prefill_slots(rng, geom, num_pages: int) -> jnp.ndarray:
    """A 21-token prefill chunk starting mid-page over shuffled pages (so it crosses three page
    boundaries), 3 scattered decode tokens on other pages and 2 padding slots: N = 26."""
    t = geom.tokens_per_page
    pages = rng.permutation(num_pages)
    pos = np.arange(5, 26)
    chunk = pages[pos // t] * t + pos % t
    decode = pages[4:][rng.choice(num_pages - 4, 3, replace=False)] * t + rng.integers(0, t, 3)
    return jnp.asarray(np.concatenate([chunk, decode, [-1, -1]]), jnp.int32)


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}")


@pytest.mark.parametrize("kvh,d,r,dtype,kv_dtype,block_n", DIRECT + PACKED)
def test_gpu_append_matches_reference_bitwise(kvh, d, r, dtype, kv_dtype, block_n):
    rng = np.random.default_rng(14)
    pool, geom = _geom(kvh, d, r, dtype)
    num_pages = 9
    before = _random_arena(rng, pool, num_pages)
    slots = _prefill_slots(rng, geom, num_pages)
    n = slots.shape[0]
    assert n % block_n
    k = jnp.asarray(rng.standard_normal((n, kvh, d)), jnp.dtype(kv_dtype))
    v = jnp.asarray(rng.standard_normal((n, kvh, d)), jnp.dtype(kv_dtype))
    want = kv_append_reference(before, slots, k, v, geom)
    got = kv_append(jnp.array(before), slots, k, v, geom, backend="interpret", block_n=block_n)
    np.testing.assert_array_equal(_bits(got), _bits(want))
    changed = np.asarray(jnp.any(got != before, axis=-1))
    assert changed.sum() == (n - 2) * geom.chunks_per_token


def _primitive_names(jaxpr) -> set[str]:
    """Primitives of a jaxpr and of every jaxpr nested in its equations (jit, pallas_call, ...)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    names |= _primitive_names(sub)
    return names


def _pallas_calls(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        elif "jaxpr" in eqn.params:
            found += _pallas_calls(getattr(eqn.params["jaxpr"], "jaxpr", eqn.params["jaxpr"]))
    return found


@pytest.mark.parametrize("backend", ["gpu", "interpret"])
@pytest.mark.parametrize("kvh,d,r,dtype,kv_dtype,block_n", [DIRECT[2], DIRECT[3], PACKED[0]])
def test_gpu_append_reads_k_and_v_without_a_packed_copy(backend, kvh, d, r, dtype, kv_dtype,
                                                        block_n):
    """head_dim % R == 0: no concatenate anywhere, and the kernel's operands are k and v as
    [N, KVH * D] (a bitcast of the inputs; no padded copy). Otherwise the packed rows.
    Tracing only, so backend "gpu" works on CPU too."""
    pool, geom = _geom(kvh, d, r, dtype)
    n = 26
    kv = jax.ShapeDtypeStruct((n, kvh, d), jnp.dtype(kv_dtype))
    closed = jax.make_jaxpr(
        lambda a, s, k, v: kv_append(a, s, k, v, geom, backend=backend, block_n=block_n)
    )(jax.ShapeDtypeStruct(pool.arena_shape(9), jnp.dtype(dtype)),
      jax.ShapeDtypeStruct((n,), jnp.int32), kv, kv)
    (call,) = _pallas_calls(closed.jaxpr)
    n_pad = -(-n // block_n) * block_n
    shapes = [tuple(x.aval.shape) for x in call.invars]
    if d % r == 0:
        assert "concatenate" not in _primitive_names(closed.jaxpr)
        assert shapes == [(n_pad,), (n, kvh * d), (n, kvh * d), pool.flat_rows_shape(9)]
    else:
        assert "concatenate" in _primitive_names(closed.jaxpr)
        assert shapes == [(n_pad,), (n_pad, geom.chunks_per_token, r), pool.flat_rows_shape(9)]
