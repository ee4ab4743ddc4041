"""The GQA attention's q/k/v epilogue: q/k RMS norms, clipping and rotary, in one pass over qkv.

After the fused qkv projection ``qkv [T, (H + 2K) * D]`` the attention wants

    q, k, v = split(qkv)
    q, k = norm_full(q), norm_full(k)          # QKNorm.FULL (OLMoE): over all H * D / K * D
    q, k, v = clip(q), clip(k), clip(v)         # clip_qkv (OLMoE variants)
    q, k = norm_per_head(q), norm_per_head(k)  # QKNorm.PER_HEAD (Qwen3): over each head's D
    q, k = rope(q), rope(k)                     # RopeStyle.HALF

each step rounded to the model's dtype as the reference model does. As XLA ops that is a slice
copy, a reduction and an elementwise fusion per norm and a concatenate per rotary: several passes
over a prefill chunk's [T, (H + 2K) * D] rows (the element-wise tail of the prefill step,
docs/benchmarks.md). The GPU kernel (Pallas, Triton lowering) reads each row block once (a full
norm's sum of squares reads it twice, the second time from L2) and writes q, k and v once.

Public API: `qkv_epilogue` (backend "gpu", "interpret" or "reference"); `qkv_epilogue_reference`
(plain jnp, the engine's path off GPU and the kernel's test reference); `kernel_supports`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import gpu_compiler_params, interpret_flag

NORMS = ("none", "full", "per_head")
BLOCK_T = 32  # rows per program


def _rms(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """rms_norm over the last axis in f32, weight w (broadcast), rounded as the reference's."""
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def _rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, heads, D]; cos / sin [T, D / 2]: pairs (i, i + D / 2) rotated in f32."""
    xf = x.astype(jnp.float32)
    h = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = xf[..., :h], xf[..., h:]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def qkv_epilogue_reference(qkv: jax.Array, q_w: jax.Array | None, k_w: jax.Array | None,
                           grp: jax.Array, cos: jax.Array, sin: jax.Array, *, heads: int,
                           kv_heads: int, head_dim: int, norm: str, eps: float,
                           clip: float | None, rotary: Callable[[jax.Array], jax.Array] | None = None
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Plain jnp `qkv_epilogue` (same arguments, no backend). rotary: x [T, heads, D] -> the
    same rotated (None: the HALF style from cos / sin; the engine passes its other styles)."""
    t, d = qkv.shape[0], head_dim
    q, k, v = qkv[:, :heads * d], qkv[:, heads * d:(heads + kv_heads) * d], qkv[:, (heads + kv_heads) * d:]

    def weight(w: jax.Array) -> jax.Array:  # [G, W] -> the rows' [T, W] (one model: [W])
        return w[0] if w.shape[0] == 1 else jnp.take(w, grp, axis=0)

    if norm == "full":
        q, k = _rms(q, weight(q_w), eps), _rms(k, weight(k_w), eps)
    if clip is not None:
        q, k, v = (jnp.clip(a, -clip, clip) for a in (q, k, v))
    q, k, v = q.reshape(t, heads, d), k.reshape(t, kv_heads, d), v.reshape(t, kv_heads, d)
    if norm == "per_head":
        wq, wk = weight(q_w), weight(k_w)
        if wq.ndim == 2:  # per row: [T, 1, D] against the heads
            wq, wk = wq[:, None], wk[:, None]
        q, k = _rms(q, wq, eps), _rms(k, wk, eps)
    rotary = rotary or functools.partial(_rope_half, cos=cos, sin=sin)
    return rotary(q), rotary(k), v


def kernel_supports(head_dim: int) -> bool:
    """The GPU kernel's shape rule: D / 2 a power of two (Triton tiles are powers of two)."""
    h = head_dim // 2
    return head_dim % 2 == 0 and h >= 1 and h & (h - 1) == 0


