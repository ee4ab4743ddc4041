"""Generates the HF transformers reference fixtures that the engine's model math is checked against.

Runs under the Python 3.11 reference venv (`.venv-ref`, torch CPU + transformers), never under the
engine's venv. For every case it builds a tiny HF model, re-draws all its weights from a per-case
seed at a scale that makes logits and router decisions decisive (advancing the seed until the
measured greedy and routing margins clear fixed thresholds), saves it the way the case asks (plain,
sharded, bfloat16, float16 or with fused expert tensor names) and records the reference outputs of
that very model:

    python checkpoints/tools/hf_fixtures.py --out DIR

writes `DIR/<case>/` (an HF model directory + `expected.npz`) and `DIR/manifest.json`. The engine's
tests load the directories with the engine's importer and compare against `expected.npz`:

    prompt_ids     int32   [P, Tmax]     prompts, right-padded with 0
    prompt_lens    int32   [P]
    logits         float32 [P, Tmax, V]  full-prompt forward logits (eager attention, float32); pads are 0
    greedy         int32   [P, 32]       32 greedy tokens per prompt (batch of one, eos never stops it)
    greedy_margin  float32 [P]           smallest top1 - top2 logit gap over the 32 greedy steps

Every number comes from running transformers. The output is deterministic: two runs write
byte-identical safetensors, npz, json and tokenizer files.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import safetensors
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

GREEDY_STEPS = 32
PROMPT_LENGTHS = (1, 7, 23)
MAX_ATTEMPTS = 40
# Acceptance thresholds for a seed. Greedy margins are in logits (the logits' std is ~1-4 here).
# Softmax routers: gaps in router logits (softmax is monotone, so these are the decision margins).
# DeepSeek-V3: gaps in sigmoid(logits) + e_score_correction_bias, which lie in about (-0.3, 1.3).
MIN_GREEDY_MARGIN = 3e-3
MIN_ROUTER_MARGIN_LOGITS = 2e-3
MIN_ROUTER_MARGIN_SIGMOID = 5e-4
# Reloading the saved directory must reproduce the logits within this worst per-position relative L2
# error: 10x tighter than the parity tests' 1e-4, far below what could move a greedy token (margins
# >= MIN_GREEDY_MARGIN on logits of std ~1-4).
RELOAD_TOLERANCE = 1e-5
# Each prompt's greedy continuation must hold at least this many distinct tokens (no one-token loops).
MIN_DISTINCT_GREEDY = 6

FAMILIES: dict[str, tuple[str, str]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("safetensors", "sharded", "fused")
# Tensors a low-precision checkpoint still stores in float32 (their values are rounded to its dtype).
FP32_ON_DISK = ("e_score_correction_bias",)
REFERENCE_NOTE = (
    "logits: one forward over each whole prompt (batch of one, use_cache=False), "
    "attn_implementation='eager', experts_implementation='eager', float32. greedy: argmax decoding with "
    "the KV cache, 32 steps, batch of one; checked equal to generate(do_sample=False, max_new_tokens=32, "
    "min_new_tokens=32) and to the argmax of one full forward over prompt+greedy. eos_token_id is chosen as "
    "a token that never occurs in any greedy output, so greedy is the same whether or not an engine "
    "suppresses eos. Low-precision cases: the weights are rounded to the checkpoint dtype and the reference "
    "is those rounded weights evaluated in float32. Every saved directory is reloaded with from_pretrained "
    "and must reproduce the logits within thresholds.reload_max_relative_error (worst per-position "
    "relative L2 error; torch may reduce in another order after a reload or on another CPU)."
)


MARGINS_NOTE = (
    "min_greedy_margin: smallest top1-top2 logit gap over all greedy steps of all prompts. "
    "min_router_margin: smallest decision gap over every router call in the forward over each prompt and in "
    "one forward over prompt+greedy[:-1] (so the routing of the decoded tokens is covered too); "
    "min_router_margin_prompt: the prompt forwards only. Softmax routers (Mixtral, Qwen, OLMoE, "
    "DeepSeek-V2): k-th minus (k+1)-th router logit; DeepSeek-V2 group_limited_greedy also the group choice "
    "(per-group max logit) and the expert choice within the chosen groups. DeepSeek-V3: the same on "
    "scores_for_choice = sigmoid(logits) + e_score_correction_bias after group masking, and on the group "
    "scores (sum of the top 2 per group). min_router_expert_margin / min_router_group_margin split the two "
    "(null: no group decision). A seed is kept only when all margins clear `thresholds`."
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One fixture: an HF config (kwargs on top of the family's tiny defaults) and how to save it."""

    name: str
    family: str
    description: str
    hf: dict[str, Any]
    dtype: str = "float32"
    format: str = "safetensors"
    tokenizer: bool = False
    seed: int = 0  # first weight seed tried; seed + 1, seed + 2, ... follow until the margins are decisive
    tags: tuple[str, ...] = ()


def _rope(theta: float = 10000.0, **extra: Any) -> dict[str, Any]:
    """HF `rope_parameters` for plain rotary embeddings."""
    return {"rope_type": "default", "rope_theta": theta, **extra}


def _yarn(factor: float, original: int, theta: float = 10000.0, **extra: Any) -> dict[str, Any]:
    """HF `rope_parameters` for YaRN scaling (extra keys such as mscale / mscale_all_dim pass through)."""
    return {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        **extra,
    }


