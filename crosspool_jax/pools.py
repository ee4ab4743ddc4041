"""The two device pools: every model's FFN/expert weights in the weights pool, its attention-side
weights and one shared KV arena per device in the KV pool, with per-device, per-model byte accounting.

Placement (see docs/design.md):
    F-side routed experts ([Lm, E, D, 2I], [Lm, E, I, D]): sharded on the expert axis over the
        weights devices (expert-parallel) when E divides evenly; otherwise replicated there (stated
        in `PooledModel.experts_sharded`; padding the expert axis is future work).
    F-side router, shared experts, dense FFN layers: replicated on every weights device.
    A-side (embedding, attention projections, norms, LM head): replicated on every KV device, so
        each KV device can run attention for the requests whose KV it holds.
    KV arena: `[num_pages, rows_per_page, R]` per KV device (pallas_kernels.page_layout.PoolLayout),
        allocated once and shared by every model.
Weights are read from the checkpoint straight onto their target shardings (each device reads its
own slice), so no model is staged on one device.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from crosspool_jax.config import ModelConfig
from crosspool_jax.errors import CapacityError, CrossPoolError
from crosspool_jax.params import ModelWeights, weight_specs
from crosspool_jax.topology import EXPERT_AXIS, KV_AXIS, PoolTopology, Role
from pallas_kernels.page_layout import PoolLayout

_EXPERT_LEAVES = ("w_gate_up", "w_down")


@dataclasses.dataclass
class PooledModel:
    name: str
    config: ModelConfig
    weights: ModelWeights  # attn on the KV devices, ffn on the weights devices
    experts_sharded: bool
    tokenizer: Any = None


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """Bytes resident on one device, by role and model."""

    device_id: int
    role: Role
    attn_bytes: dict[str, int]  # model -> bytes of A-side weights on this device
    ffn_bytes: dict[str, int]  # model -> bytes of F-side weights on this device
    kv_arena_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.attn_bytes.values()) + sum(self.ffn_bytes.values()) + self.kv_arena_bytes


def _leaf_key(path: tuple) -> str:
    return str(getattr(path[-1], "key", getattr(path[-1], "name", "")))


class DevicePools:
    """Holds the models and the KV arenas. Host-side bookkeeping only; no per-step work here.

    weights_capacity_bytes / kv_capacity_bytes: per-device budgets (None = unlimited); a load that
    would exceed one is refused with CapacityError before anything is read, and nothing already
    loaded is touched.
    """

    def __init__(
        self,
        topology: PoolTopology,
        kv_layout: PoolLayout,
        *,
        weights_capacity_bytes: int | None = None,
        kv_capacity_bytes: int | None = None,
    ):
        if kv_layout.num_pages < 1:
            raise CrossPoolError("kv_layout.num_pages must be >= 1 (pages per KV device)")
        self.topology = topology
        self.kv_layout = kv_layout
        self.weights_capacity_bytes = weights_capacity_bytes
        self.kv_capacity_bytes = kv_capacity_bytes
        n_kv = len(topology.kv_devices)
        pages, rows, r = kv_layout.arena_shape()
        arena_bytes = pages * rows * r * kv_layout.itemsize
        if kv_capacity_bytes is not None and arena_bytes > kv_capacity_bytes:
            raise CapacityError(
                f"KV arena of {arena_bytes} bytes exceeds the KV device budget {kv_capacity_bytes}"
            )
        sharding = NamedSharding(topology.kv_mesh, PartitionSpec(KV_AXIS))
        self.arena: jax.Array = jax.jit(
            lambda: jnp.zeros((n_kv * pages, rows, r), kv_layout.dtype), out_shardings=sharding
        )()
        self.models: dict[str, PooledModel] = {}

    # ---- placement ------------------------------------------------------------------------------
    def shardings(self, cfg: ModelConfig) -> tuple[ModelWeights, bool]:
        """Target shardings of a model's two trees, and whether its experts are sharded."""
        n_w = len(self.topology.weights_devices)
        sharded = cfg.num_experts > 0 and cfg.num_experts % n_w == 0
        kv_rep = NamedSharding(self.topology.kv_mesh, PartitionSpec())
        w_rep = NamedSharding(self.topology.weights_mesh, PartitionSpec())
        w_ep = NamedSharding(self.topology.weights_mesh, PartitionSpec(None, EXPERT_AXIS))
        specs = weight_specs(cfg)

        def ffn_sharding(path: tuple, _: Any) -> NamedSharding:
            keys = [str(getattr(p, "key", "")) for p in path]
            return w_ep if sharded and keys[0] == "moe" and keys[-1] in _EXPERT_LEAVES else w_rep

        attn = jax.tree.map(lambda _: kv_rep, specs.attn)
        ffn = jax.tree_util.tree_map_with_path(ffn_sharding, specs.ffn)
        return ModelWeights(attn, ffn), sharded

    def planned_bytes(self, cfg: ModelConfig, dtype: Any = None) -> dict[int, int]:
        """Bytes a model would add on each device (device id -> bytes), from shapes alone."""
        specs = weight_specs(cfg, dtype)
        targets, _ = self.shardings(cfg)
        out: dict[int, int] = {d.id: 0 for d in self.topology.devices}
        for spec, sh in zip(jax.tree.leaves(specs), jax.tree.leaves(targets), strict=True):
            nbytes = int(np.prod(sh.shard_shape(spec.shape))) * jnp.dtype(spec.dtype).itemsize
            for d in sh.device_set:
                out[d.id] += nbytes
        return out

    def planned_bytes_total(self, device_id: int) -> int:
        """Weights bytes the loaded models should hold on a device, from their shapes (the plan)."""
        return sum(self.planned_bytes(m.config).get(device_id, 0) for m in self.models.values())

    # ---- load / unload --------------------------------------------------------------------------
    def load_model(self, name: str, path: str | os.PathLike[str], *, dtype: Any = None) -> PooledModel:
        """Loads an HF directory or crosspool checkpoint into the pools under `name`."""
        from checkpoints import load_model  # checkpoints depends on crosspool_jax, not the reverse

        if name in self.models:
            raise CrossPoolError(f"a model named {name!r} is already loaded")
        cfg = _peek_config(path)
        if dtype is not None:
            cfg = cfg.replace(dtype=jnp.dtype(dtype).name)
        self._check_fits(name, cfg)
        targets, sharded = self.shardings(cfg)
        loaded = load_model(path, dtype=dtype, shardings=targets)
        model = PooledModel(name, loaded.config, loaded.weights, sharded, loaded.tokenizer)
        self.models[name] = model
        return model

    def unload_model(self, name: str) -> None:
        """Frees a model's device buffers at once; other models are untouched."""
        model = self.models.pop(name, None)
        if model is None:
            raise CrossPoolError(f"no model named {name!r} is loaded (loaded: {sorted(self.models)})")
        for leaf in jax.tree.leaves(model.weights):
            leaf.delete()

    def _check_fits(self, name: str, cfg: ModelConfig) -> None:
        adds = self.planned_bytes(cfg)
        used = {m.device_id: m.total_bytes for m in self.memory_report()}
        for d in self.topology.devices:
            role = self.topology.role(d)
            cap = self.weights_capacity_bytes if role == Role.WEIGHTS else self.kv_capacity_bytes
            if cap is not None and used[d.id] + adds[d.id] > cap:
                raise CapacityError(
                    f"model {name!r} does not fit: {role.value} device {d.id} would hold "
                    f"{used[d.id] + adds[d.id]} bytes (in use {used[d.id]}, this model {adds[d.id]}) "
                    f"over its budget of {cap} bytes"
                )

    # ---- accounting -----------------------------------------------------------------------------
    def memory_report(self) -> list[DeviceMemory]:
        """Bytes resident per device, read from the arrays' shards (not from the plan)."""
        attn: dict[int, dict[str, int]] = {d.id: {} for d in self.topology.devices}
        ffn: dict[int, dict[str, int]] = {d.id: {} for d in self.topology.devices}
        for name, model in self.models.items():
            for side, table in ((model.weights.attn, attn), (model.weights.ffn, ffn)):
                for leaf in jax.tree.leaves(side):
                    for shard in leaf.addressable_shards:
                        table[shard.device.id][name] = table[shard.device.id].get(name, 0) + shard.data.nbytes
        arena = {s.device.id: s.data.nbytes for s in self.arena.addressable_shards}
        return [
            DeviceMemory(d.id, self.topology.role(d), attn[d.id], ffn[d.id], arena.get(d.id, 0))
            for d in self.topology.devices
        ]


def _peek_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The model's config without reading its weights (to check capacity first)."""
    from checkpoints.orbax_format import is_crosspool_checkpoint, load_config
    from crosspool_jax.config import load_hf_config

    if is_crosspool_checkpoint(path):
        return load_config(path)
    return load_hf_config(path)
