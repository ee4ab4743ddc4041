"""Model configuration: one frozen dataclass for every supported MoE family, read from HF `config.json`.

A `ModelConfig` is hashable (it is passed as a static argument to jitted functions) and carries
everything the model math needs; nothing else reads `config.json`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

from crosspool_jax.errors import CrossPoolError


class ConfigError(CrossPoolError, ValueError):
    """A config.json that names an unknown architecture or holds inconsistent values."""


class Family(enum.StrEnum):
    MIXTRAL = "mixtral"
    QWEN2_MOE = "qwen2_moe"
    QWEN3_MOE = "qwen3_moe"
    OLMOE = "olmoe"
    DEEPSEEK_V2 = "deepseek_v2"
    DEEPSEEK_V3 = "deepseek_v3"


class AttentionKind(enum.StrEnum):
    GQA = "gqa"  # grouped-query (covers MHA and MQA): per-head K and V in the cache
    MLA = "mla"  # DeepSeek multi-head latent attention: one latent (kv_lora_rank + rope dims) per token


class QKNorm(enum.StrEnum):
    NONE = "none"
    PER_HEAD = "per_head"  # Qwen3-MoE: RMSNorm over head_dim, weight [head_dim]
    FULL = "full"  # OLMoE: RMSNorm over the whole projection, weight [heads * head_dim]


class RopeStyle(enum.StrEnum):
    HALF = (
        "half"  # rotate_half: pairs (i, i + d/2); Llama/Mixtral/Qwen/OLMoE, DeepSeek-V3 with interleave off
    )
    INTERLEAVED_SPLIT = (
        "interleaved_split"  # DeepSeek-V3 rope_interleave: pairs (2i, 2i+1), out = [evens | odds]
    )
    INTERLEAVED = "interleaved"  # DeepSeek-V2 complex form: pairs (2i, 2i+1), out stays interleaved


class RouterKind(enum.StrEnum):
    SOFTMAX = "softmax"  # softmax over experts, top-k (optionally renormalised)
    SOFTMAX_GROUP_LIMITED = "softmax_group_limited"  # DeepSeek-V2 group_limited_greedy
    SIGMOID_GROUPED = "sigmoid_grouped"  # DeepSeek-V3 noaux_tc: sigmoid + bias for choice, grouped top-k


class FFNKind(enum.StrEnum):
    DENSE = "dense"
    MOE = "moe"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / `rope_scaling`)."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | yarn
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None  # None: HF derives attention_factor from `factor` alone
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the model math needs. Sizes in elements; lengths in tokens."""

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # GQA: per-head dim of q, k and v. MLA: qk_nope + qk_rope (the q/k head dim)
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    rope_style: RopeStyle = RopeStyle.HALF
    attention: AttentionKind = AttentionKind.GQA
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: QKNorm = QKNorm.NONE
    clip_qkv: float | None = None
    # sliding window per layer (0 = full attention); a tuple of length num_layers
    sliding_windows: tuple[int, ...] = ()
    # MLA (DeepSeek)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # FFN side
    hidden_act: str = "silu"
    ffn_kinds: tuple[FFNKind, ...] = ()
    dense_intermediate_size: int = 0
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0  # 0 = no shared expert
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared expert
    router: RouterKind = RouterKind.SOFTMAX
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False  # DeepSeek-V3 e_score_correction_bias
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "float32"  # the checkpoint's dtype: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        problems = []
        if self.num_heads % max(self.num_kv_heads, 1):
            problems.append(
                f"num_attention_heads {self.num_heads} not a multiple of kv heads {self.num_kv_heads}"
            )
        if len(self.ffn_kinds) != self.num_layers:
            problems.append(f"ffn_kinds has {len(self.ffn_kinds)} entries for {self.num_layers} layers")
        if len(self.sliding_windows) != self.num_layers:
            problems.append(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers"
            )
        if FFNKind.MOE in self.ffn_kinds:
            if not 1 <= self.top_k <= self.num_experts:
                problems.append(f"top_k {self.top_k} not in [1, num_experts={self.num_experts}]")
            if self.num_experts % max(self.n_group, 1):
                problems.append(f"num_experts {self.num_experts} not a multiple of n_group {self.n_group}")
            if self.router != RouterKind.SOFTMAX and not 1 <= self.topk_group <= self.n_group:
                problems.append(f"topk_group {self.topk_group} not in [1, n_group={self.n_group}]")
        if self.attention == AttentionKind.MLA and self.qk_rope_head_dim % 2:
            problems.append("qk_rope_head_dim must be even")
        if self.attention == AttentionKind.GQA and self.head_dim % 2:
            problems.append("head_dim must be even for rotary embeddings")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"unsupported dtype {self.dtype}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if problems:
            raise ConfigError("; ".join(problems))

    # ---- derived sizes -------------------------------------------------------------------------
    @functools.cached_property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.ffn_kinds) if k == FFNKind.MOE)

    @functools.cached_property
    def dense_layers(self) -> tuple[int, ...]:
        return tuple(i for i, k in enumerate(self.ffn_kinds) if k == FFNKind.DENSE)

    @functools.cached_property
    def ffn_stack_index(self) -> tuple[int, ...]:
        """Layer i's index into the stacked dense or MoE FFN parameters (per `ffn_kinds[i]`)."""
        out, n = [], {FFNKind.DENSE: 0, FFNKind.MOE: 0}
        for k in self.ffn_kinds:
            out.append(n[k])
            n[k] += 1
        return tuple(out)

    @property
    def v_dim(self) -> int:
        """Per-head dim of the attention output (v_head_dim for MLA)."""
        return self.v_head_dim if self.attention == AttentionKind.MLA else self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == AttentionKind.MLA else self.head_dim

    @property
    def kv_width(self) -> int:
        """Elements of KV cache per token per layer: 2*kv_heads*head_dim (GQA) or latent+rope (MLA)."""
        if self.attention == AttentionKind.MLA:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.head_dim**-0.5
        r = self.rope
        if self.attention == AttentionKind.MLA and r.rope_type != "default" and r.mscale_all_dim:
            m = yarn_get_mscale(r.factor, r.mscale_all_dim)
            scale = scale * m * m
        return scale

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """KV-cache bytes one token occupies over all layers."""
        return self.kv_width * self.num_layers * dtype_bytes

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope"] = dataclasses.asdict(self.rope)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope"] = RopeConfig(**d["rope"])
        d["family"] = Family(d["family"])
        d["attention"] = AttentionKind(d["attention"])
        d["qk_norm"] = QKNorm(d["qk_norm"])
        d["rope_style"] = RopeStyle(d["rope_style"])
        d["router"] = RouterKind(d["router"])
        d["ffn_kinds"] = tuple(FFNKind(k) for k in d["ffn_kinds"])
        d["sliding_windows"] = tuple(d["sliding_windows"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---- HF config.json --------------------------------------------------------------------------------

_MODEL_TYPES = {f.value: f for f in Family}
_ARCHITECTURES = {
    "MixtralForCausalLM": Family.MIXTRAL,
    "Qwen2MoeForCausalLM": Family.QWEN2_MOE,
    "Qwen3MoeForCausalLM": Family.QWEN3_MOE,
    "OlmoeForCausalLM": Family.OLMOE,
    "DeepseekV2ForCausalLM": Family.DEEPSEEK_V2,
    "DeepseekV3ForCausalLM": Family.DEEPSEEK_V3,
}


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "yarn"):
        raise ConfigError(f"rope type {rope_type!r} is not supported (default, linear, yarn)")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=float(params["mscale"]) if params.get("mscale") else None,
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _eos_ids(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def _num_experts(hf: Mapping[str, Any]) -> int:
    # transformers 5 maps these names onto each other; a config.json may carry any one of them.
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(key) is not None:
            return int(hf[key])
    return 0


def family_of(hf: Mapping[str, Any], source: str = "config.json") -> Family:
    mt = hf.get("model_type")
    if mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    for arch in hf.get("architectures") or ():
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    known = ", ".join(sorted(_MODEL_TYPES))
    raise ConfigError(
        f"{source}: unknown architecture (model_type={mt!r}, architectures={hf.get('architectures')!r}); "
        f"supported model types: {known}"
    )


def from_hf_config(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Builds a ModelConfig from a parsed HF config.json. Raises ConfigError naming `source`.
    eos ids outside the vocabulary are dropped with a warning (`without_unreachable_eos`)."""
    family = family_of(hf, source)
    try:
        cfg = _from_hf(hf, family)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: bad or missing field for {family.value}: {e!r}") from None
    return without_unreachable_eos(cfg, source)


class UnreachableEosWarning(UserWarning):
    """A model config names eos ids its vocabulary cannot produce (they were dropped)."""


def without_unreachable_eos(cfg: ModelConfig, source: str = "model config") -> ModelConfig:
    """`cfg` without the eos ids outside [0, vocab_size), with one warning naming them.

    Such ids can never be generated (HF transformers generates from such a config and simply never
    stops on them), so they are not an error; stop ids a user passes explicitly are still checked
    (`reference.validate_request`)."""
    bad = [t for t in cfg.eos_token_ids if not 0 <= t < cfg.vocab_size]
    if not bad:
        return cfg
    warnings.warn(
        f"{source}: eos id{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} outside the vocabulary "
        f"[0, {cfg.vocab_size}) dropped (they can never be generated)",
        UnreachableEosWarning,
        stacklevel=2,
    )
    kept = tuple(t for t in cfg.eos_token_ids if 0 <= t < cfg.vocab_size)
    return dataclasses.replace(cfg, eos_token_ids=kept)


def _from_hf(hf: Mapping[str, Any], family: Family) -> ModelConfig:
    """The `ModelConfig` of an HF config of `family`: the fields every family has, then the
    family's own (`_FAMILY_FROM_HF`)."""
    return _FAMILY_FROM_HF[family](hf, family, _common_from_hf(hf, family))


def _common_from_hf(hf: Mapping[str, Any], family: Family) -> dict[str, Any]:
    """The `ModelConfig` fields every family reads the same way (attention shapes, rope, norms,
    tokens, dtype; no sliding window)."""
    g = hf.get
    n_layers = int(hf["num_hidden_layers"])
    n_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    common: dict[str, Any] = dict(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=int(g("num_key_value_heads") or n_heads),
        head_dim=int(g("head_dim") or hidden // n_heads),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        rms_norm_eps=float(g("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(hf),
        hidden_act=str(g("hidden_act", "silu")),
        tie_word_embeddings=bool(g("tie_word_embeddings", False)),
        bos_token_id=g("bos_token_id"),
        eos_token_ids=_eos_ids(g("eos_token_id")),
        dtype=str(g("dtype") or g("torch_dtype") or "float32"),
        sliding_windows=(0,) * n_layers,
    )
    if common["hidden_act"] != "silu":
        raise ConfigError(f"hidden_act {common['hidden_act']!r} is not supported (silu)")
    return common


def _mixtral_from_hf(hf: Mapping[str, Any], family: Family, common: dict[str, Any]) -> ModelConfig:
    n_layers = common["num_layers"]
    sw = int(hf.get("sliding_window") or 0)
    return ModelConfig(
        **{**common, "sliding_windows": (sw,) * n_layers},
        ffn_kinds=(FFNKind.MOE,) * n_layers,
        num_experts=_num_experts(hf),
        top_k=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf["intermediate_size"]),
        router=RouterKind.SOFTMAX,
        norm_topk_prob=True,
    )


def _qwen_windows(hf: Mapping[str, Any], family: Family, n_layers: int) -> tuple[int, ...]:
    """Per-layer sliding windows of a Qwen2-MoE / Qwen3-MoE config (0: full attention)."""
    g = hf.get
    if not (g("use_sliding_window") and g("sliding_window")):
        return (0,) * n_layers
    if family == Family.QWEN3_MOE:
        return (int(hf["sliding_window"]),) * n_layers
    layer_types = g("layer_types")
    if layer_types is None:
        mwl = int(g("max_window_layers", n_layers))
        layer_types = ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention"
                       for i in range(n_layers)]
    return tuple(int(hf["sliding_window"]) if t == "sliding_attention" else 0 for t in layer_types)


def _qwen_moe_from_hf(hf: Mapping[str, Any], family: Family, common: dict[str, Any]) -> ModelConfig:
    g = hf.get
    n_layers = common["num_layers"]
    n_exp = _num_experts(hf)
    step = int(g("decoder_sparse_step", 1) or 1)
    mlp_only = set(g("mlp_only_layers") or ())
    kinds = tuple(
        FFNKind.MOE if (i not in mlp_only and n_exp > 0 and (i + 1) % step == 0) else FFNKind.DENSE
        for i in range(n_layers)
    )
    qwen2 = family == Family.QWEN2_MOE
    shared = int(g("shared_expert_intermediate_size", 0) or 0) if qwen2 else 0
    return ModelConfig(
        **{**common, "sliding_windows": _qwen_windows(hf, family, n_layers)},
        qkv_bias=bool(g("qkv_bias", True)) if qwen2 else bool(g("attention_bias", False)),
        o_bias=not qwen2 and bool(g("attention_bias", False)),
        qk_norm=QKNorm.NONE if qwen2 else QKNorm.PER_HEAD,
        ffn_kinds=kinds,
        dense_intermediate_size=int(g("intermediate_size", 0) or 0),
        num_experts=n_exp,
        top_k=int(g("num_experts_per_tok", 0)),
        moe_intermediate_size=int(g("moe_intermediate_size", 0)),
        shared_intermediate_size=shared,
        shared_expert_gate=shared > 0,
        router=RouterKind.SOFTMAX,
        norm_topk_prob=bool(g("norm_topk_prob", False)),
    )


def _olmoe_from_hf(hf: Mapping[str, Any], family: Family, common: dict[str, Any]) -> ModelConfig:
    g = hf.get
    bias = bool(g("attention_bias", False))
    return ModelConfig(
        **common,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QKNorm.FULL,
        clip_qkv=g("clip_qkv"),
        ffn_kinds=(FFNKind.MOE,) * common["num_layers"],
        num_experts=_num_experts(hf),
        top_k=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf["intermediate_size"]),
        router=RouterKind.SOFTMAX,
        norm_topk_prob=bool(g("norm_topk_prob", False)),
    )


def _deepseek_router(hf: Mapping[str, Any], family: Family) -> tuple[RouterKind, RopeStyle, bool]:
    """(router, rope style, renormalise the top-k weights) of a DeepSeek-V2 / V3 config."""
    g = hf.get
    if family == Family.DEEPSEEK_V3:
        scoring = g("scoring_func", "sigmoid")
        if scoring != "sigmoid":
            raise ConfigError(f"deepseek_v3 scoring_func {scoring!r} is not supported (sigmoid)")
        style = RopeStyle.INTERLEAVED_SPLIT if g("rope_interleave", True) else RopeStyle.HALF
        return RouterKind.SIGMOID_GROUPED, style, bool(g("norm_topk_prob", True))
    method = g("topk_method", "greedy")
    if method == "greedy":
        router = RouterKind.SOFTMAX
    elif method == "group_limited_greedy":
        router = RouterKind.SOFTMAX_GROUP_LIMITED
    else:
        raise ConfigError(f"deepseek_v2 topk_method {method!r} is not supported")
    # transformers' DeepSeek-V2 router never renormalises the top-k weights.
    return router, RopeStyle.INTERLEAVED, False


def _deepseek_from_hf(hf: Mapping[str, Any], family: Family, common: dict[str, Any]) -> ModelConfig:
    """DeepSeek V2 / V3: MLA attention, shared experts, first-k dense layers."""
    g = hf.get
    n_layers = common["num_layers"]
    n_exp = _num_experts(hf)
    first_dense = int(g("first_k_dense_replace", 0) or 0)
    freq = int(g("moe_layer_freq", 1) or 1)
    kinds = tuple(
        FFNKind.MOE if (n_exp > 0 and i >= first_dense and i % freq == 0) else FFNKind.DENSE
        for i in range(n_layers)
    )
    nope, rope_d, v_dim = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"]), int(hf["v_head_dim"])
    moe_inter = int(hf["moe_intermediate_size"])
    n_shared = int(g("n_shared_experts", 0) or 0)
    router, style, norm_topk = _deepseek_router(hf, family)
    return ModelConfig(
        **{**common, "head_dim": nope + rope_d, "num_kv_heads": common["num_heads"]},
        attention=AttentionKind.MLA,
        rope_style=style,
        qkv_bias=bool(g("attention_bias", False)),
        o_bias=bool(g("attention_bias", False)),
        q_lora_rank=g("q_lora_rank"),
        kv_lora_rank=int(hf["kv_lora_rank"]),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_d,
        v_head_dim=v_dim,
        ffn_kinds=kinds,
        dense_intermediate_size=int(g("intermediate_size", 0) or 0),
        num_experts=n_exp,
        top_k=int(g("num_experts_per_tok", 0) or 0),
        moe_intermediate_size=moe_inter,
        shared_intermediate_size=moe_inter * n_shared,
        router=router,
        norm_topk_prob=norm_topk,
        routed_scaling_factor=float(g("routed_scaling_factor", 1.0) or 1.0),
        n_group=int(g("n_group") or 1),
        topk_group=int(g("topk_group") or 1),
        router_bias=family == Family.DEEPSEEK_V3,
    )


_FAMILY_FROM_HF = {
    Family.MIXTRAL: _mixtral_from_hf,
    Family.QWEN2_MOE: _qwen_moe_from_hf,
    Family.QWEN3_MOE: _qwen_moe_from_hf,
    Family.OLMOE: _olmoe_from_hf,
    Family.DEEPSEEK_V2: _deepseek_from_hf,
    Family.DEEPSEEK_V3: _deepseek_from_hf,
}


def load_hf_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found (an HF model directory holds config.json)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return from_hf_config(hf, source=path)
