"""Import an HF safetensors model directory into the engine's parameter layout (crosspool_jax.models.params).

Reads `config.json` (via `load_hf_config`) and `model.safetensors` or the shards listed in
`model.safetensors.index.json`. Tensors are memory-mapped (the safetensors header is parsed here, so
bfloat16 works without torch), and every leaf of our tree is a lazy "source" that reads only the
slice it is asked for: with `shardings`, each device's shard is read straight from the files by
`jax.make_array_from_callback`, so no whole model is staged on one device or in host memory.

HF Linear weights are `[out, in]`; our matrices are `[in, out]`, so matrices are transposed on read.
Expert tensors come per expert (`experts.E.{gate,up,down}_proj` / Mixtral `w1,w3,w2`) or fused
(`experts.gate_up_proj [E, 2I, D]`, `experts.down_proj [E, D, I]`); both give the same tree.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from crosspool_jax.errors import CheckpointError
from crosspool_jax.models.config import AttentionKind, Family, ModelConfig, load_hf_config
from crosspool_jax.models.params import ModelWeights, flatten, param_dtype, unflatten, weight_specs

Index = tuple[slice, ...]

# safetensors dtype name -> numpy dtype; only these are supported.
_ST_DTYPES: dict[str, Any] = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
}
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")


# ---- lazy sources ----------------------------------------------------------------------------------


class _Source:
    """A lazily read array: `shape`, and `read(idx)` returning the numpy block at `idx` (step-1 slices)."""

    shape: tuple[int, ...]

    def read(self, idx: Index) -> np.ndarray:
        raise NotImplementedError


class _Tensor(_Source):
    """One tensor of a safetensors file, memory-mapped (nothing is read until `read`)."""

    def __init__(self, file: _SafetensorsFile, name: str):
        self.file, self.name = file, name
        info = file.header[name]
        self.shape = tuple(int(s) for s in info["shape"])
        self.st_dtype = str(info["dtype"])

    def read(self, idx: Index) -> np.ndarray:
        return np.asarray(self.file.view(self.name)[idx])


class _SwapLast(_Source):
    """The source with its last two axes swapped ([.., out, in] -> [.., in, out])."""

    def __init__(self, src: _Source):
        self.src = src
        self.shape = (*src.shape[:-2], src.shape[-1], src.shape[-2])

    def read(self, idx: Index) -> np.ndarray:
        return np.swapaxes(self.src.read((*idx[:-2], idx[-1], idx[-2])), -1, -2)


class _ConcatLast(_Source):
    """Concatenation of same-shaped-but-last-axis sources along the last axis (gate columns, then up)."""

    def __init__(self, srcs: Sequence[_Source]):
        self.srcs = list(srcs)
        self.shape = (*srcs[0].shape[:-1], sum(s.shape[-1] for s in srcs))

    def read(self, idx: Index) -> np.ndarray:
        lo, hi = idx[-1].start, idx[-1].stop
        parts, off = [], 0
        for s in self.srcs:
            n = s.shape[-1]
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                parts.append(s.read((*idx[:-1], slice(a - off, b - off))))
            off += n
        return np.concatenate(parts, axis=-1)


class _Stack(_Source):
    """Sources of one shape stacked on a new leading axis (layers, or experts)."""

    def __init__(self, srcs: Sequence[_Source]):
        self.srcs = list(srcs)
        self.shape = (len(srcs), *srcs[0].shape)

    def read(self, idx: Index) -> np.ndarray:
        return np.stack([self.srcs[i].read(idx[1:]) for i in range(idx[0].start, idx[0].stop)])


def _full(shape: tuple[int, ...]) -> Index:
    return tuple(slice(0, n) for n in shape)


def _normalize(idx: Any, shape: tuple[int, ...]) -> Index:
    idx = tuple(idx) + (slice(None),) * (len(shape) - len(tuple(idx)))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(idx, shape, strict=True))


# ---- safetensors files -----------------------------------------------------------------------------


class _SafetensorsFile:
    """A safetensors file: header validated with the safetensors library, data memory-mapped."""

    def __init__(self, path: str):
        self.path = path
        try:
            with safe_open(path, framework="numpy"):
                pass
        except FileNotFoundError:
            raise CheckpointError(f"{path}: safetensors file not found") from None
        except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt data
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({msg})") from None
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header: dict[str, dict[str, Any]] = header
        self.data_start = 8 + n
        for name, info in header.items():
            end = info["data_offsets"][1]
            if self.data_start + end > size:
                raise CheckpointError(f"{path}: truncated safetensors file: tensor {name} runs past the end")
        self._mm: np.memmap | None = None

    def view(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped numpy array (its file dtype)."""
        info = self.header[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start)
        start, end = info["data_offsets"]
        return self._mm[start:end].view(dtype).reshape(info["shape"])


