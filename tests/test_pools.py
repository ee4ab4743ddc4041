"""Device pools on 8 CPU devices: placement by role, byte accounting, capacity refusal, unload."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import HF_FIXTURES, fixture_cases

from checkpoints import load_model
from crosspool_jax.errors import CapacityError
from crosspool_jax.params import weight_specs
from crosspool_jax.pools import DevicePools
from crosspool_jax.reference import ReferenceGenerator
from crosspool_jax.topology import PoolTopology, Role
from pallas_kernels.page_layout import PoolLayout

pytestmark = pytest.mark.skipif(not fixture_cases(), reason="run `bash scripts/fixtures.sh`")
# three families; 4 weights devices: 16 experts shard evenly, 10 and 4 cases too where they divide
MODELS = {
    "qwen3": "qwen3moe_gqa8x2_hd16_top8_e16",
    "dsv3": "dsv3_qlora_interleave_g4t2_top4",
    "mixtral": "mixtral_mha4_hd16_top8_e10_tied",
}
LAYOUT = PoolLayout(page_bytes=4096, dtype="float32", row_elems=16, num_pages=32)


def _expected_bytes(pools: DevicePools, path) -> dict[int, int]:
    """Independent count: each leaf's bytes divided by the devices it is split over."""
    cfg = load_model(path).config
    targets, sharded = pools.shardings(cfg)
    out = {d.id: 0 for d in pools.topology.devices}
    n_w = len(pools.topology.weights_devices)
    specs = weight_specs(cfg)
    for side, tgt in ((specs.attn, targets.attn), (specs.ffn, targets.ffn)):
        for spec, sh in zip(jax.tree.leaves(side), jax.tree.leaves(tgt), strict=True):
            nbytes = int(np.prod(spec.shape)) * spec.dtype.itemsize
            split = n_w if (sharded and len(spec.shape) == 4) else 1  # only [Lm, E, ., .] leaves shard
            for d in sh.device_set:
                out[d.id] += nbytes // split
    return out


@pytest.fixture
def pools() -> DevicePools:
    return DevicePools(PoolTopology.split("4+4"), LAYOUT)


def test_three_models_placed_by_role_with_exact_byte_counts(pools: DevicePools) -> None:
    for name, case in MODELS.items():
        pools.load_model(name, HF_FIXTURES / case)
    report = {m.device_id: m for m in pools.memory_report()}
    expected = {name: _expected_bytes(pools, HF_FIXTURES / case) for name, case in MODELS.items()}
    arena_bytes = LAYOUT.num_pages * LAYOUT.page_bytes
    for d in pools.topology.devices:
        mem = report[d.id]
        if mem.role == Role.WEIGHTS:
            assert mem.attn_bytes == {} and mem.kv_arena_bytes == 0  # weights devices: FFN only
            assert mem.ffn_bytes == {n: expected[n][d.id] for n in MODELS}
        else:
            assert mem.ffn_bytes == {}  # KV devices: attention side and pages only
            assert mem.kv_arena_bytes == arena_bytes
            assert mem.attn_bytes == {n: expected[n][d.id] for n in MODELS}
        assert mem.total_bytes == pools.planned_bytes_total(d.id) + (mem.kv_arena_bytes)
    assert pools.models["qwen3"].experts_sharded and not pools.models["mixtral"].experts_sharded


def test_pooled_weights_reproduce_the_reference(pools: DevicePools) -> None:
    pooled = pools.load_model("dsv3", HF_FIXTURES / MODELS["dsv3"])
    ref = load_model(HF_FIXTURES / MODELS["dsv3"])
    one = jax.devices()[0]
    prompt = [7, 3, 9, 1, 4]
    a = ReferenceGenerator(ref.config, ref.weights).generate(prompt, 8).token_ids
    b = ReferenceGenerator(pooled.config, jax.device_put(pooled.weights, one)).generate(prompt, 8).token_ids
    assert a == b


def test_a_load_that_does_not_fit_is_refused_and_harms_nothing() -> None:
    topo = PoolTopology.split("2+6")
    probe = DevicePools(topo, LAYOUT)
    first = probe.planned_bytes(load_model(HF_FIXTURES / MODELS["qwen3"]).config)
    budget = max(first[d.id] for d in topo.weights_devices) + 1000  # room for qwen3 only
    pools = DevicePools(topo, LAYOUT, weights_capacity_bytes=budget)
    pools.load_model("qwen3", HF_FIXTURES / MODELS["qwen3"])
    before = [np.asarray(x) for x in jax.tree.leaves(pools.models["qwen3"].weights)]
    with pytest.raises(CapacityError, match="'dsv3' does not fit: weights device"):
        pools.load_model("dsv3", HF_FIXTURES / MODELS["dsv3"])
    assert list(pools.models) == ["qwen3"]
    after = [np.asarray(x) for x in jax.tree.leaves(pools.models["qwen3"].weights)]
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))


def test_unload_frees_only_that_model(pools: DevicePools) -> None:
    pools.load_model("qwen3", HF_FIXTURES / MODELS["qwen3"])
    pools.load_model("dsv3", HF_FIXTURES / MODELS["dsv3"])
    leaves = jax.tree.leaves(pools.models["qwen3"].weights)
    pools.unload_model("qwen3")
    assert all(x.is_deleted() for x in leaves)
    for mem in pools.memory_report():
        assert "qwen3" not in mem.attn_bytes and "qwen3" not in mem.ffn_bytes
        assert ("dsv3" in mem.ffn_bytes) == (mem.role == Role.WEIGHTS)
    with pytest.raises(Exception, match="no model named 'qwen3'"):
        pools.unload_model("qwen3")
