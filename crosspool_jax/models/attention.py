"""The attention side of a layer for the single-model reference path (contiguous KV cache, plain jnp).

This is the oracle: the pooled engine's paged kernels (pallas_kernels/) are checked against it.
Cache slot s holds the token at position s, so a causal mask over slots is also the length mask.

Cache layouts, per layer (the model's cache stacks them on a leading layer axis):
    GQA: k [B, S, K, Dh], v [B, S, K, Dh]
    MLA: latent [B, S, kv_lora_rank] (after kv_a_layernorm), k_rope [B, S, rope_dim] (after rotary)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from crosspool_jax.models.config import AttentionKind, ModelConfig, QKNorm
from crosspool_jax.models.layers import apply_rope, linear, rms_norm, rope_cos_sin

Cache = dict[str, jax.Array]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any) -> Cache:
    """Zeroed contiguous cache for `batch` sequences of up to `max_len` tokens, all layers."""
    L = cfg.num_layers
    if cfg.attention == AttentionKind.MLA:
        return {
            "latent": jnp.zeros((L, batch, max_len, cfg.kv_lora_rank), dtype),
            "k_rope": jnp.zeros((L, batch, max_len, cfg.qk_rope_head_dim), dtype),
        }
    shape = (L, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _write(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """cache [B, S, ...] <- new [B, T, ...] at slots positions [B, T] (out-of-range slots dropped)."""
    b = jnp.arange(cache.shape[0])[:, None]
    return cache.at[b, positions].set(new.astype(cache.dtype), mode="drop")


def _mask(positions: jax.Array, num_slots: int, window: int) -> jax.Array:
    """[B, T, S] bool: slot s visible from the query at positions[b, t]."""
    slots = jnp.arange(num_slots)[None, None, :]
    p = positions[:, :, None]
    visible = slots <= p
    if window:
        visible &= p - slots < window
    return visible


def _softmax_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """q [B, T, H, d]; k [B, S, H or K, d]; v [B, S, H or K, dv]; mask [B, T, S] -> [B, T, H, dv] f32."""
    h, kv = q.shape[2], k.shape[2]
    qg = q.astype(jnp.float32).reshape(*q.shape[:2], kv, h // kv, q.shape[-1])
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * scale
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32))
    return o.reshape(*q.shape[:2], h, v.shape[-1])


def gqa_qkv(cfg: ModelConfig, lw: dict[str, jax.Array], x: jax.Array, positions: jax.Array):
    """Projections, q/k norms, clipping and rotary. x [B, T, D] (input-normed).

    Returns q [B, T, H, Dh], k [B, T, K, Dh], v [B, T, K, Dh] in x's dtype.
    """
    B, T, _ = x.shape
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(x, lw["wq"], lw.get("bq"))
    k = linear(x, lw["wk"], lw.get("bk"))
    v = linear(x, lw["wv"], lw.get("bv"))
    if cfg.qk_norm == QKNorm.FULL:
        q = rms_norm(q, lw["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lw["k_norm"], cfg.rms_norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
    q, k, v = q.reshape(B, T, H, Dh), k.reshape(B, T, K, Dh), v.reshape(B, T, K, Dh)
    if cfg.qk_norm == QKNorm.PER_HEAD:
        q = rms_norm(q, lw["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lw["k_norm"], cfg.rms_norm_eps)
    cos, sin = rope_cos_sin(cfg, positions)
    return apply_rope(q, cos, sin, cfg.rope_style), apply_rope(k, cos, sin, cfg.rope_style), v


def mla_q(cfg: ModelConfig, lw: dict[str, jax.Array], x: jax.Array, cos: jax.Array, sin: jax.Array):
    """MLA queries. x [B, T, D] -> q_nope [B, T, H, n], q_rope [B, T, H, r] (rotated)."""
    B, T, _ = x.shape
    if "wq_a" in lw:
        qa = rms_norm(linear(x, lw["wq_a"], lw.get("bq_a")), lw["q_a_norm"], cfg.rms_norm_eps)
        q = linear(qa, lw["wq_b"])
    else:
        q = linear(x, lw["wq"])
    q = q.reshape(B, T, cfg.num_heads, cfg.head_dim)
    n = cfg.qk_nope_head_dim
    return q[..., :n], apply_rope(q[..., n:], cos, sin, cfg.rope_style)


def mla_latent(cfg: ModelConfig, lw: dict[str, jax.Array], x: jax.Array, cos: jax.Array, sin: jax.Array):
    """MLA cache entries. x [B, T, D] -> latent [B, T, Rkv] (normed), k_rope [B, T, r] (rotated)."""
    ckv = linear(x, lw["wkv_a"], lw.get("bkv_a"))
    R = cfg.kv_lora_rank
    latent = rms_norm(ckv[..., :R], lw["kv_a_norm"], cfg.rms_norm_eps)
    k_rope = apply_rope(ckv[..., None, R:], cos, sin, cfg.rope_style)[:, :, 0]
    return latent, k_rope


def attention_layer(
    cfg: ModelConfig, lw: dict[str, jax.Array], layer: int, x: jax.Array, positions: jax.Array, cache: Cache
) -> tuple[jax.Array, Cache]:
    """Self-attention of one layer over the contiguous cache.

    lw: this layer's slice of the A-side `layers` stack; x [B, T, D] (already input-normed);
    positions [B, T] int32; cache: this layer's entries ([B, S, ...]). Returns the attention output
    projected back to [B, T, D] (before the residual) and the updated cache.
    """
    B, T, _ = x.shape
    window = cfg.sliding_windows[layer]
    if cfg.attention == AttentionKind.GQA:
        q, k, v = gqa_qkv(cfg, lw, x, positions)
        cache = {"k": _write(cache["k"], k, positions), "v": _write(cache["v"], v, positions)}
        mask = _mask(positions, cache["k"].shape[1], window)
        o = _softmax_attend(q, cache["k"], cache["v"], mask, cfg.softmax_scale)
    else:
        cos, sin = rope_cos_sin(cfg, positions)
        q_nope, q_rope = mla_q(cfg, lw, x, cos, sin)
        latent, k_rope = mla_latent(cfg, lw, x, cos, sin)
        cache = {
            "latent": _write(cache["latent"], latent, positions),
            "k_rope": _write(cache["k_rope"], k_rope, positions),
        }
        S, H, n = cache["latent"].shape[1], cfg.num_heads, cfg.qk_nope_head_dim
        kv = linear(cache["latent"], lw["wkv_b"]).reshape(B, S, H, n + cfg.v_head_dim)
        k_full = jnp.concatenate(
            [kv[..., :n], jnp.broadcast_to(cache["k_rope"][:, :, None, :], (B, S, H, cfg.qk_rope_head_dim))],
            -1,
        )
        q_full = jnp.concatenate([q_nope, q_rope], -1)
        mask = _mask(positions, S, window)
        o = _softmax_attend(q_full, k_full, kv[..., n:], mask, cfg.softmax_scale)
    o = o.astype(x.dtype).reshape(B, T, cfg.num_heads * cfg.v_dim)
    return linear(o, lw["wo"], lw.get("bo")), cache
