"""Parameter layout of a model, split into the attention side (A-side) and the FFN side (F-side).

The split follows docs/design.md: the A-side runs where the KV cache lives (KV pool), the F-side runs
in the weights pool. Both are plain nested dicts of arrays (pytrees); matrices are stored in
`x @ W` orientation, `[in, out]`, and per-layer tensors are stacked on a leading layer axis.

A-side (`attn`), L = num_layers, D = hidden, H = heads, K = kv heads, Dh = head_dim:
    embed        [V, D]
    final_norm   [D]
    lm_head      [D, V]                 absent when tie_word_embeddings (embed.T is used)
    layers/
      input_norm     [L, D]
      post_attn_norm [L, D]
      GQA:  wq [L, D, H*Dh]  wk [L, D, K*Dh]  wv [L, D, K*Dh]  wo [L, H*Dh, D]
            bq/bk/bv [L, H*Dh | K*Dh] (qkv_bias)   bo [L, D] (o_bias)
            q_norm [L, Dh] k_norm [L, Dh] (PER_HEAD) or q_norm [L, H*Dh] k_norm [L, K*Dh] (FULL)
      MLA:  wq [L, D, H*(n+r)]  or  wq_a [L, D, Rq], q_a_norm [L, Rq], wq_b [L, Rq, H*(n+r)]
            wkv_a [L, D, Rkv+r]  kv_a_norm [L, Rkv]  wkv_b [L, Rkv, H*(n+v)]  wo [L, H*v, D]
            bq_a [L, Rq], bkv_a [L, Rkv+r], bo [L, D] (attention_bias)
            (n = qk_nope_head_dim, r = qk_rope_head_dim, v = v_head_dim)

F-side (`ffn`), Ld = dense layers, Lm = MoE layers, E = experts:
    dense/  w_gate_up [Ld, D, 2*Id]   w_down [Ld, Id, D]          (gate columns first, then up)
    moe/    router [Lm, D, E]   router_bias [Lm, E] (DeepSeek-V3 e_score_correction_bias)
            w_gate_up [Lm, E, D, 2*Im]   w_down [Lm, E, Im, D]
            shared_gate_up [Lm, D, 2*Is]  shared_down [Lm, Is, D]  shared_gate [Lm, D, 1] (Qwen2-MoE)

Layer i's FFN is `dense` or `moe` by `cfg.ffn_kinds[i]`, at stack index `cfg.ffn_stack_index[i]`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.config import AttentionKind, ModelConfig, QKNorm

Tree = dict[str, Any]


class ModelWeights(NamedTuple):
    """A model's weights as two pytrees: `attn` (KV-pool side) and `ffn` (weights-pool side)."""

    attn: Tree
    ffn: Tree


def attn_shapes(cfg: ModelConfig) -> Tree:
    """Shape tuples of the A-side tree (see module docstring)."""
    L, D, H, K, V = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size
    layers: Tree = {"input_norm": (L, D), "post_attn_norm": (L, D)}
    if cfg.attention == AttentionKind.GQA:
        Dh = cfg.head_dim
        layers |= {"wq": (L, D, H * Dh), "wk": (L, D, K * Dh), "wv": (L, D, K * Dh), "wo": (L, H * Dh, D)}
        if cfg.qkv_bias:
            layers |= {"bq": (L, H * Dh), "bk": (L, K * Dh), "bv": (L, K * Dh)}
        if cfg.qk_norm == QKNorm.PER_HEAD:
            layers |= {"q_norm": (L, Dh), "k_norm": (L, Dh)}
        elif cfg.qk_norm == QKNorm.FULL:
            layers |= {"q_norm": (L, H * Dh), "k_norm": (L, K * Dh)}
    else:
        n, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank:
            Rq = cfg.q_lora_rank
            layers |= {"wq_a": (L, D, Rq), "q_a_norm": (L, Rq), "wq_b": (L, Rq, H * (n + r))}
            if cfg.qkv_bias:
                layers["bq_a"] = (L, Rq)
        else:
            layers["wq"] = (L, D, H * (n + r))
        Rkv = cfg.kv_lora_rank
        layers |= {"wkv_a": (L, D, Rkv + r), "kv_a_norm": (L, Rkv), "wkv_b": (L, Rkv, H * (n + v))}
        layers["wo"] = (L, H * v, D)
        if cfg.qkv_bias:
            layers["bkv_a"] = (L, Rkv + r)
    if cfg.o_bias:
        layers["bo"] = (L, D)
    tree: Tree = {"embed": (V, D), "final_norm": (D,), "layers": layers}
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = (D, V)
    return tree


