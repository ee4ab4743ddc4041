"""``return_lse=True``: the attention kernels also return each query row's log-sum-exp.

lse = m + log(sum_j exp(s_j - m)) over the (scaled, soft-capped) scores s of the keys a query
attends to, -inf for a row that attends to none. Checked here, for decode and prefill, GQA and
MLA, fp32 and bf16 arenas, split and persistent schedules and the TPU kernel (interpret):

* the output is bit-identical to the call without ``return_lse``;
* lse matches the reference's (and the reference's matches an independent float64 numpy lse);
* -inf exactly for empty slots / rows outside every sequence, finite everywhere else;
* the use it exists for: one sequence's KV split into two page tables (first pages / the rest),
  attended separately, merged with ``o = sum_i exp(lse_i - M) o_i / sum_i exp(lse_i - M)``,
  equals the attention over the whole sequence.

Cases come from kvcase.py: NaN-poisoned arenas, shuffled page tables with -1 padding, and the
lengths 0 (empty slot), 1, page-1, page, page+1 and a long one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice, AbstractMesh
from kvcase import edge_lengths, make_case, page_bytes_for, rel_err, tol

from pallas_kernels.decode import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_mla_decode_attention,
    paged_mla_decode_attention_reference,
)
from pallas_kernels.page_layout import KVSpec, PoolLayout, page_geometry
from pallas_kernels.prefill import (
    paged_mla_prefill_attention,
    paged_mla_prefill_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
)

T_PP = 8
Q_LENS = [0, 1, 3, 8, 2, 20]  # prefill chunks for KV lengths edge_lengths(8) = [0, 1, 7, 8, 9, 35]
PAD_ROWS = 3  # q rows past the last chunk: output 0, lse -inf


def _cu(q_lens):
    return jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)


def _check_lse(lse, ref_lse, no_key, dtype, shape):
    """lse: float32 ``shape``; -inf exactly where ``no_key`` (bool, broadcast over heads)."""
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    assert lse.shape == shape and lse.dtype == np.float32, (lse.shape, lse.dtype)
    no_key = np.broadcast_to(np.asarray(no_key)[:, None], shape)
    assert np.array_equal(np.isneginf(lse), no_key)
    assert np.array_equal(np.isneginf(ref_lse), no_key)
    assert np.all(np.isfinite(lse[~no_key]))
    # lse values are O(1) (log of a few keys' weights), so atol = rtol keeps values near 0 fair.
    t = tol(dtype)
    np.testing.assert_allclose(lse[~no_key], ref_lse[~no_key], rtol=t, atol=t)


def _call(fn, args, **kw):
    """fn(*args, **kw) under one jit (args: arrays, then the geometry). The eager references
    would compile op by op, several times slower on the CI machine."""
    *arrays, geom = args
    return jax.jit(lambda *a: fn(*a, geom, **kw))(*arrays)


def _check_pair(fn, args, kw, ref_out, ref_lse, no_key, dtype):
    """fn(*args, **kw, return_lse=True) == (fn(*args, **kw) exactly, lse close to ref_lse)."""
    out, lse = _call(fn, args, **kw, return_lse=True)
    plain = _call(fn, args, **kw)
    assert out.dtype == plain.dtype and out.shape == plain.shape
    assert np.array_equal(np.asarray(out.astype(jnp.float32)),
                          np.asarray(plain.astype(jnp.float32))), kw
    assert rel_err(out, ref_out) < tol(dtype), kw
    _check_lse(lse, ref_lse, no_key, dtype, out.shape[:2])


def _np_lse(q, k, q_pos, scale, soft_cap=None, window=None):
    """Float64 lse of one sequence: q [T, H, d], k [L, H, d]; query t sees j <= q_pos[t]."""
    s = np.einsum("thd,lhd->thl", q.astype(np.float64), k.astype(np.float64)) * scale
    if soft_cap is not None:
        s = soft_cap * np.tanh(s / soft_cap)
    j = np.arange(k.shape[0])[None, None, :]
    mask = j <= q_pos[:, None, None]
    if window is not None:
        mask = mask & (j > q_pos[:, None, None] - window)
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True, initial=-np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isneginf(m[..., 0]), -np.inf,
                        m[..., 0] + np.log(np.exp(s - np.where(np.isneginf(m), 0, m)).sum(-1)))


def _gqa_case(rng, dtype, kvh, hq, d=32, platform="gpu", row_elems=32):
    spec = KVSpec.gqa(kvh, d)
    case = make_case(rng, spec, edge_lengths(T_PP), dtype=dtype, row_elems=row_elems,
                     page_bytes=page_bytes_for(spec, row_elems, dtype, T_PP), platform=platform)
    assert case.geom.tokens_per_page == T_PP
    return case


def _mla_case(rng, dtype, platform="gpu", row_elems=32):
    spec = KVSpec.mla(64, 16)
    t_pp = 16 if (platform, dtype) == ("tpu", "bfloat16") else T_PP
    return make_case(rng, spec, edge_lengths(t_pp), dtype=dtype, row_elems=row_elems,
                     page_bytes=page_bytes_for(spec, row_elems, dtype, t_pp), platform=platform)


# ---- decode -------------------------------------------------------------------------------------

DECODE_GQA = [  # (dtype, kv_heads, q_heads, call kwargs (each checked against the reference))
    ("float32", 2, 8, [{"num_splits": 3, "block_t": 16},
                       {"schedule": "persistent", "num_programs": 3, "block_t": 16}]),
    ("bfloat16", 2, 6, [{}]),  # group 3 (padded), bf16 arena and queries
]


@pytest.mark.parametrize("dtype,kvh,hq,kws", DECODE_GQA)
def test_gqa_decode_lse(dtype, kvh, hq, kws):
    rng = np.random.default_rng(300 + hq)
    case = _gqa_case(rng, dtype, kvh, hq)
    q = jnp.asarray(rng.standard_normal((len(case.lens), hq, 32)), jnp.dtype(dtype))
    args = (q, case.arena, case.table, case.lens, case.geom)
    no_key = np.asarray(case.lens) == 0
    variants = [({}, kws[0]), ({"soft_cap": 3.0, "window": 5, "scale": 0.4}, kws[-1])]
    for masking, kw in variants:
        ref_out, ref_lse = _call(paged_decode_attention_reference, args, return_lse=True,
                                 **masking)
        if dtype == "float32":  # the reference's lse against float64 numpy on the dense values
            g = hq // kvh
            for b, dn in enumerate(case.dense):
                n = dn["k"].shape[0]
                if n:
                    want = _np_lse(np.asarray(q[b:b + 1]), np.repeat(dn["k"], g, axis=1),
                                   np.array([n - 1]), masking.get("scale", 32**-0.5),
                                   masking.get("soft_cap"), masking.get("window"))[0]
                    np.testing.assert_allclose(np.asarray(ref_lse[b]), want, rtol=1e-6,
                                               atol=1e-6)
        _check_pair(paged_decode_attention, args, {"backend": "reference", **masking}, ref_out,
                    ref_lse, no_key, dtype)
        _check_pair(paged_decode_attention, args, {"backend": "interpret", **masking, **kw},
                    ref_out, ref_lse, no_key, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mla_decode_lse(dtype):
    rng = np.random.default_rng(310)
    case = _mla_case(rng, dtype)
    b, h = len(case.lens), 4
    ql = jnp.asarray(rng.standard_normal((b, h, 64)), jnp.dtype(dtype))
    qr = jnp.asarray(rng.standard_normal((b, h, 16)), jnp.dtype(dtype))
    args = (ql, qr, case.arena, case.table, case.lens, case.geom)
    ref_out, ref_lse = _call(paged_mla_decode_attention_reference, args, scale=0.1,
                             return_lse=True)
    no_key = np.asarray(case.lens) == 0
    kws = [{}]
    if dtype == "float32":
        kws.append({"schedule": "persistent", "num_programs": 3, "group_block": 4})
    for kw in kws:
        _check_pair(paged_mla_decode_attention, args,
                    {"scale": 0.1, "backend": "interpret", **kw}, ref_out, ref_lse, no_key,
                    dtype)


# ---- prefill ------------------------------------------------------------------------------------


def _prefill_no_key(t):
    return np.arange(t) >= sum(Q_LENS)  # padding rows; every chunk row sees at least itself


PREFILL_GQA = [
    ("float32", [{"block_q": 4, "num_splits": 2, "block_t": 16},
                 {"schedule": "persistent", "block_q": 2}]),
    ("bfloat16", [{}]),
]


@pytest.mark.parametrize("dtype,kws", PREFILL_GQA)
def test_gqa_prefill_lse(dtype, kws):
    rng = np.random.default_rng(320)
    case = _gqa_case(rng, dtype, 2, 8)
    t = sum(Q_LENS) + PAD_ROWS
    q = jnp.asarray(rng.standard_normal((t, 8, 32)), jnp.dtype(dtype))
    args = (q, case.arena, case.table, case.lens, _cu(Q_LENS), case.geom)
    variants = [({}, kws[0]), ({"soft_cap": 2.0, "window": 6, "scale": 0.3}, kws[-1])]
    for masking, kw in variants:
        ref_out, ref_lse = _call(paged_prefill_attention_reference, args, return_lse=True,
                                 **masking)
        if dtype == "float32":
            at = 0
            for dn, qn in zip(case.dense, Q_LENS, strict=True):
                n = dn["k"].shape[0]
                if qn:
                    want = _np_lse(np.asarray(q[at:at + qn]), np.repeat(dn["k"], 4, axis=1),
                                   np.arange(n - qn, n), masking.get("scale", 32**-0.5),
                                   masking.get("soft_cap"), masking.get("window"))
                    np.testing.assert_allclose(np.asarray(ref_lse[at:at + qn]), want,
                                               rtol=1e-6, atol=1e-6)
                at += qn
        _check_pair(paged_prefill_attention, args, {"backend": "reference", **masking}, ref_out,
                    ref_lse, _prefill_no_key(t), dtype)
        _check_pair(paged_prefill_attention, args, {"backend": "interpret", **masking, **kw},
                    ref_out, ref_lse, _prefill_no_key(t), dtype)


def test_mla_prefill_lse():
    rng = np.random.default_rng(330)
    case = _mla_case(rng, "float32")
    t, h = sum(Q_LENS) + PAD_ROWS, 4
    ql = jnp.asarray(rng.standard_normal((t, h, 64)), jnp.float32)
    qr = jnp.asarray(rng.standard_normal((t, h, 16)), jnp.float32)
    args = (ql, qr, case.arena, case.table, case.lens, _cu(Q_LENS), case.geom)
    ref_out, ref_lse = _call(paged_mla_prefill_attention_reference, args, scale=0.1,
                             return_lse=True)
    _check_pair(paged_mla_prefill_attention, args,
                {"scale": 0.1, "backend": "interpret", "block_q": 4}, ref_out, ref_lse,
                _prefill_no_key(t), "float32")


# ---- TPU kernel (interpret) ---------------------------------------------------------------------


def test_tpu_kernel_lse():
    rng = np.random.default_rng(340)
    case = _gqa_case(rng, "float32", 2, 4, d=128, platform="tpu", row_elems=128)
    b = len(case.lens)
    q = jnp.asarray(rng.standard_normal((b, 4, 128)), jnp.float32)
    args = (q, case.arena, case.table, case.lens, case.geom)
    kw = {"soft_cap": 5.0, "window": 10}
    ref_out, ref_lse = _call(paged_decode_attention_reference, args, return_lse=True, **kw)
    _check_pair(paged_decode_attention, args, {"backend": "tpu_interpret", **kw}, ref_out,
                ref_lse, np.asarray(case.lens) == 0, "float32")
    t = sum(Q_LENS) + PAD_ROWS
    qp = jnp.asarray(rng.standard_normal((t, 4, 128)), jnp.float32)
    pargs = (qp, case.arena, case.table, case.lens, _cu(Q_LENS), case.geom)
    ref_out, ref_lse = _call(paged_prefill_attention_reference, pargs, return_lse=True)
    _check_pair(paged_prefill_attention, pargs, {"backend": "tpu_interpret"}, ref_out, ref_lse,
                _prefill_no_key(t), "float32")


# ---- the point of it: merging partial attentions over a split KV --------------------------------


def _merge(parts):
    """[(o [.., H, W], lse [.., H])...] -> (o, lse) of the union of the parts' keys."""
    o = np.stack([np.asarray(p[0], np.float64) for p in parts])
    lse = np.stack([np.asarray(p[1], np.float64) for p in parts])
    m = lse.max(0)
    w = np.exp(lse - m)  # an empty part has lse = -inf: weight 0
    den = w.sum(0)
    return (w[..., None] * o).sum(0) / den[..., None], m + np.log(den)