def _open_files(model_dir: str) -> dict[str, _Tensor]:
    """All tensors of the directory by name (single file or sharded via the index)."""
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        shard_names = sorted(set(weight_map.values()))
        missing = [s for s in shard_names if not os.path.isfile(os.path.join(model_dir, s))]
        if missing:
            raise CheckpointError(
                f"{index}: lists shard file(s) that do not exist: {', '.join(missing[:3])}"
                + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
            )
        files = {s: _SafetensorsFile(os.path.join(model_dir, s)) for s in shard_names}
        tensors: dict[str, _Tensor] = {}
        for name, shard in weight_map.items():
            if name not in files[shard].header:
                raise CheckpointError(f"{index}: maps tensor {name} to {shard}, which does not hold it")
            tensors[name] = _Tensor(files[shard], name)
        return tensors
    if os.path.isfile(single):
        f = _SafetensorsFile(single)
        return {name: _Tensor(f, name) for name in f.header}
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


# ---- name mapping ----------------------------------------------------------------------------------

# A-side per-layer leaf -> (HF suffix under model.layers.N., transposed)
_GQA_NAMES = {
    "input_norm": ("input_layernorm.weight", False),
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
}
_MLA_NAMES = {
    "input_norm": ("input_layernorm.weight", False),
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wq_a": ("self_attn.q_a_proj.weight", True),
    "q_a_norm": ("self_attn.q_a_layernorm.weight", False),
    "wq_b": ("self_attn.q_b_proj.weight", True),
    "bq_a": ("self_attn.q_a_proj.bias", False),
    "wkv_a": ("self_attn.kv_a_proj_with_mqa.weight", True),
    "kv_a_norm": ("self_attn.kv_a_layernorm.weight", False),
    "wkv_b": ("self_attn.kv_b_proj.weight", True),
    "bkv_a": ("self_attn.kv_a_proj_with_mqa.bias", False),
    "wo": ("self_attn.o_proj.weight", True),
    "bo": ("self_attn.o_proj.bias", False),
}