def _kernel(grp_ref, cos_ref, sin_ref, qkv_ref, *refs, heads: int, kv_heads: int, d: int,
            norm: str, eps: float, clip: float | None, t: int, has_w: bool):
    """Rows [i * BLOCK_T, (i + 1) * BLOCK_T) of qkv; refs: (q_w, k_w)? then the q, k, v outputs.
    Rows past T re-read row T - 1; their stores are masked off and aimed past the outputs (the
    Pallas interpreter writes masked lanes back as read, then drops them there instead of
    racing row T - 1's real store)."""
    if has_w:
        qw_ref, kw_ref, q_ref, k_ref, v_ref = refs
    else:
        qw_ref = kw_ref = None
        q_ref, k_ref, v_ref = refs
    i = pl.program_id(0)
    rows = i * BLOCK_T + lax.broadcasted_iota(jnp.int32, (BLOCK_T, 1), 0)
    tok = jnp.minimum(rows, t - 1)
    live = rows < t
    h2 = d // 2
    half = lax.broadcasted_iota(jnp.int32, (1, h2), 1)
    full = lax.broadcasted_iota(jnp.int32, (1, d), 1)
    dt = qkv_ref.dtype
    g = pltriton.load(grp_ref.at[tok]) if has_w else None  # [BLOCK_T, 1] model of each row
    cos = pltriton.load(cos_ref.at[tok, half])
    sin = pltriton.load(sin_ref.at[tok, half])

    def load(col0: int, cols: jax.Array) -> jax.Array:
        return pltriton.load(qkv_ref.at[tok, col0 + cols]).astype(jnp.float32)

    def weight(w_ref, w_col0: int) -> jax.Array:
        """[BLOCK_T, D / 2] f32: each row's model's norm weights from column w_col0."""
        return pltriton.load(w_ref.at[g, w_col0 + half]).astype(jnp.float32)

    def rms(x: jax.Array, inv: jax.Array, w: jax.Array) -> jax.Array:
        """x (dt values in f32) * inv, rounded to dt, times the weights w, rounded to dt."""
        y = (x * inv).astype(dt).astype(jnp.float32)
        return (w * y).astype(dt).astype(jnp.float32)

    def clipped(x: jax.Array) -> jax.Array:
        return x if clip is None else jnp.clip(x, -clip, clip)

    def inv_rms(ss: jax.Array, n: int) -> jax.Array:
        return lax.rsqrt(ss / n + eps)

    def rotary(col0: int, nheads: int, w_ref, out_ref) -> None:
        inv_all = None
        if norm == "full":  # first pass: the row's sum of squares over all its heads
            ss = jnp.zeros((BLOCK_T, 1), jnp.float32)
            for h in range(nheads):
                for p in range(2):
                    x = load(col0 + h * d + p * h2, half)
                    ss = ss + jnp.sum(x * x, axis=1, keepdims=True)
            inv_all = inv_rms(ss, nheads * d)
        if norm == "per_head":  # one [D] weight for every head: loaded once
            w1, w2 = weight(w_ref, 0), weight(w_ref, h2)
        for h in range(nheads):
            x1, x2 = load(col0 + h * d, half), load(col0 + h * d + h2, half)
            if norm == "full":
                x1 = rms(x1, inv_all, weight(w_ref, h * d))
                x2 = rms(x2, inv_all, weight(w_ref, h * d + h2))
            x1, x2 = clipped(x1), clipped(x2)
            if norm == "per_head":
                ss = jnp.sum(x1 * x1, axis=1, keepdims=True) + jnp.sum(x2 * x2, axis=1, keepdims=True)
                inv = inv_rms(ss, d)
                x1, x2 = rms(x1, inv, w1), rms(x2, inv, w2)
            o1 = (x1 * cos - x2 * sin).astype(out_ref.dtype)
            o2 = (x2 * cos + x1 * sin).astype(out_ref.dtype)
            pltriton.store(out_ref.at[rows, h * d + half], o1, mask=live)
            pltriton.store(out_ref.at[rows, h * d + h2 + half], o2, mask=live)

    rotary(0, heads, qw_ref, q_ref)
    rotary(heads * d, kv_heads, kw_ref, k_ref)
    for h in range(kv_heads):
        x = clipped(load((heads + kv_heads) * d + h * d, full))
        pltriton.store(v_ref.at[rows, h * d + full], x.astype(v_ref.dtype), mask=live)