CASES: tuple[Case, ...] = (
    # ---- Mixtral ----------------------------------------------------------------------------------
    Case(
        "mixtral_gqa4x2_top2",
        "mixtral",
        "Mixtral, GQA 4 q heads / 2 kv heads (head_dim 12), 4 experts top-2, rope_theta 1e6, has "
        "tokenizer.json.",
        dict(
            vocab_size=97,
            hidden_size=48,
            intermediate_size=23,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters=_rope(1e6),
        ),
        tokenizer=True,
        seed=11000,
        tags=("gqa", "top2", "tokenizer"),
    ),
    Case(
        "mixtral_mqa8x1_top1_swa16",
        "mixtral",
        "Mixtral, MQA 8 q heads / 1 kv head (head_dim 8), 6 experts top-1, sliding_window 16 (prompt+greedy "
        "reaches 55 tokens, so the window matters).",
        dict(
            vocab_size=131,
            hidden_size=64,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=1,
            num_local_experts=6,
            num_experts_per_tok=1,
            sliding_window=16,
            rope_parameters=_rope(),
        ),
        seed=12001,
        tags=("mqa", "top1", "sliding_window"),
    ),
    Case(
        "mixtral_mha4_hd16_top8_e10_tied",
        "mixtral",
        "Mixtral, MHA 4 heads with explicit head_dim 16 (!= hidden 40 / 4), 10 experts top-8, "
        "tie_word_embeddings (no lm_head.weight in the checkpoint).",
        dict(
            vocab_size=256,
            hidden_size=40,
            intermediate_size=29,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            num_local_experts=10,
            num_experts_per_tok=8,
            tie_word_embeddings=True,
            rope_parameters=_rope(),
        ),
        seed=13002,
        tags=("mha", "top8", "explicit_head_dim", "tied"),
    ),
    Case(
        "mixtral_gqa6x3_top2_fused",
        "mixtral",
        "Mixtral, GQA 6/3 (head_dim 8), 5 experts top-2, hidden 56. Format 'fused': model.safetensors "
        "written "
        "from model.state_dict() with fused expert tensors model.layers.N.mlp.experts.gate_up_proj [E, 2I, "
        "H] "
        "(gate rows first, then up) and ...mlp.experts.down_proj [E, H, I], router "
        "model.layers.N.mlp.gate.weight.",
        dict(
            vocab_size=113,
            hidden_size=56,
            intermediate_size=31,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=8,
            num_local_experts=5,
            num_experts_per_tok=2,
            rope_parameters=_rope(),
        ),
        format="fused",
        seed=14005,
        tags=("gqa", "top2", "fused_names"),
    ),
    # ---- Qwen2-MoE --------------------------------------------------------------------------------
    Case(
        "qwen2moe_gqa6x2_top2_shared40",
        "qwen2_moe",
        "Qwen2-MoE, GQA 6/2 (head_dim 8), qkv bias, 8 experts top-2 (norm_topk_prob false, moe_intermediate "
        "23), "
        "gated shared expert of size 40, has tokenizer.json.",
        dict(
            vocab_size=131,
            hidden_size=48,
            intermediate_size=64,
            moe_intermediate_size=23,
            shared_expert_intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            qkv_bias=True,
            rope_parameters=_rope(),
        ),
        tokenizer=True,
        seed=21001,
        tags=("gqa", "top2", "qkv_bias", "shared_expert", "tokenizer"),
    ),
    Case(
        "qwen2moe_mha4_step2_mlponly_top4",
        "qwen2_moe",
        "Qwen2-MoE, MHA 4 heads (head_dim 10), no qkv bias, 4 layers with decoder_sparse_step 2 and "
        "mlp_only_layers [3]: layers dense, MoE, dense, dense (dense intermediate 37); 8 experts top-4 with "
        "norm_topk_prob, shared expert of size 17.",
        dict(
            vocab_size=97,
            hidden_size=40,
            intermediate_size=37,
            moe_intermediate_size=19,
            shared_expert_intermediate_size=17,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            qkv_bias=False,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
            rope_parameters=_rope(),
        ),
        seed=22002,
        tags=("mha", "no_qkv_bias", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob"),
    ),
    Case(
        "qwen2moe_mha4_top8_e16_tied_sharded",
        "qwen2_moe",
        "Qwen2-MoE, MHA 4 heads (head_dim 16), qkv bias, 3 layers with mlp_only_layers [1] (MoE, dense, "
        "MoE), "
        "16 experts top-8, shared expert 64, tie_word_embeddings. Format 'sharded': save_pretrained with a "
        "small "
        "max_shard_size, >= 3 safetensors shards plus model.safetensors.index.json.",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=45,
            moe_intermediate_size=15,
            shared_expert_intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=16,
            num_experts_per_tok=8,
            norm_topk_prob=False,
            qkv_bias=True,
            mlp_only_layers=[1],
            tie_word_embeddings=True,
            rope_parameters=_rope(),
        ),
        format="sharded",
        seed=23003,
        tags=("mha", "top8", "mlp_only_layers", "tied", "sharded"),
    ),
    # ---- Qwen3-MoE --------------------------------------------------------------------------------
    Case(
        "qwen3moe_gqa8x2_hd16_top8_e16",
        "qwen3_moe",
        "Qwen3-MoE, GQA 8/2 with explicit head_dim 16 (!= 64 / 8), per-head q/k RMSNorm, 16 experts top-8 "
        "with "
        "norm_topk_prob, has tokenizer.json.",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=48,
            moe_intermediate_size=23,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=16,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            attention_bias=False,
            rope_parameters=_rope(),
        ),
        tokenizer=True,
        seed=31004,
        tags=("gqa", "top8", "explicit_head_dim", "qk_norm", "tokenizer"),
    ),
    Case(
        "qwen3moe_mqa4x1_top1_bias_mlponly",
        "qwen3_moe",
        "Qwen3-MoE, MQA 4/1 (head_dim 10), attention_bias (q/k/v/o biases), 3 layers with mlp_only_layers "
        "[1] "
        "(MoE, dense 29, MoE), 6 experts top-1 without norm_topk_prob (so the weight is the softmax prob).",
        dict(
            vocab_size=97,
            hidden_size=40,
            intermediate_size=29,
            moe_intermediate_size=21,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=10,
            num_experts=6,
            num_experts_per_tok=1,
            norm_topk_prob=False,
            attention_bias=True,
            mlp_only_layers=[1],
            rope_parameters=_rope(),
        ),
        seed=32001,
        tags=("mqa", "top1", "attention_bias", "mlp_only_layers"),
    ),
    Case(
        "qwen3moe_gqa4x2_top2_fp16",
        "qwen3_moe",
        "Qwen3-MoE, GQA 4/2 (head_dim 14), hidden 56, 8 experts top-2 with norm_topk_prob. Saved in float16; "
        "the reference is the float16 weights cast back to float32 and evaluated in float32.",
        dict(
            vocab_size=151,
            hidden_size=56,
            intermediate_size=33,
            moe_intermediate_size=27,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=14,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            attention_bias=False,
            rope_parameters=_rope(),
        ),
        dtype="float16",
        seed=33000,
        tags=("gqa", "top2", "float16"),
    ),
    # ---- OLMoE ------------------------------------------------------------------------------------
    Case(
        "olmoe_mha4_top2_clip",
        "olmoe",
        "OLMoE, MHA 4 heads (head_dim 12), q/k RMSNorm over the full projection, clip_qkv 1.5 (a fair share "
        "of "
        "q/k/v entries is clipped, see clip_fraction), 8 experts top-2 without norm_topk_prob, has "
        "tokenizer.json.",
        dict(
            vocab_size=131,
            hidden_size=48,
            intermediate_size=23,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            clip_qkv=1.5,
            attention_bias=False,
            rope_parameters=_rope(),
        ),
        tokenizer=True,
        seed=41000,
        tags=("mha", "top2", "clip_qkv", "qk_norm_full", "tokenizer"),
    ),
    Case(
        "olmoe_gqa8x2_top8_e10_bias",
        "olmoe",
        "OLMoE, GQA 8/2 (head_dim 8; k_norm over 2*8), attention_bias, no clip_qkv, 10 experts top-8 with "
        "norm_topk_prob.",
        dict(
            vocab_size=97,
            hidden_size=64,
            intermediate_size=21,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_experts=10,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            clip_qkv=None,
            attention_bias=True,
            rope_parameters=_rope(),
        ),
        seed=42002,
        tags=("gqa", "top8", "attention_bias", "no_clip", "norm_topk_prob"),
    ),
    Case(
        "olmoe_mqa4x1_top1_clip",
        "olmoe",
        "OLMoE, MQA 4/1 (head_dim 10), hidden 40, clip_qkv 2.0, 4 experts top-1 with norm_topk_prob (weight "
        "1).",
        dict(
            vocab_size=113,
            hidden_size=40,
            intermediate_size=25,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=1,
            norm_topk_prob=True,
            clip_qkv=2.0,
            attention_bias=False,
            rope_parameters=_rope(),
        ),
        seed=43000,
        tags=("mqa", "top1", "clip_qkv"),
    ),
    # ---- DeepSeek-V3 ------------------------------------------------------------------------------
    Case(
        "dsv3_qlora_interleave_g4t2_top4",
        "deepseek_v3",
        "DeepSeek-V3, MLA 4 heads with q_lora_rank 24, kv_lora_rank 16, qk_nope 12, qk_rope 8, v 10, "
        "rope_interleave true; 3 layers, first_k_dense_replace 1 (dense 37); 16 experts, n_group 4, "
        "topk_group 2, "
        "top-4, norm_topk_prob, routed_scaling_factor 2.5, 1 shared expert, random e_score_correction_bias; "
        "has tokenizer.json.",
        dict(
            vocab_size=131,
            hidden_size=48,
            intermediate_size=37,
            moe_intermediate_size=13,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=12,
            qk_rope_head_dim=8,
            v_head_dim=10,
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
            rope_parameters=_rope(),
        ),
        tokenizer=True,
        seed=51004,
        tags=("mla", "q_lora", "rope_interleave", "grouped_topk", "shared_1", "first_dense_1", "tokenizer"),
    ),
    Case(
        "dsv3_noqlora_halfrope_yarn_top2",
        "deepseek_v3",
        "DeepSeek-V3, MLA 4 heads, q_lora_rank None (plain q_proj), kv_lora_rank 12, qk_nope 6, qk_rope 4, "
        "v 8, "
        "rope_interleave false; yarn rope_parameters {factor 4, mscale_all_dim 1, no mscale key, "
        "original_max_position_embeddings 32}, max_position_embeddings 128: HF then uses attention_factor "
        "0.1*ln(4)+1 on cos/sin and softmax scale * (0.1*ln(4)+1)^2; 8 experts, n_group 1, top-2, no "
        "norm_topk_prob, routed_scaling_factor 1, n_shared_experts 0 (shared_experts tensors have a 0-sized "
        "dimension), first_k_dense_replace 0.",
        dict(
            vocab_size=97,
            hidden_size=40,
            intermediate_size=29,
            moe_intermediate_size=17,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=12,
            qk_nope_head_dim=6,
            qk_rope_head_dim=4,
            v_head_dim=8,
            n_routed_experts=8,
            n_group=1,
            topk_group=1,
            num_experts_per_tok=2,
            n_shared_experts=0,
            first_k_dense_replace=0,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            rope_interleave=False,
            max_position_embeddings=128,
            rope_parameters=_yarn(4.0, 32, mscale_all_dim=1.0),
        ),
        seed=52001,
        tags=("mla", "no_q_lora", "rope_half", "yarn", "shared_0", "first_dense_0"),
    ),
    Case(
        "dsv3_bf16_first2dense_shared2_top8",
        "deepseek_v3",
        "DeepSeek-V3, MLA 4 heads, q_lora_rank 32, kv_lora_rank 24, qk_nope 16, qk_rope 8, v 16, "
        "interleaved rope; "
        "4 layers with first_k_dense_replace 2 (dense 45); 16 experts, n_group 4, topk_group 3, top-8, "
        "norm_topk_prob, routed_scaling_factor 1.5, 2 shared experts. Saved in bfloat16, except "
        "e_score_correction_bias which stays float32 on disk as in the official checkpoints (its values are "
        "bfloat16-representable too); the reference is the bfloat16 weights cast back to float32 and "
        "evaluated "
        "in float32.",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=45,
            moe_intermediate_size=11,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=24,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=16,
            n_group=4,
            topk_group=3,
            num_experts_per_tok=8,
            n_shared_experts=2,
            first_k_dense_replace=2,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            rope_interleave=True,
            rope_parameters=_rope(),
        ),
        dtype="bfloat16",
        seed=53006,
        tags=("mla", "q_lora", "top8", "grouped_topk", "shared_2", "first_dense_2", "bfloat16"),
    ),
    Case(
        "dsv3_h7_g2t1_top2_fused",
        "deepseek_v3",
        "DeepSeek-V3, MLA 7 heads (hidden 56), q_lora_rank 16, kv_lora_rank 8, qk_nope 8, qk_rope 4, v 6; "
        "8 experts, n_group 2, topk_group 1, top-2, norm_topk_prob, routed_scaling_factor 2.5, 1 shared "
        "expert, "
        "first_k_dense_replace 0. Format 'fused': model.safetensors from model.state_dict() with "
        "model.layers.N.mlp.experts.gate_up_proj [E, 2I, H] and ...mlp.experts.down_proj [E, H, I].",
        dict(
            vocab_size=113,
            hidden_size=56,
            intermediate_size=21,
            moe_intermediate_size=9,
            num_hidden_layers=2,
            num_attention_heads=7,
            num_key_value_heads=7,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=6,
            n_routed_experts=8,
            n_group=2,
            topk_group=1,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=0,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
            rope_parameters=_rope(),
        ),
        format="fused",
        seed=54000,
        tags=("mla", "grouped_topk", "fused_names", "odd_heads"),
    ),
    # ---- DeepSeek-V2 ------------------------------------------------------------------------------
    Case(
        "dsv2_greedy_qlora_shared2_top2",
        "deepseek_v2",
        "DeepSeek-V2, MLA 4 heads, q_lora_rank 24, kv_lora_rank 16, qk_nope 8, qk_rope 8, v 12 (complex-form "
        "interleaved rope); 3 layers, first_k_dense_replace 1 (dense 33); topk_method greedy, 8 experts "
        "top-2 "
        "(weights are the softmax probs, never renormalised), 2 shared experts; has tokenizer.json.",
        dict(
            vocab_size=131,
            hidden_size=48,
            intermediate_size=33,
            moe_intermediate_size=11,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            first_k_dense_replace=1,
            topk_method="greedy",
            routed_scaling_factor=1.0,
            rope_parameters=_rope(),
        ),
        tokenizer=True,
        seed=61008,
        tags=("mla", "q_lora", "greedy", "shared_2", "first_dense_1", "tokenizer"),
    ),
    Case(
        "dsv2_group_limited_yarn_top3",
        "deepseek_v2",
        "DeepSeek-V2, MLA 4 heads, q_lora_rank None, kv_lora_rank 12, qk_nope 8, qk_rope 4, v 8; yarn "
        "{factor 4, mscale 0.707, mscale_all_dim 0.707, original_max_position_embeddings 32}, "
        "max_position_embeddings 128; topk_method group_limited_greedy with 12 experts, n_group 4, "
        "topk_group 2, "
        "top-3, routed_scaling_factor 2.0, 1 shared expert, first_k_dense_replace 0.",
        dict(
            vocab_size=97,
            hidden_size=40,
            intermediate_size=27,
            moe_intermediate_size=13,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=12,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=8,
            n_routed_experts=12,
            n_group=4,
            topk_group=2,
            num_experts_per_tok=3,
            n_shared_experts=1,
            first_k_dense_replace=0,
            topk_method="group_limited_greedy",
            routed_scaling_factor=2.0,
            max_position_embeddings=128,
            rope_parameters=_yarn(4.0, 32, mscale=0.707, mscale_all_dim=0.707),
        ),
        seed=62000,
        tags=("mla", "no_q_lora", "group_limited_greedy", "yarn", "shared_1", "first_dense_0"),
    ),
    Case(
        "dsv2_h8_bias_top1_first2dense",
        "deepseek_v2",
        "DeepSeek-V2, MLA 8 heads (hidden 56), attention_bias (q_a_proj, kv_a_proj_with_mqa and o_proj "
        "biases), "
        "q_lora_rank 20, kv_lora_rank 16, qk_nope 8, qk_rope 6, v 8; 3 layers with first_k_dense_replace 2; "
        "topk_method greedy, 6 experts top-1, no shared experts (n_shared_experts 0: 0-sized tensors).",
        dict(
            vocab_size=113,
            hidden_size=56,
            intermediate_size=35,
            moe_intermediate_size=15,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=8,
            q_lora_rank=20,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=6,
            v_head_dim=8,
            n_routed_experts=6,
            num_experts_per_tok=1,
            n_shared_experts=0,
            first_k_dense_replace=2,
            topk_method="greedy",
            routed_scaling_factor=1.0,
            attention_bias=True,
            rope_parameters=_rope(),
        ),
        seed=63002,
        tags=("mla", "q_lora", "attention_bias", "top1", "shared_0", "first_dense_2"),
    ),
)