class _Planner:
    """Builds the lazy source of every leaf, checking presence and shapes of the HF tensors it uses."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, _Tensor]):
        self.cfg, self.tensors = cfg, tensors
        self.used: set[str] = set()
        self.missing: list[str] = []

    def get(self, name: str, want: tuple[int, ...], transpose: bool = False) -> _Source | None:
        """The HF tensor `name` (expected HF shape `want`), transposed on its last two axes if asked."""
        t = self.tensors.get(name)
        if t is None:
            self.missing.append(name)
            return None
        self.used.add(name)
        if t.shape != tuple(want):
            raise CheckpointError(
                f"{t.file.path}: tensor {name} has shape {list(t.shape)}, expected {list(want)}"
            )
        if t.st_dtype not in _ST_DTYPES:
            raise CheckpointError(
                f"{t.file.path}: tensor {name} has unsupported dtype {t.st_dtype} (supported: BF16, F16, F32)"
            )
        return _SwapLast(t) if transpose else t

    def linear(self, name: str, in_out: tuple[int, ...]) -> _Source | None:
        """An HF Linear weight read as [.., in, out] (`in_out` is our per-layer shape)."""
        return self.get(name, (*in_out[:-2], in_out[-1], in_out[-2]), transpose=True)

    def gate_up(self, gate: str, up: str, d: int, i: int) -> _Source | None:
        g, u = self.linear(gate, (d, i)), self.linear(up, (d, i))
        return None if g is None or u is None else _ConcatLast([g, u])

    @staticmethod
    def stack(srcs: Sequence[_Source | None]) -> _Source | None:
        return None if any(s is None for s in srcs) else _Stack(srcs)  # type: ignore[arg-type]

    def plan(self) -> dict[str, _Source | None]:
        cfg = self.cfg
        specs = {k: tuple(v.shape) for k, v in flatten(weight_specs(cfg)._asdict()).items()}
        out: dict[str, _Source | None] = {
            "attn/embed": self.get("model.embed_tokens.weight", specs["attn/embed"]),
            "attn/final_norm": self.get("model.norm.weight", specs["attn/final_norm"]),
        }
        if "attn/lm_head" in specs:
            out["attn/lm_head"] = self.linear("lm_head.weight", specs["attn/lm_head"])
        names = _GQA_NAMES if cfg.attention == AttentionKind.GQA else _MLA_NAMES
        for key, shape in specs.items():
            if not key.startswith("attn/layers/"):
                continue
            suffix, transposed = names[key.rsplit("/", 1)[1]]
            per = []
            for li in range(cfg.num_layers):
                name = f"model.layers.{li}.{suffix}"
                per.append(self.linear(name, shape[1:]) if transposed else self.get(name, shape[1:]))
            out[key] = self.stack(per)

        if "ffn/dense/w_gate_up" in specs:
            D, Id = cfg.hidden_size, cfg.dense_intermediate_size
            gu, dn = [], []
            for li in cfg.dense_layers:
                p = f"model.layers.{li}.mlp"
                gu.append(self.gate_up(f"{p}.gate_proj.weight", f"{p}.up_proj.weight", D, Id))
                dn.append(self.linear(f"{p}.down_proj.weight", (Id, D)))
            out["ffn/dense/w_gate_up"], out["ffn/dense/w_down"] = self.stack(gu), self.stack(dn)
        if "ffn/moe/router" in specs:
            out |= self._moe(specs)
        return out

    def _moe(self, specs: dict[str, tuple[int, ...]]) -> dict[str, _Source | None]:
        cfg = self.cfg
        D, E, Im, Is = (
            cfg.hidden_size,
            cfg.num_experts,
            cfg.moe_intermediate_size,
            cfg.shared_intermediate_size,
        )
        mixtral = cfg.family == Family.MIXTRAL
        g_name, u_name, d_name = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        shared = "shared_expert" if cfg.family == Family.QWEN2_MOE else "shared_experts"
        cols: dict[str, list[_Source | None]] = {k: [] for k in specs if k.startswith("ffn/moe/")}
        for li in cfg.moe_layers:
            p = f"model.layers.{li}.mlp"
            if mixtral and f"{p}.gate.weight" not in self.tensors:
                p = f"model.layers.{li}.block_sparse_moe"
            cols["ffn/moe/router"].append(self.linear(f"{p}.gate.weight", (D, E)))
            if "ffn/moe/router_bias" in cols:
                cols["ffn/moe/router_bias"].append(self.get(f"{p}.gate.e_score_correction_bias", (E,)))
            if f"{p}.experts.gate_up_proj" in self.tensors or f"{p}.experts.down_proj" in self.tensors:
                cols["ffn/moe/w_gate_up"].append(self.linear(f"{p}.experts.gate_up_proj", (E, D, 2 * Im)))
                cols["ffn/moe/w_down"].append(self.linear(f"{p}.experts.down_proj", (E, Im, D)))
            else:
                ex = f"{p}.experts"
                gu = [
                    self.gate_up(f"{ex}.{e}.{g_name}.weight", f"{ex}.{e}.{u_name}.weight", D, Im)
                    for e in range(E)
                ]
                dn = [self.linear(f"{ex}.{e}.{d_name}.weight", (Im, D)) for e in range(E)]
                cols["ffn/moe/w_gate_up"].append(self.stack(gu))
                cols["ffn/moe/w_down"].append(self.stack(dn))
            if "ffn/moe/shared_gate_up" in cols:
                s = f"{p}.{shared}"
                cols["ffn/moe/shared_gate_up"].append(
                    self.gate_up(f"{s}.gate_proj.weight", f"{s}.up_proj.weight", D, Is)
                )
                cols["ffn/moe/shared_down"].append(self.linear(f"{s}.down_proj.weight", (Is, D)))
            if "ffn/moe/shared_gate" in cols:
                cols["ffn/moe/shared_gate"].append(self.linear(f"{p}.shared_expert_gate.weight", (D, 1)))
        return {k: self.stack(v) for k, v in cols.items()}


def _harmless(name: str, t: _Tensor, cfg: ModelConfig) -> bool:
    """Tensors a checkpoint may carry that the model does not use and that are safe to skip."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    if "shared_expert" in name and 0 in t.shape:  # DeepSeek with n_shared_experts = 0
        return True
    if name == "lm_head.weight" and cfg.tie_word_embeddings:  # some tied checkpoints still save it
        return True
    # DeepSeek-V3 multi-token-prediction layers (model.layers.{num_layers + i}.*) are not used.
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(cfg.family == Family.DEEPSEEK_V3 and m and int(m.group(1)) >= cfg.num_layers)