def _split_table(table, lens, first_pages):
    """(table, lens) of the first ``first_pages`` pages of each sequence, and of the rest."""
    cut = first_pages * T_PP
    lens = np.asarray(lens)
    t1 = np.asarray(table)[:, :first_pages]
    t2 = np.asarray(table)[:, first_pages:]
    return ((jnp.asarray(t1), jnp.asarray(np.minimum(lens, cut), jnp.int32)),
            (jnp.asarray(t2), jnp.asarray(np.maximum(lens - cut, 0), jnp.int32)))


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_split_kv_decode_merges_to_whole(backend):
    """A decode query sees every key, so the two halves are plain decodes over their tables."""
    rng = np.random.default_rng(350)
    lens = [21, 16, 17, 3]  # cut at 16: rest of 5 | exactly the cut (rest empty) | 1 | only part 1
    case = make_case(rng, KVSpec.gqa(2, 32), lens, row_elems=32,
                     page_bytes=page_bytes_for(KVSpec.gqa(2, 32), 32, "float32", T_PP))
    q = jnp.asarray(rng.standard_normal((len(lens), 8, 32)), jnp.float32)
    kw = {"backend": backend, "soft_cap": 4.0}
    whole = _call(paged_decode_attention, (q, case.arena, case.table, case.lens, case.geom),
                  return_lse=True, **kw)
    (t1, n1), (t2, n2) = _split_table(case.table, lens, first_pages=2)
    parts = [_call(paged_decode_attention, (q, case.arena, t, n, case.geom), return_lse=True,
                   **kw) for t, n in ((t1, n1), (t2, n2))]
    assert np.all(np.isneginf(np.asarray(parts[1][1])[[1, 3]]))  # nothing past page 2: -inf
    o, lse = _merge(parts)
    assert rel_err(o, whole[0]) < 1e-5
    np.testing.assert_allclose(lse, np.asarray(whole[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_split_kv_prefill_merges_to_whole(backend):
    """Prefill: the first part is a prefix every chunk row sees whole, the rest holds the chunk.

    The prefix part fits the prefill contract as one single-query sequence per chunk row (its
    position is the prefix's last, so all of the prefix is visible); the rest is the ordinary
    chunk over the remaining pages (positions shift by the cut, causality is unchanged).
    """
    rng = np.random.default_rng(360)
    lens, q_lens = [29, 20, 21], [10, 4, 5]  # 19 / 16 / 16 tokens before each chunk
    first_pages = 2  # a 16-token cut: inside the first prefix, exactly the other two
    case = make_case(rng, KVSpec.gqa(2, 32), lens, row_elems=32,
                     page_bytes=page_bytes_for(KVSpec.gqa(2, 32), 32, "float32", T_PP))
    t = sum(q_lens)
    q = jnp.asarray(rng.standard_normal((t, 8, 32)), jnp.float32)
    kw = {"backend": backend, "soft_cap": 4.0, "block_q": 4}
    cu = _cu(q_lens)
    whole = _call(paged_prefill_attention, (q, case.arena, case.table, case.lens, cu, case.geom),
                  return_lse=True, **kw)
    (t1, _), (t2, n2) = _split_table(case.table, lens, first_pages)
    row_seq = np.repeat(np.arange(len(lens)), q_lens)
    prefix = _call(paged_prefill_attention,
                   (q, case.arena, jnp.asarray(np.asarray(t1)[row_seq]),
                    jnp.full((t,), first_pages * T_PP, jnp.int32),
                    jnp.arange(t + 1, dtype=jnp.int32), case.geom), return_lse=True, **kw)
    rest = _call(paged_prefill_attention, (q, case.arena, t2, n2, cu, case.geom),
                 return_lse=True, **kw)
    o, lse = _merge([prefix, rest])
    assert rel_err(o, whole[0]) < 1e-5
    np.testing.assert_allclose(lse, np.asarray(whole[1]), rtol=1e-5, atol=1e-5)


# ---- lowering (abstract H200 / TPU v5e): the extra outputs lower on both GPU and TPU -------------


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_lse_kernels_lower(backend):
    platform, device, target = {
        "gpu": ("cuda", AbstractDevice("NVIDIA H200", 132, "gpu"), "xla.gpu.triton"),
        "tpu": ("tpu", AbstractDevice("TPU v5 lite", 1, "tpu"), "tpu_custom_call"),
    }[backend]
    pool = PoolLayout(page_bytes=16384, dtype="bfloat16", row_elems=128)
    g = page_geometry(KVSpec.gqa(2, 128), pool, platform=backend)
    S = jax.ShapeDtypeStruct
    a, tb = S(pool.arena_shape(16), jnp.bfloat16), S((2, 4), jnp.int32)
    ln, cu = S((2,), jnp.int32), S((3,), jnp.int32)
    progs = [
        (lambda q, a, t, n: paged_decode_attention(q, a, t, n, g, backend=backend,
                                                   return_lse=True),
         (S((2, 8, 128), jnp.bfloat16), a, tb, ln)),
        (lambda q, a, t, n, c: paged_prefill_attention(q, a, t, n, c, g, backend=backend,
                                                       return_lse=True),
         (S((24, 8, 128), jnp.bfloat16), a, tb, ln, cu)),
    ]
    if backend == "gpu":
        progs.append((lambda q, a, t, n: paged_decode_attention(
            q, a, t, n, g, backend=backend, schedule="persistent", return_lse=True),
            (S((2, 8, 128), jnp.bfloat16), a, tb, ln)))
    mesh = AbstractMesh((1,), ("x",), abstract_device=device)
    for fn, args in progs:
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
        assert target in lowered.as_text()
        out, lse = lowered.out_info
        assert lse.dtype == jnp.float32 and lse.shape == out.shape[:2]
