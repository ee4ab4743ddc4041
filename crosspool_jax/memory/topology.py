"""Device roles: which devices form the KV pool and which the weights pool, and their meshes.

The decode step is one XLA program over a mesh spanning both pools (docs/design.md), so besides a
mesh per pool there is a global mesh whose single axis lists the KV devices first, then the weights
devices; a device's role is its position on that axis.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from crosspool_jax.errors import CrossPoolError


class Role(enum.StrEnum):
    KV = "kv"  # holds KV pages and attention-side weights; runs attention
    WEIGHTS = "weights"  # holds FFN/expert weights of every model; runs experts


KV_AXIS = "kv"
EXPERT_AXIS = "expert"
POOL_AXIS = "pool"


class TopologyError(CrossPoolError, ValueError):
    """A device split that cannot be built from the devices at hand."""


@dataclasses.dataclass(frozen=True)
class PoolTopology:
    """The two pools' devices. Build with `PoolTopology.split("4+4")` or `from_counts`."""

    kv_devices: tuple[jax.Device, ...]
    weights_devices: tuple[jax.Device, ...]

    def __post_init__(self) -> None:
        if not self.kv_devices or not self.weights_devices:
            raise TopologyError("each pool needs at least one device")
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise TopologyError(f"a device is in both pools or listed twice: ids {ids}")

    @classmethod
    def from_counts(cls, kv: int, weights: int, devices: Sequence[jax.Device] | None = None) -> PoolTopology:
        """The first `kv` devices form the KV pool, the next `weights` devices the weights pool."""
        devices = list(jax.devices() if devices is None else devices)
        if kv < 1 or weights < 1:
            raise TopologyError(f"pool sizes must be >= 1, got kv={kv} weights={weights}")
        if kv + weights > len(devices):
            raise TopologyError(
                f"split {kv}+{weights} needs {kv + weights} devices, {len(devices)} available "
                f"({devices[0].platform if devices else 'none'})"
            )
        return cls(tuple(devices[:kv]), tuple(devices[kv : kv + weights]))

    @classmethod
    def split(cls, spec: str, devices: Sequence[jax.Device] | None = None) -> PoolTopology:
        """`"KV+WEIGHTS"`, e.g. "4+4", "2+6", "1+1"."""
        parts = spec.split("+")
        try:
            kv, weights = (int(p) for p in parts)
        except ValueError:
            raise TopologyError(f"device split must look like KV+WEIGHTS (e.g. 2+6), got {spec!r}") from None
        return cls.from_counts(kv, weights, devices)

    @property
    def devices(self) -> tuple[jax.Device, ...]:
        """All devices, KV pool first: the order of the global mesh's axis."""
        return self.kv_devices + self.weights_devices

    def role(self, device: jax.Device) -> Role:
        if device in self.kv_devices:
            return Role.KV
        if device in self.weights_devices:
            return Role.WEIGHTS
        raise TopologyError(f"device {device} is in neither pool")

    @functools.cached_property
    def kv_mesh(self) -> Mesh:
        """1-D mesh over the KV devices, axis `kv` (requests' KV are placed per device)."""
        return Mesh(np.array(self.kv_devices), (KV_AXIS,))

    @functools.cached_property
    def weights_mesh(self) -> Mesh:
        """1-D mesh over the weights devices, axis `expert` (experts sharded expert-parallel)."""
        return Mesh(np.array(self.weights_devices), (EXPERT_AXIS,))

    @functools.cached_property
    def global_mesh(self) -> Mesh:
        """1-D mesh over every device of both pools, axis `pool`, KV devices first."""
        return Mesh(np.array(self.devices), (POOL_AXIS,))

    def describe(self) -> str:
        kv = ",".join(str(d.id) for d in self.kv_devices)
        w = ",".join(str(d.id) for d in self.weights_devices)
        return f"{len(self.kv_devices)}+{len(self.weights_devices)} (kv: {kv}; weights: {w})"


def experts_per_device(num_experts: int, num_devices: int) -> int:
    """Experts each weights device holds when a model's experts are sharded over the pool.

    A model whose expert count does not divide evenly is padded up to a multiple of the device
    count (the padded experts are never routed to), so every device's shard has the same shape.
    """
    if num_experts < 1 or num_devices < 1:
        raise TopologyError(f"need >= 1 expert and device, got {num_experts} and {num_devices}")
    return -(-num_experts // num_devices)


def devices_needed(mode: str, pools: str | None) -> int:
    """Devices a pooled engine of `mode` with device split `pools` uses (0: no more than exist).

    crosspool "KV+W" -> KV + W (default split: at least 2); shared / static "N" -> N. A malformed
    `pools` counts as 0 here: the engine refuses it with its own message."""
    try:
        if pools is None:
            return 2 if mode == "crosspool" else 0
        if "+" in pools:
            return sum(int(p) for p in pools.split("+"))
        return int(pools)
    except ValueError:
        return 0


def ensure_cpu_devices(n: int) -> bool:
    """Gives JAX's CPU backend at least `n` devices (virtual ones) if JAX has not started yet.

    Only the CPU backend changes (`jax_num_cpu_devices`), so this is harmless where GPUs or TPUs
    serve: they stay the default devices. Returns True when the CPU device count was raised; False
    when enough were asked for already (XLA_FLAGS' --xla_force_host_platform_device_count or an
    earlier call) or JAX's backends are already initialized (then the count cannot change: start
    with XLA_FLAGS=--xla_force_host_platform_device_count=N instead)."""
    import os
    import re

    from jax._src import xla_bridge

    if n <= 1 or xla_bridge.backends_are_initialized():
        return False
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    have = max(int(m.group(1)) if m else 1, int(jax.config.jax_num_cpu_devices))
    if have >= n:
        return False
    jax.config.update("jax_num_cpu_devices", n)
    return True
