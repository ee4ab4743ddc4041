"""The engine's own checkpoint format: an orbax-checkpoint PyTree of the weights plus our config.

Layout of a checkpoint directory:
    crosspool_config.json   ModelConfig.to_json() (its `dtype` is the stored weights' dtype)
    weights/                orbax PyTree checkpoint of {"attn": ..., "ffn": ...} (crosspool_jax.models.params)
    tokenizer.json          optional, copied from the HF directory

`restore` reads each array straight onto the requested target sharding, which may be on a different
mesh (other devices, other partitioning) than the one the arrays were saved from.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from crosspool_jax.errors import CheckpointError
from crosspool_jax.models.config import ConfigError, ModelConfig
from crosspool_jax.models.params import ModelWeights, flatten, weight_specs

CONFIG_FILE = "crosspool_config.json"
WEIGHTS_DIR = "weights"


def is_crosspool_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a directory holding our config file (a checkpoint in this format)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def _as_tree(weights: ModelWeights) -> dict[str, Any]:
    return {"attn": weights.attn, "ffn": weights.ffn}


def save(
    out_dir: str | os.PathLike[str],
    cfg: ModelConfig,
    weights: ModelWeights,
    tokenizer_json_path: str | os.PathLike[str] | None = None,
    *,
    compress: bool = True,
) -> None:
    """Writes `weights` (arrays on any sharding) and `cfg` to `out_dir`; copies the tokenizer if given.

    compress: zstd-compress the arrays (orbax's default); False writes them raw: larger on disk,
    faster to write and to read back (a checkpoint the disk tier of sleeping models re-reads).

    `out_dir` may exist but must not already hold a `weights/` checkpoint. The arrays must match
    `weight_specs(cfg)` in shape (CheckpointError otherwise).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    specs = flatten(_as_tree(weight_specs(cfg)))
    got = flatten(_as_tree(weights))
    if set(specs) != set(got):
        raise CheckpointError(
            f"{out_dir}: weights do not match the config's tree "
            f"(missing {sorted(set(specs) - set(got))[:3]}, extra {sorted(set(got) - set(specs))[:3]})"
        )
    for k, s in specs.items():
        if tuple(got[k].shape) != tuple(s.shape):
            raise CheckpointError(
                f"{out_dir}: weight {k} has shape {list(got[k].shape)}, expected {list(s.shape)}"
            )
    weights_dir = os.path.join(out_dir, WEIGHTS_DIR)
    if os.path.exists(weights_dir):
        raise CheckpointError(f"{weights_dir}: already exists; refusing to overwrite")
    os.makedirs(out_dir, exist_ok=True)
    ckptr = ocp.StandardCheckpointer() if compress else ocp.PyTreeCheckpointer(use_compression=False)
    ckptr.save(weights_dir, _as_tree(weights))
    if isinstance(ckptr, ocp.AsyncCheckpointer):  # PyTreeCheckpointer saves synchronously
        ckptr.wait_until_finished()
    ckptr.close()
    if tokenizer_json_path is not None:
        shutil.copyfile(tokenizer_json_path, os.path.join(out_dir, "tokenizer.json"))
        tc = os.path.join(os.path.dirname(os.fspath(tokenizer_json_path)), "tokenizer_config.json")
        if os.path.isfile(tc):
            shutil.copyfile(tc, os.path.join(out_dir, "tokenizer_config.json"))
    # The config is written last: its presence marks a complete checkpoint.
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(cfg.to_json(), f, indent=1)


def load_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The ModelConfig stored in a checkpoint directory."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    try:
        with open(cfg_path) as f:
            return ModelConfig.from_json(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: not found (not a crosspool checkpoint)") from None
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: not a valid crosspool config ({e!r})") from None


def restore(
    path: str | os.PathLike[str], shardings: Any = None, *, dtype: Any = None, numpy: bool = False
) -> tuple[ModelConfig, ModelWeights]:
    """Reads a checkpoint written by `save` as `(config, weights)`.

    shardings: `ModelWeights`-shaped pytree of `jax.sharding.Sharding` (structure of
        `weight_specs(cfg)`), or one Sharding for all leaves; None: the first local device.
    dtype: cast the weights on restore (router_bias stays float32); None keeps the stored dtype.
    numpy: numpy arrays in host memory instead (`shardings` ignored): no copy into a JAX device's
        buffers, for a caller that slices and places the pieces itself (the engine's loads).
    """
    path = os.path.abspath(os.fspath(path))
    cfg = load_config(path)
    if dtype is not None:
        cfg = cfg.replace(dtype=jax.numpy.dtype(dtype).name)
    specs = _as_tree(weight_specs(cfg))
    weights_dir = os.path.join(path, WEIGHTS_DIR)
    if numpy:  # tensorstore reads each leaf straight into a numpy array
        args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), specs)
        make, kwargs = ocp.PyTreeCheckpointer, {"args": ocp.args.PyTreeRestore(restore_args=args)}
    else:
        if shardings is None:
            shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if isinstance(shardings, jax.sharding.Sharding):
            shard_tree = jax.tree.map(lambda _: shardings, specs)
        else:
            shard_tree = _as_tree(shardings) if isinstance(shardings, ModelWeights) else dict(shardings)
        try:
            target = jax.tree.map(
                lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs, shard_tree
            )
        except ValueError as e:
            raise CheckpointError(f"{path}: shardings do not match the weight tree ({e})") from None
        make, kwargs = ocp.StandardCheckpointer, {"target": target}
    if not os.path.isdir(weights_dir):
        raise CheckpointError(f"{weights_dir}: missing (broken crosspool checkpoint)")
    ckptr = make()
    try:
        tree = ckptr.restore(weights_dir, **kwargs)
    except Exception as e:  # orbax/tensorstore raise many types (ValueError, FileNotFoundError, ...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{weights_dir}: cannot restore weights ({type(e).__name__}: {msg[:300]})"
        ) from None
    finally:
        ckptr.close()
    return cfg, ModelWeights(tree["attn"], tree["ffn"])
