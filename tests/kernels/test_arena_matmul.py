"""Grouped matmul over arena weights (pallas_kernels/arena_matmul*.py) against the reference.

Every case builds fresh random weights, places them in an arena at out-of-order offsets with gaps
and NaN-poisons every arena row that belongs to no weight, and NaN-poisons the x rows past
``sum(sizes)``: a kernel that reads outside a weight, or uses a tail row, produces NaN. The Pallas
interpreter also starts outputs as NaN (test_interpret_poison.py), so an unwritten element shows.
The kernel runs under backend "interpret" (the GPU kernel on CPU); the Triton lowering is checked
against an abstract H200.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice, AbstractMesh

from pallas_kernels.arena_matmul import arena_grouped_matmul, arena_grouped_matmul_reference
from pallas_kernels.arena_matmul_gpu import arena_grouped_matmul_gpu, default_config

TOL = {"float32": 1e-5, "bfloat16": 1e-2}


def rel_err(out, ref) -> float:
    o = np.asarray(out, np.float64)
    r = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(o)):
        return float("inf")
    return float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))


def make_case(seed: int, sizes: list[int], m: int, k: int, n: int, r: int, dtype: str):
    """x [M, K] (tail rows NaN), arena [rows, R] (gaps NaN), offsets, sizes, dense weights."""
    rng = np.random.default_rng(seed)
    g = len(sizes)
    rows = k * n // r
    gaps = rng.integers(0, 5, size=g + 1)
    order = rng.permutation(g)  # weight order[j] is the j-th in the arena
    offsets = np.zeros(g, np.int32)
    at = int(gaps[0])
    for j, w in enumerate(order):
        offsets[w] = at
        at += rows + int(gaps[j + 1])
    arena = np.full((at, r), np.nan, np.float32)
    dense = rng.standard_normal((g, k, n)).astype(np.float32)
    dense = np.asarray(jnp.asarray(dense, dtype).astype(jnp.float32))  # the stored values
    for w in range(g):
        arena[offsets[w]:offsets[w] + rows] = dense[w].reshape(rows, r)
    x = rng.standard_normal((m, k)).astype(np.float32)
    total = sum(sizes)
    x_clean = x.copy()
    x_clean[total:] = 0.0
    x[total:] = np.nan
    return {
        "x": jnp.asarray(x, dtype), "x_clean": jnp.asarray(x_clean, dtype),
        "arena": jnp.asarray(arena, dtype), "offsets": jnp.asarray(offsets),
        "sizes": jnp.asarray(np.asarray(sizes, np.int32)), "dense": dense, "total": total,
    }


CASES = {  # name: (sizes, M, K, N, R, dtype, kernel kwargs)
    "dense_f32": ([24], 24, 80, 192, 64, "float32", {}),  # plain projection, K tail (bk 64)
    "moe_bf16": ([0, 1, 20, 0, 3, 17, 0, 2], 50, 64, 256, 64, "bfloat16", {"bm": 16}),
    "moe_r128_f32": ([5, 0, 0, 9, 1], 20, 48, 384, 128, "float32", {}),  # 3 column blocks
    "full_no_tail_bf16": ([7, 16, 9], 32, 96, 128, 64, "bfloat16", {"bm": 16}),
    "split_k_bf16": ([2, 0, 18, 3], 30, 160, 128, 64, "bfloat16",
                     {"bm": 16, "bk": 32, "split_k": 3}),  # K tail inside the last split
    "bn_r_f32": ([4, 0, 33], 40, 32, 192, 64, "float32", {"bm": 32, "bn": 64}),
    # one item program walks every item (groups, then the tail); and one item per program
    "walk_items_bf16": ([0, 5, 0, 19, 1, 0], 36, 64, 128, 64, "bfloat16", {"programs": 1}),
    "item_per_program_f32": ([3, 0, 11, 0, 2], 24, 32, 128, 64, "float32",
                             {"bm": 16, "programs": 1000}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name):
    sizes, m, k, n, r, dtype, kw = CASES[name]
    c = make_case(list(CASES).index(name), sizes, m, k, n, r, dtype)
    out = arena_grouped_matmul_gpu(c["x"], c["arena"], c["offsets"], c["sizes"], n,
                                   backend="interpret", **kw)
    ref = arena_grouped_matmul_reference(c["x_clean"], c["arena"], c["offsets"], c["sizes"], n)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    assert np.all(np.asarray(out)[c["total"]:] == 0.0)  # tail rows exactly 0


@pytest.mark.parametrize("name", ["moe_bf16", "split_k_bf16"])
def test_plain_product_in_the_model_dtype(name):
    """out_dtype of a plain product: the f32 result rounded once, bit for bit; without a K
    split the kernel writes it directly (no f32 [M, N] in memory), with one the f32 partials
    are summed first."""
    sizes, m, k, n, r, dtype, kw = CASES[name]
    c = make_case(7, sizes, m, k, n, r, dtype)
    args = (c["x"], c["arena"], c["offsets"], c["sizes"], n)
    f32 = arena_grouped_matmul_gpu(*args, backend="interpret", **kw)
    out = arena_grouped_matmul_gpu(*args, backend="interpret", out_dtype=dtype, **kw)
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                  np.asarray(f32.astype(dtype).astype(jnp.float32)))
    text = jax.jit(lambda *a: arena_grouped_matmul_gpu(*a, backend="interpret", out_dtype=dtype,
                                                       **kw), static_argnums=4
                   ).lower(*args).as_text()
    direct = "split_k" not in kw
    assert (f"tensor<1x{m}x{n}x{'bf16'}>" in text) == direct, name


def test_reference_matches_numpy():
    sizes, m, k, n, r, dtype, _ = CASES["moe_r128_f32"]
    c = make_case(1, sizes, m, k, n, r, dtype)
    ref = np.asarray(arena_grouped_matmul_reference(c["x_clean"], c["arena"], c["offsets"],
                                                    c["sizes"], n))
    x = np.asarray(c["x_clean"], np.float64)
    want = np.zeros((m, n))
    start = 0
    for g, s in enumerate(sizes):
        want[start:start + s] = x[start:start + s] @ c["dense"][g]
        start += s
    assert rel_err(ref, want) < 1e-5


def test_all_groups_empty():
    c = make_case(2, [0, 0, 0, 0], 20, 64, 128, 64, "bfloat16")
    out = arena_grouped_matmul_gpu(c["x"], c["arena"], c["offsets"], c["sizes"], 128,
                                   backend="interpret")
    assert np.all(np.asarray(out) == 0.0)


def test_dispatch_and_checks():
    c = make_case(3, [3, 0, 5], 10, 32, 128, 64, "float32")
    out = arena_grouped_matmul(c["x"], c["arena"], c["offsets"], c["sizes"], 128,
                               backend="interpret")
    ref = arena_grouped_matmul(c["x_clean"], c["arena"], c["offsets"], c["sizes"], 128,
                               backend="reference")
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="multiple of the arena row width"):
        arena_grouped_matmul(c["x"], c["arena"], c["offsets"], c["sizes"], 96,
                             backend="interpret")
    with pytest.raises(ValueError, match="bn"):
        arena_grouped_matmul_gpu(c["x"], c["arena"], c["offsets"], c["sizes"], 128,
                                 backend="interpret", bn=32)


def test_default_config():
    # decode MoE: 64 rows over 64 experts -> bm 16; dense 32-row projection -> one 32-row item,
    # split-K because 48 column blocks leave SMs idle.
    moe = default_config(64, 2048, 2048, 64, 64, 2, num_sms=132)
    assert (moe.bm, moe.bn, moe.bk, moe.split_k) == (16, 128, 128, 1)
    assert moe.programs == 17  # 16 column blocks x 17 item programs ~ 2 per SM
    dense = default_config(32, 4096, 6144, 1, 64, 2, num_sms=132)
    assert dense.bm == 32 and dense.split_k > 1 and 4096 // dense.bk // dense.split_k >= 4
    assert dense.programs == 1
    # prefill: a 2,048-token chunk, top-8 over 64 experts -> 256 rows a group: 128-row items
    pre = default_config(16384, 2048, 2048, 64, 128, 2, num_sms=132)
    assert (pre.bm, pre.bn, pre.bk, pre.split_k) == (128, 128, 64, 1)


def test_fused_call_config_prefill_and_decode():
    """The fused MoE pair's tilings: prefill-sized groups (bm 128) get SwiGLU at bk 32 / 4
    stages and a down product of one program per item; decode-sized groups keep 2 stages of
    bk 128 and persistent programs; group_rows overrides the mean over all groups."""
    from pallas_kernels.arena_matmul_gpu import Fusion, _call_config

    gate_up, down = Fusion(True, 1024, False, False), Fusion(False, 0, True, True)
    sms = dict(num_sms=132)
    # OLMoE, a 2,048-token chunk of one model: 16,384 rows over 64 experts
    gu = _call_config(16384, 2048, 1024, 64, 128, 2, gate_up, **sms)
    assert (gu.bm, gu.bn, gu.bk, gu.num_warps, gu.num_stages) == (128, 128, 32, 8, 4)
    dn = _call_config(16384, 1024, 2048, 64, 128, 2, down, **sms)
    assert (dn.bm, dn.bk, dn.num_stages) == (128, 64, 3) and dn.programs >= 16384 // 128 + 64
    # the same chunk in a program of 4 models: the mean is 64 rows, the hint says 256
    assert _call_config(16384, 2048, 1024, 256, 128, 2, gate_up, **sms).bm == 64
    hinted = _call_config(16384, 2048, 1024, 256, 128, 2, gate_up, group_rows=256, **sms)
    assert (hinted.bm, hinted.bk, hinted.num_stages) == (128, 32, 4)
    # decode: 64 rows over 64 experts
    gu_d = _call_config(64, 2048, 1024, 64, 128, 2, gate_up, **sms)
    assert (gu_d.bm, gu_d.bk, gu_d.num_stages) == (16, 128, 2)
    dn_d = _call_config(64, 1024, 2048, 64, 128, 2, down, **sms)
    assert dn_d.programs == default_config(64, 1024, 2048, 64, 128, 2, num_sms=132, split_k=1).programs
    # plain products: a prefill chunk's projection one program per item, a decode one as before
    qkv = _call_config(2048, 2048, 6144, 1, 128, 2, Fusion(), **sms)
    assert qkv.bm == 128 and qkv.programs >= 2048 // 128 + 1
    dense = _call_config(32, 4096, 6144, 1, 128, 2, Fusion(), **sms)
    assert dense == default_config(32, 4096, 6144, 1, 128, 2, num_sms=132)
    # given fields win over the rules
    given = _call_config(16384, 2048, 1024, 64, 128, 2, gate_up, bk=64, num_stages=2, **sms)
    assert (given.bk, given.num_stages) == (64, 2)


def _consumers(jaxpr, var):
    found = []
    for eqn in jaxpr.eqns:
        for i, v in enumerate(eqn.invars):
            if v is not var:
                continue
            if eqn.primitive.name in ("pjit", "jit", "closed_call"):
                inner = eqn.params["jaxpr"].jaxpr
                found += _consumers(inner, inner.invars[i])
            else:
                found.append(eqn.primitive.name)
    return found


@pytest.mark.parametrize("dtype,arena_rows", [(jnp.bfloat16, 1 << 20), (jnp.float32, 1 << 20),
                                              (jnp.bfloat16, 1 << 27)])  # 16 GiB: 64-bit offsets
def test_triton_lowering_and_arena_in_place(dtype, arena_rows):
    s = jax.ShapeDtypeStruct
    args = (s((64, 2048), dtype), s((arena_rows, 64), dtype), s((64,), jnp.int32),
            s((64,), jnp.int32))
    fn = lambda x, a, o, z: arena_grouped_matmul_gpu(x, a, o, z, 2048, backend="gpu")
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA H200", 132, "gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    closed = jax.make_jaxpr(fn)(*args)
    assert _consumers(closed.jaxpr, closed.jaxpr.invars[1]) == ["pallas_call"]


FUSED_CASES = {  # name: (sizes, M, T, K, inter, N (>= 2 inter), R, dtype, kernel kwargs)
    # MoE gate/up: rows gathered from T tokens, SwiGLU, bf16 out; a tail; 2 column blocks
    "gate_up_bf16": ([0, 9, 20, 0, 3], 40, 11, 64, 128, 256, 64, "bfloat16", {"bm": 16}),
    # N padded past 2 * inter (the arena slot's padding); fp32
    "gate_up_pad_f32": ([6, 0, 13], 24, 9, 48, 64, 192, 64, "float32", {}),
    # R = 128, one item program walking every item
    "gate_up_r128_bf16": ([5, 17, 0, 2], 30, 8, 32, 128, 256, 128, "bfloat16", {"programs": 1}),
    # prefill-sized groups (~100 rows a group: bm 128): SwiGLU at bk 32 (2 k-blocks), the down
    # product one program per item; groups straddling 128-row tiles, a tail
    "prefill_bf16": ([150, 0, 131], 300, 60, 64, 128, 256, 128, "bfloat16", {}),
}


def _fusion_inputs(seed: int, m: int, t: int):
    rng = np.random.default_rng(seed)
    x_rows = jnp.asarray(rng.integers(0, t, size=m), jnp.int32)
    scale = jnp.asarray(rng.uniform(0.1, 1.0, size=m), jnp.float32)
    dest = jnp.asarray(rng.permutation(m), jnp.int32)
    return x_rows, scale, dest


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_gate_up_and_down_match_reference(name):
    """The MoE pair as the engine calls it: gather + SwiGLU (bf16/f32 out), then the down
    product with routing-weight scales and a scattered store; each against the reference's jnp
    ops. Tail rows read real token rows (as in the engine) and must still come out 0."""
    sizes, m, t, k, inter, n, r, dtype, kw = FUSED_CASES[name]
    seed = 10 + list(FUSED_CASES).index(name)
    c = make_case(seed, sizes, t, k, n, r, dtype)
    tokens = c["x_clean"] + 0.5  # no NaN rows: every row may be gathered
    x_rows, scale, dest = _fusion_inputs(seed, m, t)
    gate_up = dict(x_rows=x_rows, swiglu=inter, out_dtype=dtype)
    act = arena_grouped_matmul_gpu(tokens, c["arena"], c["offsets"], c["sizes"], n,
                                   backend="interpret", **kw, **gate_up)
    act_ref = arena_grouped_matmul_reference(tokens, c["arena"], c["offsets"], c["sizes"], n,
                                             **gate_up)
    assert act.shape == (m, inter) and act.dtype == jnp.dtype(dtype)
    assert rel_err(act, act_ref) < TOL[dtype], rel_err(act, act_ref)
    assert np.all(np.asarray(act, np.float32)[c["total"]:] == 0.0)
    # down: [inter -> n2] weights of the same groups
    d = make_case(seed + 1, sizes, m, inter, 2 * r, r, dtype)
    down = dict(row_scale=scale, out_rows=dest)
    out = arena_grouped_matmul_gpu(act_ref, d["arena"], d["offsets"], d["sizes"], 2 * r,
                                   backend="interpret", **kw, **down)
    ref = arena_grouped_matmul_reference(act_ref, d["arena"], d["offsets"], d["sizes"], 2 * r,
                                         **down)
    assert out.shape == (m, 2 * r) and out.dtype == jnp.float32
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)
    tail_dest = np.asarray(dest)[c["total"]:]
    assert np.all(np.asarray(out)[tail_dest] == 0.0)  # tail rows land as zeros, where sent


def test_fused_reference_is_the_unfused_ops():
    """The reference's fusions equal the ops the MoE layer ran before they were fused."""
    sizes, m, t, k, inter, n, r, dtype, _ = FUSED_CASES["gate_up_pad_f32"]
    c = make_case(5, sizes, t, k, n, r, dtype)
    x_rows, scale, dest = _fusion_inputs(5, m, t)
    args = (c["arena"], c["offsets"], c["sizes"], n)
    plain = arena_grouped_matmul_reference(c["x_clean"][x_rows], *args)
    want = (jax.nn.silu(plain[:, :inter]) * plain[:, inter:2 * inter]) * scale[:, None]
    inverse = jnp.zeros_like(dest).at[dest].set(jnp.arange(m, dtype=dest.dtype))
    got = arena_grouped_matmul_reference(c["x_clean"], *args, x_rows=x_rows, swiglu=inter,
                                         row_scale=scale, out_rows=dest)
    np.testing.assert_array_equal(np.asarray(got)[np.asarray(dest)], np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want)[np.asarray(inverse)])