def ffn_shapes(cfg: ModelConfig) -> Tree:
    """Shape tuples of the F-side tree (see module docstring)."""
    D = cfg.hidden_size
    tree: Tree = {}
    if cfg.dense_layers:
        Ld, Id = len(cfg.dense_layers), cfg.dense_intermediate_size
        tree["dense"] = {"w_gate_up": (Ld, D, 2 * Id), "w_down": (Ld, Id, D)}
    if cfg.moe_layers:
        Lm, E, Im = len(cfg.moe_layers), cfg.num_experts, cfg.moe_intermediate_size
        moe: Tree = {"router": (Lm, D, E), "w_gate_up": (Lm, E, D, 2 * Im), "w_down": (Lm, E, Im, D)}
        if cfg.router_bias:
            moe["router_bias"] = (Lm, E)
        if cfg.shared_intermediate_size:
            Is = cfg.shared_intermediate_size
            moe |= {"shared_gate_up": (Lm, D, 2 * Is), "shared_down": (Lm, Is, D)}
            if cfg.shared_expert_gate:
                moe["shared_gate"] = (Lm, D, 1)
        tree["moe"] = moe
    return tree


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_dtype(path: str, dtype: Any) -> Any:
    """Router correction biases stay float32 (they are added to float32 scores); the rest use `dtype`."""
    return jnp.float32 if path.endswith("router_bias") else dtype


def weight_specs(cfg: ModelConfig, dtype: Any = None) -> ModelWeights:
    """ShapeDtypeStructs of both trees; dtype defaults to the checkpoint's (cfg.dtype)."""
    dtype = jnp.dtype(dtype or cfg.dtype)

    def conv(tree: Tree, prefix: str) -> Tree:
        return {
            k: jax.ShapeDtypeStruct(v, param_dtype(f"{prefix}/{k}", dtype))
            if _is_shape(v)
            else conv(v, f"{prefix}/{k}")
            for k, v in tree.items()
        }

    return ModelWeights(conv(attn_shapes(cfg), "attn"), conv(ffn_shapes(cfg), "ffn"))


def flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
    """{'a/b/c': leaf} view of a nested dict."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out |= flatten(v, key)
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> Tree:
    out: Tree = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def init_random_weights(
    cfg: ModelConfig, seed: int = 0, dtype: Any = None, scale: float = 0.02
) -> ModelWeights:
    """Deterministic random weights (normal * scale; norms = 1, biases small) for demos and benchmarks.

    Generated with numpy on the host, leaf by leaf, so realistic-size models can be built without
    holding a float32 copy of the whole model at once.
    """
    specs = weight_specs(cfg, dtype)

    def init(tree: Tree, prefix: str) -> Tree:
        out: Tree = {}
        for k, spec in tree.items():
            path = f"{prefix}/{k}"
            if isinstance(spec, dict):
                out[k] = init(spec, path)
                continue
            rng = np.random.default_rng([seed, *path.encode()])
            if "norm" in k:
                a = np.ones(spec.shape, np.float32)
            elif k == "router_bias":
                a = rng.normal(0.0, 0.1, spec.shape).astype(np.float32)
            else:
                a = (rng.standard_normal(spec.shape, dtype=np.float32) * scale).astype(np.float32)
            out[k] = jnp.asarray(a, dtype=spec.dtype)
        return out

    return ModelWeights(init(specs.attn, "attn"), init(specs.ffn, "ffn"))


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