COMMON_HF: dict[str, Any] = dict(
    max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2
)


# ---- weights -------------------------------------------------------------------------------------


def _init_std(name: str, shape: tuple[int, ...], hidden: int, tied: bool) -> tuple[float, float]:
    """(mean, std) of the normal each parameter is re-drawn from.

    Projections get std 1/sqrt(fan_in) so every sub-layer outputs O(1) values; the lm_head and the
    routers are a few times larger so that argmax and top-k decisions have clear margins. Tied
    embeddings are smaller, else the residual stream is dominated by the input token's own
    embedding and greedy decoding just repeats it.
    """
    leaf = name.rsplit(".", 2)
    module = leaf[-2] if len(leaf) >= 2 else name
    if name.endswith("e_score_correction_bias"):
        return 0.0, 0.1
    if name.endswith(".weight") and "norm" in module:
        return 1.0, 0.2
    if name.endswith(".bias"):
        return 0.0, 0.2
    if name == "model.embed_tokens.weight":
        return 0.0, 0.1 if tied else 1.0
    if name == "lm_head.weight":
        return 0.0, 3.0 / hidden**0.5
    if name.endswith(".gate.weight"):  # routers [E, H]
        return 0.0, 2.0 / hidden**0.5
    fan_in = shape[-1] if shape else 1
    return 0.0, 1.0 / max(fan_in, 1) ** 0.5