def test_fused_dispatch_falls_back_when_up_is_not_row_aligned():
    """inter not a multiple of R: the kernel runs unfused and jnp applies the epilogue."""
    sizes, m, t, k, r = [4, 0, 7], 16, 6, 32, 64
    inter, n = 96, 192
    c = make_case(7, sizes, t, k, n, r, "float32")
    x_rows, scale, dest = _fusion_inputs(7, m, t)
    kw = dict(x_rows=x_rows, swiglu=inter, row_scale=scale, out_rows=dest)
    got = arena_grouped_matmul(c["x_clean"], c["arena"], c["offsets"], c["sizes"], n,
                               backend="interpret", **kw)
    ref = arena_grouped_matmul(c["x_clean"], c["arena"], c["offsets"], c["sizes"], n,
                               backend="reference", **kw)
    assert got.shape == (m, inter) and rel_err(got, ref) < 1e-5
    with pytest.raises(ValueError, match="swiglu inter"):
        arena_grouped_matmul_gpu(c["x_clean"], c["arena"], c["offsets"], c["sizes"], n,
                                 backend="interpret", swiglu=inter)
    with pytest.raises(ValueError, match="row_scale"):
        arena_grouped_matmul_gpu(c["x_clean"], c["arena"], c["offsets"], c["sizes"], n,
                                 backend="interpret", x_rows=x_rows, row_scale=scale[:3])


def test_fused_triton_lowering():
    """The fused MoE pair lowers to Triton for an abstract H200 at OLMoE's prefill shapes."""
    s = jax.ShapeDtypeStruct
    m, t = 16384, 2048
    gate_up = lambda x, a, o, z, xr: arena_grouped_matmul_gpu(
        x, a, o, z, 2048, backend="gpu", x_rows=xr, swiglu=1024, out_dtype="bfloat16")
    down = lambda x, a, o, z, sc, d: arena_grouped_matmul_gpu(
        x, a, o, z, 2048, backend="gpu", row_scale=sc, out_rows=d)
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA H200", 132, "gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        for fn, args in (
            (gate_up, (s((t, 2048), jnp.bfloat16), s((1 << 20, 128), jnp.bfloat16),
                       s((64,), jnp.int32), s((64,), jnp.int32), s((m,), jnp.int32))),
            (down, (s((m, 1024), jnp.bfloat16), s((1 << 20, 128), jnp.bfloat16),
                    s((64,), jnp.int32), s((64,), jnp.int32), s((m,), jnp.float32),
                    s((m,), jnp.int32))),
        ):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert "xla.gpu.triton" in text
