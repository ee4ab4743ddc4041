"""Device roles and meshes on the 8 virtual CPU devices."""

from __future__ import annotations

import jax
import pytest

from crosspool_jax.memory.topology import (
    EXPERT_AXIS,
    KV_AXIS,
    POOL_AXIS,
    PoolTopology,
    Role,
    TopologyError,
    experts_per_device,
)

SPLITS = [("4+4", 4, 4), ("2+6", 2, 6), ("1+1", 1, 1), ("1+7", 1, 7)]
BAD_SPLITS = [
    ("5+4", "needs 9 devices, 8 available"),
    ("0+4", ">= 1"),
    ("4-4", "KV\\+WEIGHTS"),
    ("a+b", "KV\\+WEIGHTS"),
]
EXPERT_SPLITS = [(64, 4, 16), (60, 6, 10), (8, 6, 2), (3, 4, 1), (1, 1, 1)]


@pytest.mark.parametrize(("spec", "kv", "weights"), SPLITS)
def test_split_assigns_roles_and_builds_meshes(spec: str, kv: int, weights: int) -> None:
    devices = jax.devices()
    topo = PoolTopology.split(spec)
    assert topo.kv_devices == tuple(devices[:kv])
    assert topo.weights_devices == tuple(devices[kv : kv + weights])
    assert topo.kv_mesh.shape == {KV_AXIS: kv}
    assert topo.weights_mesh.shape == {EXPERT_AXIS: weights}
    assert topo.global_mesh.shape == {POOL_AXIS: kv + weights}
    assert list(topo.global_mesh.devices) == devices[:kv] + devices[kv : kv + weights]
    assert [topo.role(d) for d in topo.devices] == [Role.KV] * kv + [Role.WEIGHTS] * weights
    assert topo.describe().startswith(f"{kv}+{weights} ")


def test_explicit_device_lists_keep_their_order() -> None:
    d = jax.devices()
    topo = PoolTopology((d[7], d[3]), (d[0], d[5], d[1]))
    assert list(topo.global_mesh.devices) == [d[7], d[3], d[0], d[5], d[1]]
    with pytest.raises(TopologyError, match="neither pool"):
        topo.role(d[2])


@pytest.mark.parametrize(("spec", "message"), BAD_SPLITS)
def test_bad_splits_are_refused_clearly(spec: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        PoolTopology.split(spec)


def test_a_device_cannot_be_in_both_pools() -> None:
    d = jax.devices()
    with pytest.raises(TopologyError, match="both pools"):
        PoolTopology((d[0], d[1]), (d[1], d[2]))


@pytest.mark.parametrize(("experts", "devices", "each"), EXPERT_SPLITS)
def test_experts_per_device_pads_up(experts: int, devices: int, each: int) -> None:
    assert experts_per_device(experts, devices) == each
    assert each * devices >= experts > (each - 1) * devices
