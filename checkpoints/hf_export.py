"""Export a model in the engine's layout (crosspool_jax.models.params) as an HF transformers model directory.

The exact inverse of checkpoints/hf_import.py: `load_hf(dir)` of what `save_hf` writes gives back the
same `ModelConfig` (every field; `dtype` is the dtype written) and bit-identical weights (when no
dtype conversion was asked for). The directory is a real HF checkpoint: transformers'
`AutoModelForCausalLM.from_pretrained(dir)` loads it and computes the same logits (checked by
tests/test_hf_export.py against transformers 5.17 in `.venv-ref`).

    from checkpoints.hf_export import save_hf, byte_tokenizer_json
    save_hf("out/my-model", config, weights, tokenizer_json=byte_tokenizer_json())

writes:
    config.json              the HF config class's fields for the family (model_type, architectures,
                             sizes, rope_theta / rope_parameters / rope_scaling, bos/eos ids, MoE fields)
    generation_config.json   bos/eos ids
    model.safetensors        HF tensor names and layouts: Linear weights [out, in] (ours are [in, out]),
                             experts per expert (`block_sparse_moe.experts.E.w1/w2/w3` for Mixtral,
                             `mlp.experts.E.{gate,up,down}_proj` otherwise), as transformers' own
                             `save_pretrained` writes them. Above `max_shard_bytes`, shards
                             `model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`.
    tokenizer.json, tokenizer_config.json   when `tokenizer_json` is given

Stale weight files (shards, index) and, without `tokenizer_json`, a stale tokenizer.json /
tokenizer_config.json of an earlier save into the same directory are removed, so the directory
always describes exactly the model saved. Files are written under temporary names and renamed.

Families: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 (every family the importer
reads). A config that the family's config.json cannot express (say a Mixtral with qk-norm, a
Qwen2-MoE with an o_proj bias, DeepSeek dense layers that are not the first k, a shared expert size
that is not a multiple of moe_intermediate_size) raises ExportError naming the family and fields:
the written config.json is read back with the importer's reader and must give the same config.

DeepSeek rope: our MLA attention applies DeepSeek-V3's `rope_interleave` layout (and DeepSeek-V2's
complex form) to the HF weights as they are (RopeStyle), the importer permutes nothing, so neither
does the export.

`byte_tokenizer_json()` is a `tokenizers` tokenizer.json for checkpoints.tokenizer.ByteTokenizer
(ids 0..255 = UTF-8 bytes, 256 = bos `<|bos|>`, 257 = eos `<|eos|>`): encode/decode equal
ByteTokenizer's on any text (see its docstring).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from checkpoints.hf_import import _GQA_NAMES, _MLA_NAMES, SUPPORTED_DTYPES
from checkpoints.tokenizer import TOKENIZER_FILE
from crosspool_jax.errors import CrossPoolError
from crosspool_jax.models.config import (
    AttentionKind,
    ConfigError,
    Family,
    ModelConfig,
    RopeConfig,
    RopeStyle,
    RouterKind,
    from_hf_config,
)
from crosspool_jax.models.params import ModelWeights, flatten, weight_specs

__all__ = [
    "ARCHITECTURES",
    "ExportError",
    "byte_tokenizer_json",
    "hf_config_dict",
    "save_hf",
]


class ExportError(CrossPoolError, ValueError):
    """A model that cannot be written as an HF checkpoint (unsupported config, mismatched weights)."""


ARCHITECTURES: dict[Family, str] = {
    Family.MIXTRAL: "MixtralForCausalLM",
    Family.QWEN2_MOE: "Qwen2MoeForCausalLM",
    Family.QWEN3_MOE: "Qwen3MoeForCausalLM",
    Family.OLMOE: "OlmoeForCausalLM",
    Family.DEEPSEEK_V2: "DeepseekV2ForCausalLM",
    Family.DEEPSEEK_V3: "DeepseekV3ForCausalLM",
}
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_ST_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


# ---- config.json -----------------------------------------------------------------------------------


def _rope_to_hf(r: RopeConfig) -> dict[str, Any]:
    """HF `rope_parameters` for our RopeConfig (the inverse of config._rope_from_hf)."""
    d: dict[str, Any] = {"rope_type": r.rope_type, "rope_theta": r.theta}
    if r.rope_type == "default":
        return d
    d["factor"] = r.factor
    if r.original_max_position_embeddings is not None:
        d["original_max_position_embeddings"] = r.original_max_position_embeddings
    if r.rope_type == "yarn":
        d["beta_fast"], d["beta_slow"] = r.beta_fast, r.beta_slow
        if r.mscale is not None:
            d["mscale"] = r.mscale
        if r.mscale_all_dim:
            d["mscale_all_dim"] = r.mscale_all_dim
        if r.attention_factor is not None:
            d["attention_factor"] = r.attention_factor
        if not r.truncate:
            d["truncate"] = False
    return d


def _eos_json(ids: tuple[int, ...]) -> int | list[int] | None:
    if not ids:
        return None
    return int(ids[0]) if len(ids) == 1 else [int(i) for i in ids]


def _uniform_window(cfg: ModelConfig) -> int:
    """The one sliding window of the layers that have one (0: none); mixed windows fail the check."""
    nonzero = [w for w in cfg.sliding_windows if w]
    return max(nonzero) if nonzero else 0


def _first_moe_layer(cfg: ModelConfig) -> int:
    return cfg.moe_layers[0] if cfg.moe_layers else cfg.num_layers


def _family_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config.json fields of `cfg`'s family (beside the common ones)."""
    f = cfg.family
    bias = cfg.qkv_bias
    window = _uniform_window(cfg)
    if f == Family.MIXTRAL:
        return {
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.moe_intermediate_size,
            "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.top_k,
            "sliding_window": window or None,
            "router_jitter_noise": 0.0,
        }
    if f in (Family.QWEN2_MOE, Family.QWEN3_MOE):
        return _qwen_moe_fields(cfg, window)
    if f == Family.OLMOE:
        return {
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.moe_intermediate_size,
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.top_k,
            "norm_topk_prob": cfg.norm_topk_prob,
            "clip_qkv": cfg.clip_qkv,
            "attention_bias": bias,
        }
    return _deepseek_fields(cfg)  # DeepSeek V2 / V3