def randomize(model: torch.nn.Module, seed: int, dtype: torch.dtype) -> None:
    """Re-draws every parameter and persistent buffer (in sorted-name order, one torch.Generator).

    The values are then rounded to `dtype` (exactly representable there) but kept in float32, so
    the float32 reference and a low-precision checkpoint hold the same numbers.
    """
    gen = torch.Generator().manual_seed(seed)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    hidden = int(model.config.hidden_size)
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in sorted(state):
            if tied and name == "lm_head.weight":
                continue  # the same tensor as model.embed_tokens.weight
            t = state[name]
            mean, std = _init_std(name, tuple(t.shape), hidden, tied)
            v = torch.randn(tuple(t.shape), generator=gen, dtype=torch.float32) * std + mean
            t.data.copy_(v.to(dtype).to(torch.float32))


# ---- routing margins -----------------------------------------------------------------------------


def _gap(sorted_desc: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row gap between the k-th and (k+1)-th entries of rows sorted in descending order (+inf if none)."""
    if sorted_desc.shape[-1] <= k:
        return torch.full(sorted_desc.shape[:-1], float("inf"), dtype=torch.float64)
    return sorted_desc[..., k - 1].double() - sorted_desc[..., k].double()


def router_margins(router: torch.nn.Module, logits: torch.Tensor, indices: torch.Tensor) -> dict[str, float]:
    """Decision margins of one router call, re-deriving its selection from its float32 logits [T, E].

    Softmax routers: k-th minus (k+1)-th router logit (softmax is monotone). DeepSeek-V2
    group_limited_greedy: the group choice margin on the per-group max logit and the expert margin
    among the experts of the chosen groups. DeepSeek-V3: the same on scores_for_choice =
    sigmoid(logits) + e_score_correction_bias (group score = sum of the top 2 of the group). Also
    checks that the re-derived expert set equals the one the router returned.
    """
    logits = logits.float()
    k = int(router.top_k)
    num_experts = logits.shape[-1]
    cls = type(router).__name__
    group_gap = torch.full(logits.shape[:1], float("inf"), dtype=torch.float64)
    if cls == "DeepseekV3TopkRouter":
        scores = logits.sigmoid() + router.e_score_correction_bias.float()
        n_group, topk_group = int(router.num_group), int(router.topk_group)
        grouped = scores.view(-1, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    elif cls == "DeepseekV2TopkRouter" and router.topk_method == "group_limited_greedy":
        scores = logits
        n_group, topk_group = int(router.num_group), int(router.topk_group)
        group_scores = scores.view(-1, n_group, num_experts // n_group).max(dim=-1).values
    else:
        scores, n_group, topk_group, group_scores = logits, 1, 1, None
    if group_scores is not None and n_group > 1:
        gs = group_scores.sort(dim=-1, descending=True).values
        group_gap = _gap(gs, topk_group)
        chosen = group_scores.topk(topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
        mask = mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
        scores = scores.masked_fill(~mask, float("-inf"))
    ordered = scores.sort(dim=-1, descending=True)
    finite = torch.isfinite(ordered.values)
    if int(finite.sum(dim=-1).min()) < k:
        raise RuntimeError(f"{cls}: fewer than top_k={k} selectable experts")
    expert_gap = _gap(torch.where(finite, ordered.values, torch.full_like(ordered.values, -1e30)), k)
    mine = ordered.indices[:, :k].sort(dim=-1).values
    theirs = indices.reshape(-1, k).sort(dim=-1).values
    if not torch.equal(mine, theirs):
        raise RuntimeError(f"{cls}: re-derived top-{k} differs from the router's choice")
    return {"expert": float(expert_gap.min()), "group": float(group_gap.min())}


class RouterProbe:
    """Forward hooks on every router (`.gate`) module; collects the decision margins of each call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.routers = [m for n, m in model.named_modules() if n.endswith(".gate") and hasattr(m, "top_k")]
        self.records: list[tuple[int, dict[str, float], float]] = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.routers]
        self.enabled = False

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        """Records (tokens, margins, logit std) of one router call: output = (logits, weights, indices)."""
        if not self.enabled:
            return
        logits, _, indices = output
        self.records.append((logits.shape[0], router_margins(module, logits, indices), float(logits.std())))

    def close(self) -> None:
        """Removes the hooks."""
        for h in self._handles:
            h.remove()