@functools.partial(jax.jit, static_argnames=("heads", "kv_heads", "head_dim", "norm", "eps", "clip",
                                             "backend"))
def qkv_epilogue(qkv: jax.Array, q_w: jax.Array | None, k_w: jax.Array | None, grp: jax.Array,
                 cos: jax.Array, sin: jax.Array, *, heads: int, kv_heads: int, head_dim: int,
                 norm: str, eps: float, clip: float | None = None, backend: str = "gpu"
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [T, H, D], k [T, K, D], v [T, K, D] in qkv's dtype from the projection's output.

    qkv: [T, (H + 2K) * D] (the model's dtype); q_w / k_w: [G, H * D] / [G, K * D] for
    norm="full", [G, D] each for "per_head", None for "none"; grp [T] int32: each row's model
    (the weights' row; G = 1: all 0); cos / sin: [T, D / 2] f32 (`rope_cos_sin`, HALF style);
    eps: the norm's epsilon; clip: clip_qkv (applied after a full norm, before a per-head one, as
    the reference model). backend: "gpu" (Triton), "interpret" (the same kernel on CPU) or
    "reference" (`qkv_epilogue_reference`). The kernel needs `kernel_supports(head_dim)`.
    """
    if norm not in NORMS:
        raise ValueError(f"norm {norm!r}: expected one of {NORMS}")
    t, width = qkv.shape
    if width != (heads + 2 * kv_heads) * head_dim:
        raise ValueError(f"qkv {qkv.shape} is not [T, (H + 2K) * D] for H={heads}, K={kv_heads}, "
                         f"D={head_dim}")
    if (norm == "none") != (q_w is None or k_w is None):
        raise ValueError(f"norm {norm!r} wants q_w and k_w {'absent' if norm == 'none' else 'given'}")
    kw = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, norm=norm, eps=eps)
    if clip is not None:  # the reference clips dt values at the bound rounded to dt
        clip = float(np.asarray(clip, qkv.dtype).astype(np.float32))
    if backend == "reference" or t == 0:
        return qkv_epilogue_reference(qkv, q_w, k_w, grp, cos, sin, clip=clip, **kw)
    if backend not in ("gpu", "interpret"):
        raise ValueError(f"backend {backend!r}: expected 'gpu', 'interpret' or 'reference'")
    if not kernel_supports(head_dim):
        raise ValueError(f"head_dim {head_dim}: the kernel wants D / 2 a power of two")
    has_w = norm != "none"
    ins = [grp.astype(jnp.int32), cos.astype(jnp.float32), sin.astype(jnp.float32), qkv]
    if has_w:
        ins += [q_w, k_w]
    d, dt = head_dim, qkv.dtype
    out = pl.pallas_call(
        functools.partial(_kernel, heads=heads, kv_heads=kv_heads, d=d, norm=norm, eps=eps,
                          clip=clip, t=t, has_w=has_w),
        grid=(-(-t // BLOCK_T),),
        out_shape=(jax.ShapeDtypeStruct((t, heads * d), dt),
                   jax.ShapeDtypeStruct((t, kv_heads * d), dt),
                   jax.ShapeDtypeStruct((t, kv_heads * d), dt)),
        interpret=interpret_flag(backend),
        compiler_params=gpu_compiler_params(4, 1) if backend == "gpu" else None,
        name="qkv_epilogue",
    )(*ins)
    q, k, v = out
    return q.reshape(t, heads, d), k.reshape(t, kv_heads, d), v.reshape(t, kv_heads, d)


__all__ = ["NORMS", "kernel_supports", "qkv_epilogue", "qkv_epilogue_reference"]