def _qwen_moe_fields(cfg: ModelConfig, window: int) -> dict[str, Any]:
    """`_family_fields` of Qwen2-MoE / Qwen3-MoE (`window`: the uniform sliding window, 0: none)."""
    bias = cfg.qkv_bias
    d: dict[str, Any] = {
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.dense_intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(cfg.dense_layers) if cfg.num_experts else [],
        "use_sliding_window": bool(window),
        "sliding_window": window or None,
    }
    if cfg.family == Family.QWEN2_MOE:
        d["shared_expert_intermediate_size"] = cfg.shared_intermediate_size
        d["qkv_bias"] = bias
        d["max_window_layers"] = cfg.num_layers
        d["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.sliding_windows]
    else:
        d["attention_bias"] = bias
    return d


def _deepseek_fields(cfg: ModelConfig) -> dict[str, Any]:
    """`_family_fields` of DeepSeek V2 / V3 (MLA, routed + shared experts, first dense layers)."""
    f = cfg.family
    bias = cfg.qkv_bias
    moe_i = cfg.moe_intermediate_size
    d = {
        "num_key_value_heads": cfg.num_heads,
        "head_dim": cfg.qk_rope_head_dim,  # what transformers' DeepseekV{2,3}Config sets
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "qk_head_dim": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "intermediate_size": cfg.dense_intermediate_size,
        "moe_intermediate_size": moe_i,
        "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        # a size that is not a multiple of moe_intermediate_size comes back different: the check fails
        "n_shared_experts": cfg.shared_intermediate_size // moe_i if moe_i else 0,
        "first_k_dense_replace": _first_moe_layer(cfg),
        "moe_layer_freq": 1,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob,
        "attention_bias": bias,
    }
    if f == Family.DEEPSEEK_V3:
        d |= {
            "rope_interleave": cfg.rope_style == RopeStyle.INTERLEAVED_SPLIT,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "num_nextn_predict_layers": 0,  # no multi-token-prediction layers are written
        }
    else:
        d["topk_method"] = (
            "group_limited_greedy" if cfg.router == RouterKind.SOFTMAX_GROUP_LIMITED else "greedy"
        )
    return d


def _config_diff(want: ModelConfig, got: ModelConfig) -> list[str]:
    out = []
    for f in dataclasses.fields(ModelConfig):
        a, b = getattr(want, f.name), getattr(got, f.name)
        if a != b:
            out.append(f"{f.name} (ours {a!r}, config.json gives {b!r})")
    return out


def hf_config_dict(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """The HF config.json of `cfg` (dtype: the `dtype` field; default cfg.dtype).

    Raises ExportError when the family's config.json cannot express `cfg`: the dict is read back with
    the importer's reader (crosspool_jax.models.config.from_hf_config) and must give `cfg` again.
    """
    dtype = dtype or cfg.dtype
    arch = ARCHITECTURES.get(cfg.family)
    if arch is None:
        raise ExportError(
            f"cannot export family {cfg.family!r}: "
            f"supported families are {', '.join(f.value for f in Family)}"
        )
    rope = _rope_to_hf(cfg.rope)
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": cfg.family.value,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": cfg.hidden_act,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": _eos_json(cfg.eos_token_ids),
        "pad_token_id": None,
        "rope_theta": cfg.rope.theta,  # transformers 4.x reads rope_theta (+ rope_scaling)
        "rope_parameters": rope,  # transformers 5 reads rope_parameters
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
    }
    if cfg.rope.rope_type != "default":
        hf["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    hf |= _family_fields(cfg)
    hf = json.loads(json.dumps(hf))  # exactly what the file will hold
    try:
        back = from_hf_config(hf, source=f"the {cfg.family.value} config.json")
    except ConfigError as e:
        raise ExportError(f"cannot export this {cfg.family.value} model: {e}") from None
    diff = _config_diff(cfg.replace(dtype=dtype), back)
    if diff:
        raise ExportError(
            f"cannot export this {cfg.family.value} model: an HF {cfg.family.value} config.json cannot "
            f"express {'; '.join(diff)}"
        )
    return dict(sorted(hf.items()))


# ---- tensors ---------------------------------------------------------------------------------------


_WHOLE_LEAF_BYTES = 1 << 30
_WHOLE_BUDGET_BYTES = 4 << 30


@jax.jit
def _take(a: jax.Array, i: jax.Array) -> jax.Array:
    return a[i]  # a traced index: one compilation per leaf, not one per index


class _Leaves:
    """Host (numpy) copies of weight leaves for the writer, which visits every leaf once per layer.

    A leaf up to 1 GiB is copied to the host once and kept (up to 4 GiB of them in all); a bigger one
    is read one index of its leading axis at a time (the last few kept), so exporting a large model
    never holds a whole-model host copy.
    """

    def __init__(self, flat: Mapping[str, Any], keep: int = 4):
        self.flat, self.keep = flat, keep
        self._whole: dict[str, np.ndarray] = {}
        self._whole_bytes = 0
        self._parts: collections.OrderedDict[tuple[str, int], np.ndarray] = collections.OrderedDict()

    def get(self, key: str, i: int | None = None) -> np.ndarray:
        if key in self._whole:
            w = self._whole[key]
            return w if i is None else w[i]
        a = self.flat[key]
        nbytes = int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
        small = nbytes <= _WHOLE_LEAF_BYTES and self._whole_bytes + nbytes <= _WHOLE_BUDGET_BYTES
        if i is None or isinstance(a, np.ndarray) or small:
            w = np.asarray(a)
            if small:
                self._whole[key] = w
                self._whole_bytes += nbytes
            return w if i is None else w[i]
        k = (key, i)
        if k not in self._parts:
            self._parts[k] = np.asarray(_take(a, jnp.int32(i)))
            while len(self._parts) > self.keep:
                self._parts.popitem(last=False)
        self._parts.move_to_end(k)
        return self._parts[k]


@dataclasses.dataclass
class _Out:
    """One HF tensor to write: name, shape, dtype name and how to get its value."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    value: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _NP_DTYPES[self.dtype].itemsize


def _plan(cfg: ModelConfig, flat: Mapping[str, Any], dtype: str) -> list[_Out]:
    """Every HF tensor of the model, in the importer's naming (the inverse of hf_import._Planner)."""
    leaves = _Leaves(flat)
    out: list[_Out] = []

    def add(
        name: str,
        key: str,
        idx: tuple[int, ...] = (),
        transpose: bool = False,
        cols: slice | None = None,
        dt: str = dtype,
    ) -> None:
        """HF tensor `name` = leaf `key` at leading indices `idx`, columns `cols`, last axes swapped."""
        s = tuple(flat[key].shape[len(idx) :])
        if cols is not None:
            s = (*s[:-1], len(range(*cols.indices(s[-1]))))
        if transpose:
            s = (*s[:-2], s[-1], s[-2])

        def value() -> np.ndarray:
            a = leaves.get(key, idx[0]) if idx else leaves.get(key)
            a = a[idx[1:]] if len(idx) > 1 else a
            if cols is not None:
                a = a[..., cols]
            return np.swapaxes(a, -1, -2) if transpose else a

        out.append(_Out(name, s, dt, value))

    add("model.embed_tokens.weight", "attn/embed")
    names = _GQA_NAMES if cfg.attention == AttentionKind.GQA else _MLA_NAMES
    layer_keys = sorted(k for k in flat if k.startswith("attn/layers/"))
    dense_at = {li: j for j, li in enumerate(cfg.dense_layers)}
    moe_at = {li: j for j, li in enumerate(cfg.moe_layers)}
    mixtral = cfg.family == Family.MIXTRAL
    g_name, u_name, d_name = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    shared = "shared_expert" if cfg.family == Family.QWEN2_MOE else "shared_experts"
    for li in range(cfg.num_layers):
        lp = f"model.layers.{li}"
        for key in layer_keys:
            suffix, transposed = names[key.rsplit("/", 1)[1]]
            add(f"{lp}.{suffix}", key, (li,), transpose=transposed)
        if li in dense_at:  # gate columns first, then up
            j, i_d = dense_at[li], cfg.dense_intermediate_size
            p = f"{lp}.mlp"
            add(f"{p}.gate_proj.weight", "ffn/dense/w_gate_up", (j,), True, slice(0, i_d))
            add(f"{p}.up_proj.weight", "ffn/dense/w_gate_up", (j,), True, slice(i_d, 2 * i_d))
            add(f"{p}.down_proj.weight", "ffn/dense/w_down", (j,), True)
        if li in moe_at:
            j, i_m, i_s = moe_at[li], cfg.moe_intermediate_size, cfg.shared_intermediate_size
            p = f"{lp}.block_sparse_moe" if mixtral else f"{lp}.mlp"
            add(f"{p}.gate.weight", "ffn/moe/router", (j,), transpose=True)
            if "ffn/moe/router_bias" in flat:
                # float32 on disk, as in the official DeepSeek-V3 checkpoints (the loader keeps it float32)
                add(f"{p}.gate.e_score_correction_bias", "ffn/moe/router_bias", (j,), dt="float32")
            for e in range(cfg.num_experts):
                ex = f"{p}.experts.{e}"
                add(f"{ex}.{g_name}.weight", "ffn/moe/w_gate_up", (j, e), True, slice(0, i_m))
                add(f"{ex}.{u_name}.weight", "ffn/moe/w_gate_up", (j, e), True, slice(i_m, 2 * i_m))
                add(f"{ex}.{d_name}.weight", "ffn/moe/w_down", (j, e), True)
            if "ffn/moe/shared_gate_up" in flat:
                s = f"{p}.{shared}"
                add(f"{s}.gate_proj.weight", "ffn/moe/shared_gate_up", (j,), True, slice(0, i_s))
                add(f"{s}.up_proj.weight", "ffn/moe/shared_gate_up", (j,), True, slice(i_s, 2 * i_s))
                add(f"{s}.down_proj.weight", "ffn/moe/shared_down", (j,), True)
            elif cfg.attention == AttentionKind.MLA:
                # transformers' DeepSeek builds shared_experts even for n_shared_experts 0 and saves
                # 0-sized tensors; write them too, so it finds every tensor it expects
                s, d = f"{p}.{shared}", cfg.hidden_size
                for proj, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                    out.append(_Out(f"{s}.{proj}.weight", shape, dtype, lambda shape=shape: np.zeros(shape)))
            if "ffn/moe/shared_gate" in flat:
                add(f"{p}.shared_expert_gate.weight", "ffn/moe/shared_gate", (j,), transpose=True)
    add("model.norm.weight", "attn/final_norm")
    if "attn/lm_head" in flat:
        add("lm_head.weight", "attn/lm_head", transpose=True)
    return out


def _check_weights(cfg: ModelConfig, weights: ModelWeights) -> dict[str, Any]:
    """The flat weight tree, checked against weight_specs(cfg) (keys and shapes)."""
    if not isinstance(weights, ModelWeights):
        weights = ModelWeights(*weights)
    flat = flatten({"attn": dict(weights.attn), "ffn": dict(weights.ffn)})
    specs = flatten(weight_specs(cfg)._asdict())
    missing, extra = sorted(set(specs) - set(flat)), sorted(set(flat) - set(specs))
    if missing or extra:
        raise ExportError(
            f"the weights do not match the {cfg.family.value} config: "
            f"missing {missing[:3] or 'none'}, unexpected {extra[:3] or 'none'}"
        )
    bad = [
        f"{k} {list(flat[k].shape)} (expected {list(specs[k].shape)})"
        for k in specs
        if tuple(flat[k].shape) != tuple(specs[k].shape)
    ]
    if bad:
        raise ExportError(f"the weights do not match the {cfg.family.value} config: {'; '.join(bad[:3])}")
    return flat


# ---- files -----------------------------------------------------------------------------------------


def _write_safetensors(path: str, tensors: list[_Out]) -> None:
    """A safetensors file written tensor by tensor (only one tensor's bytes in memory at a time)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for t in tensors:
        end = off + t.nbytes
        header[t.name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, end]}
        off = end
    blob = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            a = np.ascontiguousarray(np.asarray(t.value()).astype(_NP_DTYPES[t.dtype], copy=False))
            if a.shape != t.shape:  # guaranteed by _check_weights; a bug here must not write a bad file
                raise AssertionError(f"{t.name}: shape {a.shape} != planned {t.shape}")
            f.write(a.tobytes())
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _shards(tensors: list[_Out], max_bytes: int) -> list[list[_Out]]:
    out: list[list[_Out]] = [[]]
    size = 0
    for t in tensors:
        if out[-1] and size + t.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.nbytes
    return out


def _tokenizer_text(tokenizer_json: str) -> str:
    """tokenizer.json content from either its text or the path of a file."""
    s = tokenizer_json.lstrip()
    if s.startswith("{"):
        return tokenizer_json
    if os.path.isfile(tokenizer_json):
        with open(tokenizer_json, encoding="utf-8") as f:
            return f.read()
    raise ExportError(
        f"tokenizer_json is neither tokenizer.json text nor an existing file: {tokenizer_json[:80]!r}"
    )


def _tokenizer_files(cfg: ModelConfig, tokenizer_json: str) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json), the tokenizer checked with the `tokenizers` library."""
    from tokenizers import Tokenizer

    text = _tokenizer_text(tokenizer_json)
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON / unknown models
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"tokenizer_json is not a valid tokenizer.json ({msg})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > cfg.vocab_size:
        raise ExportError(f"the tokenizer has {n} tokens, more than the model's vocab_size {cfg.vocab_size}")
    tc: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    bos = tok.id_to_token(cfg.bos_token_id) if cfg.bos_token_id is not None else None
    eos = tok.id_to_token(cfg.eos_token_ids[0]) if cfg.eos_token_ids else None
    if bos is not None:
        tc["bos_token"] = bos
    if eos is not None:
        tc["eos_token"] = eos
    return text, tc


def _remove_stale(out_dir: str, keep: set[str], tokenizer: bool) -> None:
    for name in os.listdir(out_dir):
        if name in keep:
            continue
        stale = name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE) or _SHARD_RE.match(name)
        if not tokenizer and name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            stale = True
        if stale:
            os.remove(os.path.join(out_dir, name))


def save_hf(
    out_dir: str | os.PathLike[str],
    config: ModelConfig,
    weights: ModelWeights,
    tokenizer_json: str | None = None,
    dtype: Any = None,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Writes `(config, weights)` as an HF transformers model directory (module docstring).

    tokenizer_json: tokenizer.json text, or the path of a tokenizer.json file; with it, tokenizer.json
        and tokenizer_config.json (bos/eos token names from config's bos/eos ids) are written.
    dtype: dtype of the written tensors (bfloat16 | float16 | float32); None keeps the weights' dtype.
        DeepSeek-V3's e_score_correction_bias is always written in float32.
    max_shard_bytes: above this, the weights are split into shards with an index.
    Raises ExportError for a config the family's config.json cannot express or weights that do not
    match the config.
    """
    out_dir = os.fspath(out_dir)
    flat = _check_weights(config, weights)
    try:
        name = jnp.dtype(dtype if dtype is not None else flat["attn/embed"].dtype).name
    except TypeError:
        name = str(dtype)
    if name not in SUPPORTED_DTYPES:
        raise ExportError(f"dtype {name} is not supported ({', '.join(SUPPORTED_DTYPES)})")
    hf = hf_config_dict(config, name)
    tok = _tokenizer_files(config, tokenizer_json) if tokenizer_json is not None else None
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir}: exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)

    tensors = _plan(config, flat, name)
    shards = _shards(tensors, max(int(max_shard_bytes), 1))
    written = {CONFIG_FILE, GENERATION_CONFIG_FILE}
    if len(shards) == 1:
        _write_safetensors(os.path.join(out_dir, WEIGHTS_FILE), shards[0])
        written.add(WEIGHTS_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(os.path.join(out_dir, fname), shard)
            weight_map |= {t.name: fname for t in shard}
            written.add(fname)
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        _write_json(os.path.join(out_dir, WEIGHTS_INDEX_FILE), index)
        written.add(WEIGHTS_INDEX_FILE)
    _write_json(os.path.join(out_dir, CONFIG_FILE), hf)
    gen = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}
    _write_json(os.path.join(out_dir, GENERATION_CONFIG_FILE), gen)
    if tok is not None:
        _write_text(os.path.join(out_dir, TOKENIZER_FILE), tok[0])
        _write_json(os.path.join(out_dir, TOKENIZER_CONFIG_FILE), tok[1])
        written |= {TOKENIZER_FILE, TOKENIZER_CONFIG_FILE}
    _remove_stale(out_dir, written, tokenizer=tok is not None)


# ---- the byte-level tokenizer ----------------------------------------------------------------------

BYTE_BOS_TOKEN = "<|bos|>"
BYTE_EOS_TOKEN = "<|eos|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the one the ByteLevel pre-tokenizer/decoder use)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def byte_tokenizer_json() -> str:
    """tokenizer.json for checkpoints.tokenizer.ByteTokenizer (ids 0..255 = bytes, 256 bos, 257 eos).

    A byte-level BPE with no merges: the ByteLevel pre-tokenizer (no regex split, no prefix space) maps
    the UTF-8 bytes of the text to GPT-2's byte characters, each of which is one token whose id is the
    byte's value, so `encode(text).ids == list(text.encode())` on any text. bos `<|bos|>` (256) and eos
    `<|eos|>` (257) are vocabulary entries that no merge can build, not added tokens: so a text that
    contains the literal string "<|bos|>" still encodes to its bytes (as with ByteTokenizer), and a
    Replace decoder step turns them into "" (ByteTokenizer drops them too). The ByteLevel decoder
    joins all bytes and decodes them as UTF-8 with replacement characters for invalid sequences.
    tokenizer_config.json names them as bos_token / eos_token (checkpoints.tokenizer.HFTokenizer reads
    the ids from there).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    vocab[BYTE_BOS_TOKEN], vocab[BYTE_EOS_TOKEN] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(BYTE_BOS_TOKEN, ""), decoders.Replace(BYTE_EOS_TOKEN, ""), decoders.ByteLevel()]
    )
    return tok.to_str(pretty=True)