def _describe(names: Sequence[str], n: int = 3) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _plan_checkpoint(model_dir: str, cfg: ModelConfig) -> dict[str, _Source]:
    tensors = _open_files(model_dir)
    planner = _Planner(cfg, tensors)
    plan = planner.plan()
    if planner.missing:
        raise CheckpointError(
            f"{model_dir}: {len(planner.missing)} tensor(s) missing for {cfg.family.value}: "
            f"{_describe(planner.missing)}"
        )
    extra = sorted(n for n in tensors if n not in planner.used and not _harmless(n, tensors[n], cfg))
    if extra:
        where = tensors[extra[0]].file.path
        raise CheckpointError(f"{where}: {len(extra)} unexpected tensor(s): {_describe(extra)}")
    return plan  # type: ignore[return-value]


# ---- public API ------------------------------------------------------------------------------------


def load_hf(
    model_dir: str | os.PathLike[str],
    *,
    dtype: Any = None,
    shardings: Any = None,
    progress: Callable[[str], None] | None = None,
    numpy: bool = False,
) -> tuple[ModelConfig, ModelWeights]:
    """Loads an HF MoE model directory as `(config, weights)` in the layout of crosspool_jax.models.params.

    dtype: the weights' dtype (bfloat16 | float16 | float32); None keeps the checkpoint's (cfg.dtype).
        The returned config's `dtype` is the dtype used. `router_bias` stays float32.
    shardings: optional `ModelWeights`-shaped pytree of `jax.sharding.Sharding` (same structure as
        `weight_specs(cfg)`), or one Sharding for every leaf; each device then reads only its slice.
        None: every leaf on the default device.
    progress: optional callback given one line per leaf loaded.
    numpy: numpy arrays in host memory instead (`shardings` ignored): no copy into a JAX device's
        buffers, for a caller that slices and places the pieces itself (the engine's loads).
    Raises ConfigError (config.json) or CheckpointError (files, tensors), each one line.
    """
    model_dir = os.fspath(model_dir)
    cfg = load_hf_config(model_dir)
    if dtype is not None:
        name = jnp.dtype(dtype).name
        if name not in SUPPORTED_DTYPES:
            raise CheckpointError(f"dtype {name} is not supported ({', '.join(SUPPORTED_DTYPES)})")
        cfg = cfg.replace(dtype=name)
    plan = _plan_checkpoint(model_dir, cfg)
    specs = flatten(weight_specs(cfg)._asdict())
    if shardings is None:
        shard_flat: dict[str, Any] = {}
    elif isinstance(shardings, jax.sharding.Sharding):
        shard_flat = dict.fromkeys(specs, shardings)
    else:
        tree = shardings._asdict() if isinstance(shardings, ModelWeights) else dict(shardings)
        shard_flat = flatten(tree)
        if set(shard_flat) != set(specs):
            raise CheckpointError(
                f"shardings do not match the weight tree of {model_dir}: "
                f"missing {_describe(sorted(set(specs) - set(shard_flat)))}; "
                f"extra {_describe(sorted(set(shard_flat) - set(specs)))}"
            )
    out: dict[str, jax.Array] = {}
    for key, spec in specs.items():
        src, shape = plan[key], tuple(spec.shape)
        assert src.shape == shape, (key, src.shape, shape)  # guaranteed by the per-tensor shape checks
        np_dtype = np.dtype(param_dtype(key, spec.dtype))

        def read(
            idx: Any, src: _Source = src, shape: tuple[int, ...] = shape, dt: np.dtype = np_dtype
        ) -> np.ndarray:
            return src.read(_normalize(idx, shape)).astype(dt, copy=False)

        sharding = shard_flat.get(key)
        if numpy:
            out[key] = np.array(read(_full(shape)))  # a copy: the file may be closed later
        elif sharding is None:
            out[key] = jnp.asarray(read(_full(shape)))
        else:
            out[key] = jax.make_array_from_callback(shape, sharding, read)
        if progress is not None:
            progress(f"loaded {key} {list(shape)} {np_dtype.name}")
    tree = unflatten(out)
    return cfg, ModelWeights(tree["attn"], tree.get("ffn", {}))