# ---- reference computations ----------------------------------------------------------------------


def make_prompts(vocab: int, seed: int) -> list[list[int]]:
    """Deterministic prompts of PROMPT_LENGTHS tokens, ids drawn uniformly from the whole vocab."""
    rng = np.random.default_rng([seed, 7])
    return [[int(x) for x in rng.integers(0, vocab, size=n)] for n in PROMPT_LENGTHS]


@torch.no_grad()
def greedy_with_cache(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], float]:
    """GREEDY_STEPS argmax tokens decoded with the KV cache (no eos stop) and the smallest top1-top2 gap."""
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    cache, step_logits = out.past_key_values, out.logits[0, -1]
    tokens: list[int] = []
    margin = float("inf")
    for step in range(GREEDY_STEPS):
        top2 = step_logits.double().topk(2)
        margin = min(margin, float(top2.values[0] - top2.values[1]))
        tokens.append(int(top2.indices[0]))
        if step + 1 < GREEDY_STEPS:
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            cache, step_logits = out.past_key_values, out.logits[0, -1]
    return tokens, margin


@dataclasses.dataclass
class Reference:
    """What `measure` found for one set of weights: prompts, greedy tokens and the margins."""

    prompts: list[list[int]]
    greedy: list[list[int]]
    greedy_margin: list[float]
    router: dict[str, Any]


