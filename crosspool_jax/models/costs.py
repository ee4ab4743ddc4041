"""What a model's step-program calls cost, from its shapes alone: bytes read and FLOPs per token,
per context pair and per call (plain Python, no JAX tracing; weight shapes from
`params.weight_specs`). The engine's prefill budget (`execution.prefill_cost`) and the simulator's
cost model (benchmarks/sim/costmodel.py) both price calls with it."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from crosspool_jax.models.config import AttentionKind, ModelConfig
from crosspool_jax.models.params import flatten, weight_specs


@dataclasses.dataclass(frozen=True)
class ModelCosts:
    """A model's per-call constants (bytes at the arena dtype; flops = 2 x multiply-adds).

    attn_bytes: attention-side weights read every step (per-layer projections and norms, final
    norm; the embedding table is gathered: `embed_row_bytes` per token). lm_head_bytes, router_bytes
    (all MoE layers), expert_bytes (every routed expert of every MoE layer), shared_dense_bytes
    (shared experts and dense FFN layers). kv_bytes_per_token: KV of one token, all layers.
    kv_flops_per_token / w_flops_per_token: projections / FFN flops of one token (top-k experts).
    attn_flops_per_pair: attention flops of one query token against one context token, all layers.
    lm_head_flops: per sampled row.
    """

    layers: int
    attn_bytes: int
    embed_row_bytes: int
    lm_head_bytes: int
    router_bytes: int
    expert_bytes: int
    num_experts: int
    top_k: int
    moe_layers: int
    shared_dense_bytes: int
    kv_bytes_per_token: int
    kv_flops_per_token: float
    w_flops_per_token: float
    attn_flops_per_pair: float
    lm_head_flops: float

    def experts_touched_bytes(self, tokens: int) -> float:
        """Routed-expert bytes `tokens` tokens read (expected distinct experts per MoE layer for
        uniform routing, E x (1 - (1 - k/E)^tokens))."""
        if not self.num_experts or tokens <= 0:
            return 0.0
        e, k = self.num_experts, self.top_k
        return self.expert_bytes * (1.0 - (1.0 - k / e) ** tokens)


@functools.lru_cache(maxsize=256)
def model_costs(cfg: ModelConfig, dtype: str, kv_bytes_per_token_layer: int) -> ModelCosts:
    """`ModelCosts` of `cfg` with weights in `dtype` and `kv_bytes_per_token_layer` bytes of KV per
    token and layer (`PageGeometry.bytes_per_token_used`: row padding included)."""
    w = weight_specs(cfg, dtype)
    leaves = {**flatten(w.attn, "attn"), **flatten(w.ffn, "ffn")}
    nbytes = {k: int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for k, v in leaves.items()}
    nelem = {k: int(np.prod(v.shape)) for k, v in leaves.items()}
    attn = lm = router = experts = shared = 0
    embed_row = 0
    kv_flops = w_flops = 0.0
    e, k = max(cfg.num_experts, 1), cfg.top_k
    for name, n in nbytes.items():
        if name.endswith("embed"):
            embed_row = cfg.hidden_size * np.dtype(leaves[name].dtype).itemsize
            if cfg.tie_word_embeddings:
                lm += n
        elif name.endswith("lm_head"):
            lm += n
        elif "/moe/w_" in name:
            experts += n
            w_flops += 2.0 * nelem[name] * k / e
        elif "router" in name:
            router += n
            w_flops += 2.0 * nelem[name]
        elif name.startswith("ffn/"):
            shared += n
            w_flops += 2.0 * nelem[name]
        else:
            attn += n
            if len(leaves[name].shape) >= 3:  # per-layer matrices (norms and biases are vectors)
                kv_flops += 2.0 * nelem[name]
    if cfg.attention == AttentionKind.MLA:  # absorbed: scores over the latent + rope, values latent
        d_qk, d_v = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
    else:
        d_qk, d_v = cfg.head_dim, cfg.head_dim
    pair = 2.0 * cfg.num_heads * (d_qk + d_v) * cfg.num_layers
    return ModelCosts(
        layers=cfg.num_layers, attn_bytes=attn, embed_row_bytes=embed_row, lm_head_bytes=lm,
        router_bytes=router, expert_bytes=experts, num_experts=cfg.num_experts, top_k=k,
        moe_layers=len(cfg.moe_layers), shared_dense_bytes=shared,
        kv_bytes_per_token=kv_bytes_per_token_layer * cfg.num_layers, kv_flops_per_token=kv_flops,
        w_flops_per_token=w_flops, attn_flops_per_pair=pair,
        lm_head_flops=2.0 * cfg.hidden_size * cfg.vocab_size)
