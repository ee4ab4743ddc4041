"""Paged decode attention (GQA/MQA/MHA and MLA) against the references, on every backend.

Each case is NaN-poisoned everywhere nothing was written (see kvcase.py), uses shuffled page
tables with -1 past each sequence, and holds the lengths 0 (empty slot), 1, page-1, page,
page+1 and a long one in ONE call. The Pallas interpreters also poison the kernels' outputs
(test_interpret_poison.py), so an element a kernel forgets to write shows up as NaN.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kvcase import edge_lengths, make_case, np_attention, page_bytes_for, rel_err, tol

from pallas_kernels.decode import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_mla_decode_attention,
    paged_mla_decode_attention_reference,
)
from pallas_kernels.page_layout import KVSpec, page_geometry


def _gqa_truth(case, q, scale, soft_cap=None, window=None):
    """Independent float64 answer from the dense values written (no paged layout involved)."""
    hq = q.shape[1]
    out = np.zeros(q.shape)
    for b, d in enumerate(case.dense):
        n = d["k"].shape[0]
        if n == 0:
            continue
        g = hq // d["k"].shape[1]
        k = np.repeat(d["k"], g, axis=1)
        v = np.repeat(d["v"], g, axis=1)
        out[b] = np_attention(np.asarray(q[b:b + 1], np.float64), k, v, np.array([n - 1]),
                              scale=scale, soft_cap=soft_cap, window=window)[0]
    return out


def test_reference_matches_dense_numpy():
    rng = np.random.default_rng(0)
    spec = KVSpec.gqa(2, 32)
    case = make_case(rng, spec, edge_lengths(8), row_elems=16,
                     page_bytes=page_bytes_for(spec, 16, "float32", 8))
    assert case.geom.tokens_per_page == 8
    q = jnp.asarray(rng.standard_normal((6, 6, 32)), jnp.float32)
    for kw in ({}, {"soft_cap": 3.0, "window": 5}):
        ref = paged_decode_attention_reference(q, case.arena, case.table, case.lens, case.geom,
                                               scale=0.3, **kw)
        assert rel_err(ref, _gqa_truth(case, q, 0.3, **kw)) < 1e-6
        assert float(jnp.abs(ref[0]).max()) == 0.0  # empty slot -> 0


GQA_CASES = [  # (kv_heads, q_heads, head_dim, row_elems, dtype)
    (2, 8, 64, 32, "float32"),  # GQA 4:1, two row chunks per head
    (1, 4, 64, 64, "float32"),  # MQA
    (3, 3, 96, 64, "float32"),  # MHA, head_dim padded from 96 to two 64-rows
    (2, 6, 64, 64, "bfloat16"),  # GQA 3:1 (non power of two), bf16 KV and queries
]


@pytest.mark.parametrize("kvh,hq,d,row_elems,dtype", GQA_CASES)
def test_gqa_decode_gpu_kernel_interpret(kvh, hq, d, row_elems, dtype):
    rng = np.random.default_rng(1)
    spec = KVSpec.gqa(kvh, d)
    case = make_case(rng, spec, edge_lengths(8), dtype=dtype, row_elems=row_elems,
                     page_bytes=page_bytes_for(spec, row_elems, dtype, 8))
    t_pp = case.geom.tokens_per_page
    assert case.lens.tolist() == edge_lengths(t_pp)
    q = jnp.asarray(rng.standard_normal((6, hq, d)), jnp.dtype(dtype))
    ref = paged_decode_attention_reference(q, case.arena, case.table, case.lens, case.geom)
    for kw in ({}, {"num_splits": 3, "block_t": 16}):
        out = paged_decode_attention(q, case.arena, case.table, case.lens, case.geom,
                                     backend="interpret", **kw)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert rel_err(out, ref) < tol(dtype), kw
        assert float(jnp.abs(out[0].astype(jnp.float32)).max()) == 0.0


def test_gqa_decode_softcap_window_and_persistent():
    rng = np.random.default_rng(2)
    lens = [0, 3, 40, 7, 95, 1, 64]  # ragged: one long sequence among short ones
    case = make_case(rng, KVSpec.gqa(2, 32), lens, row_elems=32, page_bytes=4096)
    q = jnp.asarray(rng.standard_normal((len(lens), 4, 32)), jnp.float32)
    truth = _gqa_truth(case, q, 0.2, soft_cap=4.0, window=20)
    for kw in ({"schedule": "split", "num_splits": 4, "block_t": 16},
               {"schedule": "persistent", "num_programs": 3, "block_t": 16},
               {"schedule": "persistent", "num_programs": 5, "items_per_program": 3}):
        out = paged_decode_attention(q, case.arena, case.table, case.lens, case.geom, scale=0.2,
                                     soft_cap=4.0, window=20, backend="interpret", **kw)
        assert rel_err(out, truth) < 1e-5, kw
    full = paged_decode_attention(q, case.arena, case.table, case.lens, case.geom,
                                  backend="interpret", schedule="persistent", num_programs=4)
    assert rel_err(full, _gqa_truth(case, q, 32**-0.5)) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gqa_decode_tpu_kernel_interpret(dtype):
    rng = np.random.default_rng(3)
    spec = KVSpec.gqa(2, 128)
    case = make_case(rng, spec, edge_lengths(16), dtype=dtype, row_elems=128,
                     page_bytes=page_bytes_for(spec, 128, dtype, 16), platform="tpu")
    assert case.geom.tokens_per_page == 16
    q = jnp.asarray(rng.standard_normal((6, 8, 128)), jnp.dtype(dtype))
    for kw in ({}, {"soft_cap": 10.0, "window": 18}) if dtype == "float32" else ({},):
        ref = paged_decode_attention_reference(q, case.arena, case.table, case.lens, case.geom,
                                               **kw)
        out = paged_decode_attention(q, case.arena, case.table, case.lens, case.geom,
                                     backend="tpu_interpret", **kw)
        assert rel_err(out, ref) < tol(dtype), kw


def _mla_truth(case, ql, qr, scale):
    out = np.zeros(ql.shape)
    for b, d in enumerate(case.dense):
        n = d["latent"].shape[0]
        if n == 0:
            continue
        h = ql.shape[1]
        k = np.concatenate([d["latent"], d["rope"]], axis=-1)[:, None].repeat(h, axis=1)
        q = np.concatenate([np.asarray(ql[b], np.float64), np.asarray(qr[b], np.float64)], -1)
        out[b] = np_attention(q[None], k, d["latent"][:, None].repeat(h, axis=1),
                              np.array([n - 1]), scale=scale)[0]
    return out


@pytest.mark.parametrize("backend,dtype", [("interpret", "float32"), ("interpret", "bfloat16"),
                                           ("tpu_interpret", "float32")])
def test_mla_decode(backend, dtype):
    rng = np.random.default_rng(4)
    platform = "tpu" if backend == "tpu_interpret" else "gpu"
    r = 128 if platform == "tpu" else 32
    spec = KVSpec.mla(128, 32)
    t_pp = 16 if (platform, dtype) == ("tpu", "bfloat16") else 8
    case = make_case(rng, spec, edge_lengths(t_pp), dtype=dtype, row_elems=r,
                     page_bytes=page_bytes_for(spec, r, dtype, t_pp), platform=platform)
    assert case.geom.tokens_per_page == t_pp
    b, h = 6, 12
    ql = jnp.asarray(rng.standard_normal((b, h, 128)), jnp.dtype(dtype))
    qr = jnp.asarray(rng.standard_normal((b, h, 32)), jnp.dtype(dtype))
    ref = paged_mla_decode_attention_reference(ql, qr, case.arena, case.table, case.lens,
                                               case.geom, scale=0.1)
    if dtype == "float32":
        assert rel_err(ref, _mla_truth(case, ql, qr, 0.1)) < 1e-6
    kws = [{}] if backend == "tpu_interpret" else [{}, {"schedule": "persistent",
                                                        "num_programs": 3, "group_block": 4}]
    for kw in kws:
        out = paged_mla_decode_attention(ql, qr, case.arena, case.table, case.lens, case.geom,
                                         scale=0.1, backend=backend, **kw)
        assert out.shape == ql.shape and out.dtype == ql.dtype
        assert rel_err(out, ref) < tol(dtype), kw


def test_backend_reference_and_shape_errors():
    rng = np.random.default_rng(5)
    case = make_case(rng, KVSpec.gqa(1, 32), [3, 9], row_elems=32, page_bytes=2048)
    q = jnp.asarray(rng.standard_normal((2, 2, 32)), jnp.float32)
    ref = paged_decode_attention_reference(q, case.arena, case.table, case.lens, case.geom)
    out = paged_decode_attention(q, case.arena, case.table, case.lens, case.geom,
                                 backend="reference")
    assert rel_err(out, ref) == 0.0
    with pytest.raises(ValueError, match="does not fit"):
        paged_decode_attention(q[:, :, :16], case.arena, case.table, case.lens, case.geom)
    with pytest.raises(ValueError, match="unknown backend"):
        paged_decode_attention(q, case.arena, case.table, case.lens, case.geom, backend="cuda")
    other = page_geometry(KVSpec.gqa(1, 32), case.pool, token_align=1)
    assert other.tokens_per_page == case.geom.tokens_per_page  # 16 rows / 2 rows a token = 8
    with pytest.raises(ValueError, match="MLA"):
        paged_mla_decode_attention(q, q, case.arena, case.table, case.lens, case.geom, scale=1.0)