@torch.no_grad()
def measure(model: torch.nn.Module, probe: RouterProbe, prompts: list[list[int]]) -> Reference:
    """Greedy decode and routing margins (over prompt and prompt+greedy forwards) of the current weights."""
    greedy, margins = [], []
    for p in prompts:
        toks, m = greedy_with_cache(model, p)
        greedy.append(toks)
        margins.append(m)
    prompt_min = {"expert": float("inf"), "group": float("inf")}
    full_min = dict(prompt_min)
    scale: list[float] = []
    for p, toks in zip(prompts, greedy, strict=True):
        probe.records.clear()
        probe.enabled = True
        model(input_ids=torch.tensor([p]), use_cache=False)
        full = model(input_ids=torch.tensor([p + toks[:-1]]), use_cache=False)
        probe.enabled = False
        n_routers = len(probe.routers)
        for i, (_, rec, std) in enumerate(probe.records):
            target = prompt_min if i < n_routers else full_min
            for key in rec:
                target[key] = min(target[key], rec[key])
            scale.append(std)
        # the argmax of one full forward must reproduce the cached greedy decode
        want = torch.tensor(toks)
        got = full.logits[0, len(p) - 1 :].argmax(-1)
        if not torch.equal(got, want):
            raise RuntimeError("greedy decode with the KV cache differs from the full-forward argmax")
    full_min = {k: min(full_min[k], prompt_min[k]) for k in full_min}
    router = {
        "prompt": prompt_min,
        "full": full_min,
        "score_std": float(np.mean(scale)) if scale else 0.0,
    }
    return Reference(prompts, greedy, margins, router)


def router_threshold(family: str) -> float:
    """The router-margin acceptance threshold in the family's score space."""
    return MIN_ROUTER_MARGIN_SIGMOID if family == "deepseek_v3" else MIN_ROUTER_MARGIN_LOGITS


def _num(x: float) -> float | None:
    """A JSON-safe float: None for +-inf / nan (e.g. a router with no group decision)."""
    return float(x) if np.isfinite(x) else None


def _finite_min(d: dict[str, float]) -> float:
    """Smallest finite value of `d` (+inf when there is none, e.g. no group decision)."""
    vals = [v for v in d.values() if np.isfinite(v)]
    return min(vals) if vals else float("inf")


@torch.no_grad()
def prompt_logits(model: torch.nn.Module, prompts: list[list[int]], vocab: int) -> np.ndarray:
    """[P, Tmax, V] float32 logits of one full forward per prompt; padded positions are zero."""
    t_max = max(len(p) for p in prompts)
    out = np.zeros((len(prompts), t_max, vocab), np.float32)
    for i, p in enumerate(prompts):
        out[i, : len(p)] = model(input_ids=torch.tensor([p]), use_cache=False).logits[0].float().numpy()
    return out


@torch.no_grad()
def check_generate(model: torch.nn.Module, ref: Reference, eos: int) -> None:
    """HF generate() (greedy, min_new_tokens=max_new_tokens) must give the same tokens as the manual loop."""
    for p, toks in zip(ref.prompts, ref.greedy, strict=True):
        ids = torch.tensor([p])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=GREEDY_STEPS,
            min_new_tokens=GREEDY_STEPS,
            eos_token_id=eos,
            pad_token_id=eos,
        )
        if out[0, len(p) :].tolist() != toks:
            raise RuntimeError("generate() and the manual greedy loop disagree")


