"""Built-in demo models: small, deterministic random weights, the repo's byte-level tokenizer.

They let `crosspool serve` start on a fresh machine with no downloads. Three families with different
attention and routing: Mixtral (GQA, softmax top-2), Qwen3-MoE (GQA with per-head q/k norm) and
DeepSeek-V3 (MLA, sigmoid grouped router, shared expert, a first dense layer). The tokens they
generate are meaningless (random weights) but deterministic.
"""

from __future__ import annotations

from typing import Any

from checkpoints import LoadedModel
from checkpoints.tokenizer import ByteTokenizer
from crosspool_jax.config import (
    AttentionKind,
    Family,
    FFNKind,
    ModelConfig,
    QKNorm,
    RopeConfig,
    RopeStyle,
    RouterKind,
)
from crosspool_jax.params import init_random_weights

VOCAB = ByteTokenizer.vocab_size  # 258: bytes + bos 256 + eos 257
MAX_POSITIONS = 512
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_layers=2,
    max_position_embeddings=MAX_POSITIONS,
    rms_norm_eps=1e-6,
    rope=RopeConfig(theta=10000.0),
    sliding_windows=(0, 0),
    bos_token_id=ByteTokenizer.bos_id,
    eos_token_ids=(ByteTokenizer.eos_id,),
    dtype="float32",
)


def demo_configs() -> dict[str, ModelConfig]:
    """The demo models' configs by name."""
    return {
        "demo-mixtral": ModelConfig(
            family=Family.MIXTRAL,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            ffn_kinds=(FFNKind.MOE, FFNKind.MOE),
            num_experts=4,
            top_k=2,
            moe_intermediate_size=128,
            router=RouterKind.SOFTMAX,
            norm_topk_prob=True,
            **_COMMON,
        ),
        "demo-qwen3-moe": ModelConfig(
            family=Family.QWEN3_MOE,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            qk_norm=QKNorm.PER_HEAD,
            ffn_kinds=(FFNKind.MOE, FFNKind.MOE),
            num_experts=8,
            top_k=2,
            moe_intermediate_size=32,
            router=RouterKind.SOFTMAX,
            norm_topk_prob=True,
            **_COMMON,
        ),
        "demo-deepseek-v3": ModelConfig(
            family=Family.DEEPSEEK_V3,
            num_heads=4,
            num_kv_heads=4,
            head_dim=24,  # qk_nope 16 + qk_rope 8
            attention=AttentionKind.MLA,
            rope_style=RopeStyle.INTERLEAVED_SPLIT,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            ffn_kinds=(FFNKind.DENSE, FFNKind.MOE),
            dense_intermediate_size=128,
            num_experts=8,
            top_k=2,
            moe_intermediate_size=32,
            shared_intermediate_size=32,
            router=RouterKind.SIGMOID_GROUPED,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            n_group=2,
            topk_group=1,
            router_bias=True,
            **_COMMON,
        ),
    }


def demo_models(seed: int = 0) -> dict[str, LoadedModel]:
    """Every demo model, built from its config with deterministic random weights (seed per model)."""
    return {
        name: LoadedModel(cfg, init_random_weights(cfg, seed=seed + i, scale=0.5), ByteTokenizer())
        for i, (name, cfg) in enumerate(demo_configs().items())
    }
