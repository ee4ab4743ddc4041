"""The FFN side of a layer: routers, routed experts as permute -> grouped matmul -> unpermute, shared
experts and dense MLPs. These functions are what the weights pool runs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from crosspool_jax.models.config import FFNKind, ModelConfig, RouterKind
from crosspool_jax.models.layers import gated_mlp, linear


def route(cfg: ModelConfig, router_w: jax.Array, router_bias: jax.Array | None, x: jax.Array):
    """Chooses experts. x [N, D]; router_w [D, E]; router_bias [E] f32 or None.

    Returns (weights [N, k] float32, experts [N, k] int32).
    """
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), router_w.astype(jnp.float32))
    return route_logits(cfg, logits, router_bias)


def route_logits(cfg: ModelConfig, logits: jax.Array, router_bias: jax.Array | None):
    """`route` from the router logits [N, E] f32; router_bias [E] or per row [N, E] (f32) or None."""
    k, E = cfg.top_k, cfg.num_experts
    if cfg.router == RouterKind.SIGMOID_GROUPED:
        scores = jax.nn.sigmoid(logits)
        choice = scores + router_bias.astype(jnp.float32) if router_bias is not None else scores
        grouped = choice.reshape(-1, cfg.n_group, E // cfg.n_group)
        group_scores = jax.lax.top_k(grouped, min(2, E // cfg.n_group))[0].sum(-1)
        choice = _mask_groups(choice, group_scores, cfg, fill=-jnp.inf)
        _, experts = jax.lax.top_k(choice, k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
        if cfg.router == RouterKind.SOFTMAX_GROUP_LIMITED:
            group_scores = scores.reshape(-1, cfg.n_group, E // cfg.n_group).max(-1)
            scores = _mask_groups(scores, group_scores, cfg, fill=0.0)
        weights, experts = jax.lax.top_k(scores, k)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdims=True)
    return weights * cfg.routed_scaling_factor, experts.astype(jnp.int32)


def _mask_groups(scores: jax.Array, group_scores: jax.Array, cfg: ModelConfig, fill: float) -> jax.Array:
    """Keeps the experts of the topk_group best groups. scores [N, E]; group_scores [N, G]."""
    _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)
    keep_group = (
        jnp.zeros_like(group_scores, dtype=bool)
        .at[jnp.arange(group_scores.shape[0])[:, None], top_groups]
        .set(True)
    )
    keep = jnp.repeat(keep_group, cfg.num_experts // cfg.n_group, axis=-1)
    return jnp.where(keep, scores, fill)


def routed_experts(
    x: jax.Array, weights: jax.Array, experts: jax.Array, w_gate_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """Permute -> grouped matmul -> unpermute.

    x [N, D]; weights/experts [N, k]; w_gate_up [E, D, 2I]; w_down [E, I, D]. Returns [N, D] in x's
    dtype. Tokens are sorted by expert so each expert's rows are contiguous; `ragged_dot` skips
    nothing on CPU but touches each expert's weights once.
    """
    k = experts.shape[1]
    num_experts, inter = w_gate_up.shape[0], w_down.shape[1]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token_of = order // k
    group_sizes = group_counts(flat, num_experts)
    xs = x[token_of].astype(w_gate_up.dtype)
    h = jax.lax.ragged_dot(xs, w_gate_up, group_sizes, preferred_element_type=jnp.float32)
    a = (jax.nn.silu(h[:, :inter]) * h[:, inter:]).astype(w_down.dtype)
    o = jax.lax.ragged_dot(a, w_down, group_sizes, preferred_element_type=jnp.float32)
    # each scaled row rounded to the model's dtype, then the k rows summed in f32 (what the
    # engine's fused down product stores and sums)
    o = (o * weights.reshape(-1)[order][:, None]).astype(x.dtype).astype(jnp.float32)
    return unpermute_sum(o, order, k).astype(x.dtype)


def group_counts(keys: jax.Array, n: int) -> jax.Array:
    """[n] int32: how many of keys [M] (int) equal each of 0..n-1 (others are not counted).

    A compare-and-sum (one reduction over [M, n]) instead of `jnp.bincount`: XLA's GPU bincount
    is a scatter-add whose M atomic adds all land on n counters."""
    return (keys[:, None] == jnp.arange(n, dtype=keys.dtype)[None]).sum(0, dtype=jnp.int32)


def unpermute_sum(rows: jax.Array, order: jax.Array, k: int) -> jax.Array:
    """[N * k, D] rows in `order` (a permutation of the (token, choice) entries, token-major) -> [N, D]:
    each token's k rows summed in choice order.

    A gather plus a fixed-order sum rather than a scatter-add into the tokens: XLA's GPU scatter-add
    uses atomics, so its sums (and greedy tokens after them) changed from run to run on the same
    inputs (docs/benchmarks.md, 2026-11-29)."""
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return rows[inverse].reshape(-1, k, rows.shape[-1]).sum(axis=1)


def moe_ffn(cfg: ModelConfig, moe: dict[str, Any], x: jax.Array) -> jax.Array:
    """One MoE layer's FFN. `moe` holds that layer's slices of the F-side `moe` stack. x [N, D]."""
    weights, experts = route(cfg, moe["router"], moe.get("router_bias"), x)
    out = routed_experts(x, weights, experts, moe["w_gate_up"], moe["w_down"])
    if "shared_gate_up" in moe:
        shared = gated_mlp(x, moe["shared_gate_up"], moe["shared_down"])
        if "shared_gate" in moe:
            gate = jax.nn.sigmoid(linear(x, moe["shared_gate"]).astype(jnp.float32))
            shared = (gate * shared.astype(jnp.float32)).astype(x.dtype)
        out = out + shared
    return out


def ffn_layer(cfg: ModelConfig, ffn: dict[str, Any], layer: int, x: jax.Array) -> jax.Array:
    """The FFN of `layer` (static int) on x [N, D] (the post-attention-normed hidden states)."""
    idx = cfg.ffn_stack_index[layer]
    if cfg.ffn_kinds[layer] == FFNKind.DENSE:
        d = ffn["dense"]
        return gated_mlp(x, d["w_gate_up"][idx], d["w_down"][idx])
    return moe_ffn(cfg, jax.tree.map(lambda a: a[idx], ffn["moe"]), x)