@torch.no_grad()
def clip_fraction(model: torch.nn.Module, prompts: list[list[int]]) -> float | None:
    """OLMoE with clip_qkv: the fraction of q/k/v entries (prompt forwards) that the clamp changes."""
    clip = getattr(model.config, "clip_qkv", None)
    if clip is None:
        return None
    counts = [0, 0]

    def hook(_m: torch.nn.Module, _a: Any, out: torch.Tensor) -> None:
        counts[0] += int((out.abs() > clip).sum())
        counts[1] += out.numel()

    mods = [
        m
        for n, m in model.named_modules()
        if n.endswith(("self_attn.q_norm", "self_attn.k_norm", "self_attn.v_proj"))
    ]
    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        for p in prompts:
            model(input_ids=torch.tensor([p]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return counts[0] / max(counts[1], 1)


def choose_special_ids(vocab: int, greedy: list[list[int]]) -> tuple[int, int]:
    """(bos, eos): bos = 1; eos = 2, or else the highest id, that no greedy output contains.

    So eos never occurs in the reference greedy tokens, and whether an engine stops at eos or
    suppresses it before a minimum length cannot change them.
    """
    used = {t for g in greedy for t in g}
    eos = next(c for c in [2, *range(vocab - 1, 2, -1)] if c not in used)
    return 1, eos


# ---- writing -------------------------------------------------------------------------------------


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """np.savez without timestamps: a stored zip with fixed member dates, so bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def token_strings(vocab: int, bos: int, eos: int) -> list[str]:
    """Vocabulary of the tiny tokenizers: '<unk>' = 0, '<s>' = bos, '</s>' = eos, 'w<i>' otherwise."""
    words = [f"w{i}" for i in range(vocab)]
    words[0], words[bos], words[eos] = "<unk>", "<s>", "</s>"
    return words


def write_tokenizer(case_dir: str, vocab: int, bos: int, eos: int, prompts: list[list[int]]) -> list[str]:
    """WordLevel tokenizer.json (+ tokenizer_config.json) over the model's vocab.

    Returns the prompts as text (whitespace-joined token strings), checked to encode back to the ids.
    """
    words = token_strings(vocab, bos, eos)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(w, special=True) for w in ("<unk>", "<s>", "</s>")])
    if tok.get_vocab_size(with_added_tokens=True) != vocab:
        raise RuntimeError("tokenizer vocab size differs from the model's")
    tok.save(os.path.join(case_dir, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 128,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    with open(os.path.join(case_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    texts = [" ".join(words[i] for i in p) for p in prompts]
    reloaded = Tokenizer.from_file(os.path.join(case_dir, "tokenizer.json"))
    for text, p in zip(texts, prompts, strict=True):
        if reloaded.encode(text).ids != p:
            raise RuntimeError(f"tokenizer round trip failed for {text!r}")
    return texts


def save_model(model: torch.nn.Module, case: Case, case_dir: str) -> None:
    """Writes the HF model directory in the case's format and dtype."""
    dtype = DTYPES[case.dtype]
    if case.format == "fused":
        if case.dtype != "float32" or model.config.tie_word_embeddings:
            raise ValueError("fused cases are float32 and untied")
        model.config.architectures = [type(model).__name__]
        model.config.dtype = dtype
        model.config.save_pretrained(case_dir)
        model.generation_config.save_pretrained(case_dir)
        state = {k: v.detach().contiguous().clone() for k, v in sorted(model.state_dict().items())}
        if not any(k.endswith("experts.gate_up_proj") for k in state):
            raise RuntimeError("state_dict holds no fused expert tensors")
        save_file(state, os.path.join(case_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    kwargs: dict[str, Any] = {}
    if case.format == "sharded":
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        kwargs["max_shard_size"] = max(total // 5, 1)
    model.to(dtype)
    for name, buf in model.named_buffers():
        if name.endswith(FP32_ON_DISK):
            buf.data = buf.data.to(torch.float32)  # as in the official DeepSeek-V3 checkpoints
    try:
        model.save_pretrained(case_dir, **kwargs)
    finally:
        model.to(torch.float32)


def check_saved(
    case: Case, case_dir: str, model_cls: type, ref_logits: np.ndarray, prompts: list[list[int]]
) -> list[str]:
    """Reloads the saved directory with transformers (float32) and checks its logits equal the saved
    model's within RELOAD_TOLERANCE (not bit for bit: torch's float32 kernels may reduce in another
    order after a reload, or on another CPU; 4.3e-6 absolute was seen on one machine).

    Also checks the on-disk key layout (per-expert names, or fused names for 'fused') and the shard
    count; returns the sorted safetensors key names.
    """
    files = sorted(f for f in os.listdir(case_dir) if f.endswith(".safetensors"))
    keys: list[str] = []
    for fn in files:
        with safetensors.safe_open(os.path.join(case_dir, fn), "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                keys.append(k)
                want = torch.float32 if k.endswith(FP32_ON_DISK) else DTYPES[case.dtype]
                got = f.get_slice(k).get_dtype()
                if {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[got] != want:
                    raise RuntimeError(f"{fn}:{k} has dtype {got}, expected {want}")
    keys.sort()
    fused = [k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    if (case.format == "fused") != bool(fused):
        raise RuntimeError(f"unexpected expert key layout: {fused[:2]}")
    has_index = os.path.isfile(os.path.join(case_dir, "model.safetensors.index.json"))
    if case.format == "sharded" and (len(files) < 3 or not has_index):
        raise RuntimeError(f"sharded case has {len(files)} shards")
    if case.format != "sharded" and (files != ["model.safetensors"] or has_index):
        raise RuntimeError(f"unsharded case has files {files}")
    reloaded, info = model_cls.from_pretrained(
        case_dir,
        dtype=torch.float32,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"reloading {case_dir}: {bad}")
    got = prompt_logits(reloaded.eval(), prompts, ref_logits.shape[-1])
    err = reload_error(got, ref_logits)
    if not err <= RELOAD_TOLERANCE:
        raise RuntimeError(
            f"reloaded {case_dir} gives different logits: worst per-position relative error {err:.3g} "
            f"> {RELOAD_TOLERANCE:g} (max abs diff {np.abs(got - ref_logits).max():.3g})"
        )
    return keys


def reload_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Worst per-position relative L2 error of `got` vs `ref` (both Float['P T V'], padded positions
    zero in both): the measure the parity tests use, per position."""
    num = np.linalg.norm(got - ref, axis=-1)
    den = np.maximum(np.linalg.norm(ref, axis=-1), np.finfo(np.float32).tiny)
    return float((num / den).max())


# ---- driver --------------------------------------------------------------------------------------


def build_model(case: Case) -> torch.nn.Module:
    """The case's HF model in float32 with eager attention (weights still at transformers' init)."""
    cfg_name, model_name = FAMILIES[case.family]
    config_cls: Callable[..., Any] = getattr(transformers, cfg_name)
    model_cls: Callable[..., Any] = getattr(transformers, model_name)
    config = config_cls(**{**COMMON_HF, **case.hf})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # the reference per-expert loop, not grouped_mm
    torch.manual_seed(case.seed)
    model = model_cls(config).eval()
    if (model.config._attn_implementation, model.config._experts_implementation) != ("eager", "eager"):
        raise RuntimeError("eager attention / experts were not selected")
    return model


def run_case(case: Case, out_dir: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Builds, seeds, measures, saves and verifies one case; returns its manifest entry."""
    t0 = time.perf_counter()
    model = build_model(case)
    probe = RouterProbe(model)
    if not probe.routers:
        raise RuntimeError("no router modules found")
    vocab = int(model.config.vocab_size)
    dtype = DTYPES[case.dtype]
    rthr = router_threshold(case.family)
    ref = None
    attempts = 0
    for attempt in range(MAX_ATTEMPTS):
        attempts = attempt + 1
        seed = case.seed + attempt
        randomize(model, seed, dtype)
        prompts = make_prompts(vocab, seed)
        ref = measure(model, probe, prompts)
        if (
            min(ref.greedy_margin) >= MIN_GREEDY_MARGIN
            and _finite_min(ref.router["full"]) >= rthr
            and min(len(set(g)) for g in ref.greedy) >= MIN_DISTINCT_GREEDY
        ):
            break
    else:
        raise RuntimeError(f"{case.name}: no seed with decisive margins in {MAX_ATTEMPTS} attempts")
    probe.close()
    assert ref is not None
    bos, eos = choose_special_ids(vocab, ref.greedy)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id = bos, eos
    check_generate(model, ref, eos)
    logits = prompt_logits(model, ref.prompts, vocab)
    clipped = clip_fraction(model, ref.prompts)

    case_dir = os.path.join(out_dir, case.name)
    if os.path.isdir(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    save_model(model, case, case_dir)
    keys = check_saved(case, case_dir, type(model), logits, ref.prompts)
    texts = write_tokenizer(case_dir, vocab, bos, eos, ref.prompts) if case.tokenizer else None

    t_max = max(len(p) for p in ref.prompts)
    prompt_ids = np.zeros((len(ref.prompts), t_max), np.int32)
    for i, p in enumerate(ref.prompts):
        prompt_ids[i, : len(p)] = p
    write_npz(
        os.path.join(case_dir, "expected.npz"),
        {
            "prompt_ids": prompt_ids,
            "prompt_lens": np.array([len(p) for p in ref.prompts], np.int32),
            "logits": logits,
            "greedy": np.array(ref.greedy, np.int32),
            "greedy_margin": np.array(ref.greedy_margin, np.float32),
        },
    )
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    entry: dict[str, Any] = {
        "name": case.name,
        "family": case.family,
        "description": case.description,
        "dtype": case.dtype,
        "format": case.format,
        "min_greedy_margin": min(ref.greedy_margin),
        "min_router_margin": _num(_finite_min(ref.router["full"])),
        "min_router_margin_prompt": _num(_finite_min(ref.router["prompt"])),
        "router_margin_space": "sigmoid+bias scores_for_choice"
        if case.family == "deepseek_v3"
        else "router logits",
        "min_router_expert_margin": _num(ref.router["full"]["expert"]),
        "min_router_group_margin": _num(ref.router["full"]["group"]),
        "router_logit_std": ref.router["score_std"],
        "weight_seed": case.seed + attempts - 1,
        "seed_attempts": attempts,
        "tags": list(case.tags),
        "vocab_size": vocab,
        "num_layers": int(model.config.num_hidden_layers),
        "moe_layers": moe_layers,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "prompt_lens": [len(p) for p in ref.prompts],
        "tokenizer": case.tokenizer,
        "files": sorted(os.listdir(case_dir)),
        "num_safetensors_keys": len(keys),
    }
    if texts is not None:
        entry["text_prompts"] = texts
    if clipped is not None:
        entry["clip_fraction"] = clipped
    log(
        f"{case.name:40s} greedy_margin={entry['min_greedy_margin']:.3g} "
        f"router_margin={_finite_min(ref.router['full']):.3g} attempts={attempts} "
        f"{time.perf_counter() - t0:.1f}s"
    )
    return entry


def main(argv: list[str] | None = None) -> int:
    """Command line: --out DIR [--only NAME ...] [--quiet]."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (case folders + manifest.json)")
    ap.add_argument("--only", nargs="*", default=None, help="generate only these cases (no manifest)")
    ap.add_argument("--quiet", action="store_true", help="no per-case progress lines on stderr")
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    names = [c.name for c in CASES]
    if len(set(names)) != len(names):
        raise SystemExit("duplicate case names")
    for c in CASES:
        if c.family not in FAMILIES or c.dtype not in DTYPES or c.format not in FORMATS:
            raise SystemExit(f"{c.name}: bad family, dtype or format")
    unknown = set(args.only or ()) - set(names)
    if unknown:
        raise SystemExit(f"unknown case(s): {sorted(unknown)}")
    cases = [c for c in CASES if args.only is None or c.name in args.only]
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.json")
    if args.only is None and os.path.exists(manifest_path):
        os.remove(manifest_path)  # a failed run must not leave a manifest that looks current

    t0 = time.perf_counter()
    entries = [run_case(c, out_dir, log) for c in cases]
    if args.only is not None:
        log(f"generated {len(entries)} case(s) in {time.perf_counter() - t0:.1f}s (no manifest written)")
        return 0
    with open(os.path.abspath(__file__), "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    manifest = {
        "generator_sha256": sha,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "reference": REFERENCE_NOTE,
        "margins": MARGINS_NOTE,
        "greedy_steps": GREEDY_STEPS,
        "thresholds": {
            "min_greedy_margin": MIN_GREEDY_MARGIN,
            "min_router_margin_logits": MIN_ROUTER_MARGIN_LOGITS,
            "min_router_margin_sigmoid": MIN_ROUTER_MARGIN_SIGMOID,
            "min_distinct_greedy_tokens": MIN_DISTINCT_GREEDY,
            "reload_max_relative_error": RELOAD_TOLERANCE,
        },
        "cases": entries,
    }
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, manifest_path)
    log(f"wrote {len(entries)} cases to {out_dir} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
