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
