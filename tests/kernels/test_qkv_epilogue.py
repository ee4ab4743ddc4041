"""`pallas_kernels.qkv_epilogue`: the Triton kernel (interpret mode) against its jnp reference, and
the reference against the engine's model math (`rms_norm`, `apply_rope`) written out by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.models.config import RopeStyle
from crosspool_jax.models.layers import apply_rope, rms_norm
from pallas_kernels.qkv_epilogue import kernel_supports, qkv_epilogue, qkv_epilogue_reference

H, K, D = 4, 2, 32


def _case(t: int, norm: str, groups: int, dtype, seed: int):
    ks = jax.random.split(jax.random.key(seed), 5)
    qkv = (2.0 * jax.random.normal(ks[0], (t, (H + 2 * K) * D))).astype(dtype)
    wq = {"full": H * D, "per_head": D}.get(norm)
    wk = {"full": K * D, "per_head": D}.get(norm)
    q_w = None if wq is None else (1 + 0.3 * jax.random.normal(ks[1], (groups, wq))).astype(dtype)
    k_w = None if wk is None else (1 + 0.3 * jax.random.normal(ks[2], (groups, wk))).astype(dtype)
    grp = jax.random.randint(ks[3], (t,), 0, groups, jnp.int32)
    pos = jax.random.randint(ks[4], (t,), 0, 5000, jnp.int32).astype(jnp.float32)
    freqs = pos[:, None] * (10000.0 ** (-jnp.arange(D // 2) / (D // 2)))[None]
    return qkv, q_w, k_w, grp, jnp.cos(freqs), jnp.sin(freqs)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("norm,groups,clip,t", [
    ("none", 1, None, 45), ("full", 1, None, 64), ("full", 3, 1.5, 33), ("per_head", 1, None, 1),
    ("per_head", 2, 2.5, 70), ("none", 1, 0.75, 31)])
def test_kernel_matches_reference(dtype, norm, groups, clip, t):
    qkv, q_w, k_w, grp, cos, sin = _case(t, norm, groups, dtype, seed=t)
    kw = dict(heads=H, kv_heads=K, head_dim=D, norm=norm, eps=1e-6, clip=clip)
    got = qkv_epilogue(qkv, q_w, k_w, grp, cos, sin, backend="interpret", **kw)
    want = qkv_epilogue(qkv, q_w, k_w, grp, cos, sin, backend="reference", **kw)
    for g, w, shape in zip(got, want, [(t, H, D), (t, K, D), (t, K, D)], strict=True):
        assert g.shape == shape and g.dtype == dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if dtype == jnp.float32:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        else:  # sums of squares in another order may move a value by one bf16 step
            np.testing.assert_allclose(g, w, rtol=2 ** -7, atol=2 ** -7)
            assert np.mean(g == w) > 0.97
    if clip is not None:
        assert float(jnp.max(jnp.abs(got[2].astype(jnp.float32)))) <= clip


def test_reference_is_the_model_math_by_hand():
    """Full norm, clip, rotary with the model layers' own functions (the engine's old path)."""
    t = 9
    qkv, q_w, k_w, grp, cos, sin = _case(t, "full", 1, jnp.bfloat16, seed=3)
    q, k, v = qkv_epilogue_reference(qkv, q_w, k_w, grp, cos, sin, heads=H, kv_heads=K, head_dim=D,
                                     norm="full", eps=1e-5, clip=1.0)
    q0 = jnp.clip(rms_norm(qkv[:, :H * D], q_w[0], 1e-5), -1.0, 1.0).reshape(t, H, D)
    want = apply_rope(q0[None], cos[None], sin[None], RopeStyle.HALF)[0]
    np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(want, np.float32))
    v0 = jnp.clip(qkv[:, (H + K) * D:], -1.0, 1.0).reshape(t, K, D)
    np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(v0, np.float32))
    assert k.shape == (t, K, D)


def test_rotary_of_position_zero_is_identity_and_norm_unit_rms():
    """Hand-checked: cos 1 / sin 0 leaves the rows; a per-head norm with weight 1 gives rms 1."""
    t = 5
    qkv = jnp.arange(t * (H + 2 * K) * D, dtype=jnp.float32).reshape(t, -1) % 7 - 3.0
    ones = jnp.ones((1, D), jnp.float32)
    cos, sin = jnp.ones((t, D // 2)), jnp.zeros((t, D // 2))
    q, _, v = qkv_epilogue(qkv, ones, ones, jnp.zeros((t,), jnp.int32), cos, sin, heads=H, kv_heads=K,
                           head_dim=D, norm="per_head", eps=0.0, backend="interpret")
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(q) ** 2, axis=-1)), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(qkv[:, (H + K) * D:]).reshape(t, K, D))


def test_bad_arguments_are_refused():
    qkv, q_w, k_w, grp, cos, sin = _case(4, "full", 1, jnp.float32, seed=0)
    kw = dict(heads=H, kv_heads=K, head_dim=D, eps=1e-6, backend="interpret")
    with pytest.raises(ValueError, match="norm"):
        qkv_epilogue(qkv, q_w, k_w, grp, cos, sin, norm="layer", **kw)
    with pytest.raises(ValueError, match="absent"):
        qkv_epilogue(qkv, q_w, k_w, grp, cos, sin, norm="none", **kw)
    with pytest.raises(ValueError, match=r"\(H \+ 2K\)"):
        qkv_epilogue(qkv[:, 1:], q_w, k_w, grp, cos, sin, norm="full", **kw)
    assert kernel_supports(128) and kernel_supports(16) and not kernel_supports(24)
    assert not kernel_supports(7)


@pytest.mark.parametrize("heads,kv_heads,norm,d", [(16, 16, "full", 128), (32, 4, "per_head", 128),
                                                  (8, 2, "none", 128), (4, 2, "per_head", 16)])
def test_kernel_lowers_for_an_h200(heads, kv_heads, norm, d):
    """The Triton lowering (Pallas -> Triton IR) at OLMoE / Qwen3-MoE / plain / demo shapes."""
    from jax._src.mesh import AbstractDevice, AbstractMesh

    t = 4096
    s = jax.ShapeDtypeStruct
    wq = {"full": heads * d, "per_head": d}.get(norm)
    wk = {"full": kv_heads * d, "per_head": d}.get(norm)
    args = (s((t, (heads + 2 * kv_heads) * d), jnp.bfloat16),
            None if wq is None else s((2, wq), jnp.bfloat16),
            None if wk is None else s((2, wk), jnp.bfloat16),
            s((t,), jnp.int32), s((t, d // 2), jnp.float32), s((t, d // 2), jnp.float32))

    def fn(qkv, q_w, k_w, grp, cos, sin):
        return qkv_epilogue(qkv, q_w, k_w, grp, cos, sin, heads=heads, kv_heads=kv_heads, head_dim=d,
                            norm=norm, eps=1e-6, clip=8.0, backend="gpu")

    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice("NVIDIA H200", 132, "gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and "qkv_epilogue" in text
