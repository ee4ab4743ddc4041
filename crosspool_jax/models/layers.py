"""Small building blocks shared by every family: RMSNorm, rotary embeddings, matmuls, gated MLPs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.config import ModelConfig, RopeStyle


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., N] normalised in float32, scaled by weight [N]; returns x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * y.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x [..., I] @ w [I, O] (+ b [O]), accumulated in float32, returned in x's dtype."""
    y = jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def gated_mlp(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU MLP. x [N, D]; w_gate_up [D, 2I] (gate columns first); w_down [I, D]."""
    h = linear(x, w_gate_up)
    inter = w_down.shape[0]
    return linear(jax.nn.silu(h[..., :inter]) * h[..., inter:], w_down)


# ---- rotary embeddings -------------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rope_dim / 2] (float32) and the cos/sin scale (YaRN attention factor)."""
    r, dim = cfg.rope, cfg.rope_dim
    base = r.theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv_freq = 1.0 / pos_freqs
    if r.rope_type == "default":
        return inv_freq.astype(np.float32), 1.0
    if r.rope_type == "linear":
        return (inv_freq / r.factor).astype(np.float32), 1.0
    # YaRN, as in the reference implementation (HF `_compute_yarn_parameters`).
    factor = r.factor
    orig = r.original_max_position_embeddings or cfg.max_position_embeddings

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if r.attention_factor is not None:
        attention_factor = float(r.attention_factor)
    elif r.mscale and r.mscale_all_dim:
        attention_factor = get_mscale(factor, r.mscale) / get_mscale(factor, r.mscale_all_dim)
    else:
        attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv.astype(np.float32), float(attention_factor)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [...] int -> cos, sin [..., rope_dim / 2] float32 (already scaled by YaRN's factor)."""
    inv_freq, scale = rope_inv_freq(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(freqs) * scale, jnp.sin(freqs) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, style: RopeStyle) -> jax.Array:
    """x [B, T, H, d]; cos/sin [B, T, d/2]. Rotation in float32, result in x's dtype.

    HALF rotates pairs (i, i + d/2). INTERLEAVED_SPLIT rotates (2i, 2i+1) and writes [evens | odds]
    (DeepSeek-V3 rope_interleave). INTERLEAVED rotates (2i, 2i+1) in place (DeepSeek-V2).
    """
    xf = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if style == RopeStyle.HALF:
        h = x.shape[-1] // 2
        x1, x2 = xf[..., :h], xf[..., h:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        a, b = x1 * c - x2 * s, x2 * c + x1 * s
        if style == RopeStyle.INTERLEAVED_SPLIT:
            out = jnp.concatenate([a, b], axis=-1)
        else:
            out = jnp.stack([a, b], axis=-1).reshape(x.shape)
    return out.astype(x.dtype)
