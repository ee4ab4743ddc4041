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
from crosspool_jax.models.config import (
    AttentionKind,
    Family,
    FFNKind,
    ModelConfig,
    QKNorm,
    RopeConfig,
    RopeStyle,
    RouterKind,
)
from crosspool_jax.models.params import init_random_weights

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


EXPORT_MARKER = "crosspool_export.json"


def export_demo(out_dir: Any, name: str = "demo-mixtral", dtype: Any = None) -> str:
    """Writes the demo model `name` as an HF model directory and returns the directory.

    The directory (config.json, generation_config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json for the byte-level tokenizer, see checkpoints.hf_export) is a real HF
    checkpoint, so it works wherever one is expected, with no downloads:

        crosspool demo export /tmp/demo --model demo-deepseek-v3
        crosspool generate --model /tmp/demo --prompt "Hello"
        crosspool convert --hf /tmp/demo --out /tmp/demo-orbax
        crosspool serve --model a=/tmp/demo

    `load_model(dir)` gives back the demo model's config and bit-identical weights (dtype None keeps
    float32; bfloat16 / float16 round them). A `crosspool_export.json` marker names the model, so a
    later export may overwrite the directory; any other non-empty directory is refused.
    Raises checkpoints.hf_export.ExportError (a ValueError) for an unknown name (the message lists the
    valid ones) or a non-empty directory that is not a previous export.
    """
    import json
    import os

    from checkpoints.hf_export import ExportError, byte_tokenizer_json, save_hf

    configs = demo_configs()
    if name not in configs:
        raise ExportError(f"unknown demo model {name!r}; choose one of: {', '.join(configs)}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ExportError(f"{out_dir}: exists and is not a directory")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, EXPORT_MARKER)):
            raise ExportError(
                f"{out_dir}: directory is not empty and is not a previous `crosspool demo export` "
                f"(no {EXPORT_MARKER}); choose a new or empty directory"
            )
    os.makedirs(out_dir, exist_ok=True)
    # the marker first: an export that fails half way leaves a directory a retry may overwrite
    with open(os.path.join(out_dir, EXPORT_MARKER), "w") as f:
        json.dump({"written_by": "crosspool_jax.demo.export_demo", "model": name}, f, indent=2)
        f.write("\n")
    model = demo_models()[name]
    save_hf(out_dir, model.config, model.weights, tokenizer_json=byte_tokenizer_json(), dtype=dtype)
    return out_dir
