"""The compiled one-program step updates the arena in place: no copy of the arena anywhere in the
optimised program, for decode (1 and 2 lanes per model, several models incl. MLA, a split request)
and for prefill. A copy would cost two passes over the device's whole memory per layer (measured on
H200: 157 ms instead of 26 ms per OLMoE decode step, docs/benchmarks.md)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.arena import ArenaStore, model_rows
from crosspool_jax.demo import demo_configs
from crosspool_jax.params import weight_specs
from crosspool_jax.pooled_step import LaneShape, StepSpec, build_step
from crosspool_jax.topology import PoolTopology, Role
from pallas_kernels.page_layout import PoolLayout

CFGS = demo_configs()


def _store(colocated: bool) -> ArenaStore:
    layout = PoolLayout(16384, "bfloat16", 64, 1)
    rows = {r: 0 for r in Role}
    for cfg in CFGS.values():
        for r, n in model_rows(cfg, weight_specs(cfg, jnp.bfloat16), 1, layout).items():
            rows[r] += n
    rpp = layout.rows_per_page
    if colocated:
        a, f = -(-(rows[Role.KV] + rows[Role.WEIGHTS]) // rpp) + 1, 0
        store = ArenaStore(None, dataclasses.replace(layout, num_pages=a + 64), a,
                           colocated=jax.devices()[0])
    else:
        a, f = -(-rows[Role.KV] // rpp) + 1, -(-rows[Role.WEIGHTS] // rpp) + 1
        store = ArenaStore(PoolTopology.split("2+1", jax.devices()[:3]),
                           dataclasses.replace(layout, num_pages=max(f, a + 64)), a)
    for name, cfg in CFGS.items():
        store.models[name] = store.plan_model(name, cfg, weight_specs(cfg, jnp.bfloat16))
    return store


def _inputs(store: ArenaStore, lane: LaneShape, decode: bool) -> dict:
    n, b, t, p = store.num_devices, lane.slots, lane.tokens, lane.max_pages
    L = CFGS[lane.model].num_layers
    z = np.zeros
    arr = {"tokens": z((n, t), np.int32), "positions": z((n, t), np.int32),
           "tok_slot": np.full((n, t), -1, np.int32), "tail_pages": np.full((n, b, L, p), -1, np.int32),
           "tail_start": z((n, b), np.int32), "tail_len": z((n, b), np.int32),
           "sample_row": np.full((n, b), -1, np.int32), "temperature": z((n, b), np.float32),
           "top_k": z((n, b), np.int32), "top_p": np.ones((n, b), np.float32),
           "seed": z((n, b, 2), np.uint32), "remaining": z((n, b), np.int32),
           "stop_ids": np.full((n, b, lane.stop_width), -1, np.int32)}
    if not decode:
        arr["cu_q"] = z((n, b + 1), np.int32)
    if lane.extras:
        arr["x_rows"] = np.full((n, lane.extras, lane.extra_rows), -1, np.int32)
        arr["x_pages"] = np.full((n, lane.extras, L, p), -1, np.int32)
        arr["x_len"] = z((n, lane.extras), np.int32)
    return {k: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding) for k, v in arr.items()}


def _arena_copies(store: ArenaStore, spec: StepSpec) -> int:
    prog = build_step(spec, store, "cpu")
    inputs = tuple(_inputs(store, ln, spec.decode) for ln in spec.lanes)
    text = prog.lower(store.arena, inputs).compile().as_text()
    _, rpp, r = store.arena.shape
    shard = (store.layout.num_pages, rpp, r)
    shapes = {f"bf16[{','.join(map(str, shard))}]", f"bf16[{shard[0] * rpp},{r}]"}
    return sum(1 for line in text.splitlines()
               if (" copy(" in line or "copy-start(" in line) and any(s in line for s in shapes))


LANES = {
    "one-lane": (LaneShape("demo-mixtral", 4, 4, 4),),
    "ping-pong": (LaneShape("demo-mixtral", 2, 2, 4), LaneShape("demo-mixtral", 2, 2, 4)),
    "three-models": (LaneShape("demo-mixtral", 2, 2, 4), LaneShape("demo-qwen3-moe", 2, 2, 4),
                     LaneShape("demo-deepseek-v3", 2, 2, 4)),
    "split-mla": (LaneShape("demo-deepseek-v3", 2, 2, 4, extras=2), LaneShape("demo-mixtral", 2, 2, 4)),
}


@pytest.mark.parametrize("case", sorted(LANES))
@pytest.mark.parametrize("colocated", [False, True])
def test_decode_updates_arena_in_place(case: str, colocated: bool) -> None:
    store = _store(colocated)
    assert _arena_copies(store, StepSpec(LANES[case], True, 2, "interpret")) == 0


def test_prefill_updates_arena_in_place() -> None:
    store = _store(False)
    lanes = (LaneShape("demo-mixtral", 2, 16, 4), LaneShape("demo-deepseek-v3", 2, 16, 4))
    assert _arena_copies(store, StepSpec(lanes, False, 1, "interpret")) == 0
