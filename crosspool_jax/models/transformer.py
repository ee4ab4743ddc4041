"""A whole decoder forward pass for the reference path: embed -> layers (A-side, then F-side) -> LM head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from crosspool_jax.models.attention import Cache, attention_layer
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.layers import rms_norm
from crosspool_jax.models.moe import ffn_layer
from crosspool_jax.models.params import ModelWeights


def embed(attn: dict, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] int32 -> [B, T, D] in the embedding's dtype."""
    return attn["embed"][tokens]


def lm_head(cfg: ModelConfig, attn: dict, x: jax.Array) -> jax.Array:
    """x [..., D] (un-normed last hidden state) -> logits [..., V] float32."""
    h = rms_norm(x, attn["final_norm"], cfg.rms_norm_eps)
    w = attn["embed"].T if cfg.tie_word_embeddings else attn["lm_head"]
    return jnp.einsum("...d,dv->...v", h.astype(w.dtype), w, preferred_element_type=jnp.float32)


def attention_side(
    cfg: ModelConfig, attn: dict, layer: int, x: jax.Array, positions: jax.Array, cache: Cache
) -> tuple[jax.Array, jax.Array, Cache]:
    """A-side of one layer. x [B, T, D] residual stream in.

    Returns (residual after attention [B, T, D], FFN input = post-attention-normed residual, cache).
    Only the FFN input crosses to the weights pool; the residual stays with the KV.
    """
    lw = jax.tree.map(lambda a: a[layer], attn["layers"])
    h_in = rms_norm(x, lw["input_norm"], cfg.rms_norm_eps)
    a, cache = attention_layer(cfg, lw, layer, h_in, positions, cache)
    h = x + a
    return h, rms_norm(h, lw["post_attn_norm"], cfg.rms_norm_eps), cache


def forward(
    cfg: ModelConfig, weights: ModelWeights, tokens: jax.Array, positions: jax.Array, cache: Cache
) -> tuple[jax.Array, Cache]:
    """tokens, positions [B, T] int32; cache stacked per layer ([L, B, S, ...]).

    Returns logits [B, T, V] float32 and the updated cache.
    """
    x = embed(weights.attn, tokens)
    B, T, D = x.shape
    new_cache: dict[str, list[jax.Array]] = {k: [] for k in cache}
    for layer in range(cfg.num_layers):
        h, f_in, layer_cache = attention_side(
            cfg, weights.attn, layer, x, positions, {k: v[layer] for k, v in cache.items()}
        )
        for k, v in layer_cache.items():
            new_cache[k].append(v)
        x = h + ffn_layer(cfg, weights.ffn, layer, f_in.reshape(B * T, D)).reshape(B, T, D)
    return lm_head(cfg, weights.attn, x), {k: jnp.stack(v) for k, v in new_cache.items()}
