"""Checkpoints: HF safetensors import, the engine's own orbax format, tokenizers, and `load_model`.

`load_model(path)` accepts either an HF model directory (config.json + safetensors) or a directory
written by `checkpoints.orbax_format.save` (crosspool_config.json + weights/).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from checkpoints.hf_import import load_hf
from checkpoints.orbax_format import is_crosspool_checkpoint, load_config, restore, save
from checkpoints.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from crosspool_jax.errors import CheckpointError
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.params import ModelWeights

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "LoadedModel",
    "Tokenizer",
    "is_crosspool_checkpoint",
    "is_hf_checkpoint",
    "load_hf",
    "load_model",
    "load_tokenizer",
    "read_config",
    "restore",
    "save",
]


class LoadedModel(NamedTuple):
    """A model ready to run: config, weights (A-side/F-side trees), tokenizer (None when absent)."""

    config: ModelConfig
    weights: ModelWeights
    tokenizer: HFTokenizer | None


def is_hf_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when `path` looks like an HF model directory (config.json present)."""
    return os.path.isfile(os.path.join(path, "config.json"))


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig of an HF directory or a crosspool checkpoint, without reading its weights."""
    from crosspool_jax.models.config import load_hf_config

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: not a directory (expected an HF model directory or a crosspool checkpoint)"
        )
    if is_crosspool_checkpoint(path):
        return load_config(path)
    if is_hf_checkpoint(path):
        return load_hf_config(path)
    raise CheckpointError(
        f"{path}: neither an HF model directory (config.json) "
        "nor a crosspool checkpoint (crosspool_config.json)"
    )


def load_model(
    path: str | os.PathLike[str], *, dtype: Any = None, shardings: Any = None, numpy: bool = False
) -> LoadedModel:
    """Loads an HF directory or a crosspool checkpoint (detected by its files).

    dtype: weights dtype (bfloat16 | float16 | float32); None keeps the stored one.
    shardings: `ModelWeights`-shaped pytree of Shardings (or one Sharding); None: default device.
    numpy: numpy arrays in host memory instead of JAX arrays (`shardings` ignored).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: not a directory (expected an HF model directory or a crosspool checkpoint)"
        )
    if is_crosspool_checkpoint(path):
        cfg, weights = restore(path, shardings, dtype=dtype, numpy=numpy)
    elif is_hf_checkpoint(path):
        cfg, weights = load_hf(path, dtype=dtype, shardings=shardings, numpy=numpy)
    else:
        raise CheckpointError(
            f"{path}: neither an HF model directory (config.json) "
            "nor a crosspool checkpoint (crosspool_config.json)"
        )
    return LoadedModel(cfg, weights, load_tokenizer(path))
