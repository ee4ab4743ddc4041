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

from crosspool_jax.demo import demo_configs
from crosspool_jax.execution.pooled_step import (
    LaneShape,
    StepSpec,
    build_step,
    empty_lane_inputs,
    one_model_group_inputs,
)
from crosspool_jax.memory.arena import ArenaStore, model_rows
from crosspool_jax.memory.topology import PoolTopology, Role
from crosspool_jax.models.params import weight_specs
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


def _inputs(store: ArenaStore, model: str, lane: LaneShape, decode: bool) -> dict:
    n, b, t, p = store.num_devices, lane.slots, lane.tokens, lane.max_pages
    L = CFGS[model].num_layers
    arr = empty_lane_inputs(n, b, t, L, p, lane.stop_width, decode, lane.extras, lane.extra_rows)
    arr.update(one_model_group_inputs(store, model, [0], t, b))
    for key in ("a_base", "f_base", "grp_rows", "grp_slots"):  # G models: the same one G times
        arr[key] = np.repeat(arr[key], lane.groups, axis=1)
    return {k: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding) for k, v in arr.items()}


def _arena_copies(store: ArenaStore, lanes: tuple[tuple[str, LaneShape], ...], decode: bool,
                  steps: int) -> int:
    spec = StepSpec(tuple(ln for _, ln in lanes), decode, steps, "interpret")
    prog = build_step(spec, store, "cpu")
    inputs = tuple(_inputs(store, m, ln, spec.decode) for m, ln in lanes)
    text = prog.lower(store.arena, inputs).compile().as_text()
    _, rpp, r = store.arena.shape
    shard = (store.layout.num_pages, rpp, r)
    shapes = {f"bf16[{','.join(map(str, shard))}]", f"bf16[{shard[0] * rpp},{r}]"}
    return sum(1 for line in text.splitlines()
               if (" copy(" in line or "copy-start(" in line) and any(s in line for s in shapes))


def _lane(store: ArenaStore, model: str, *shape: int, groups: int = 1, **kw: int
          ) -> tuple[str, LaneShape]:
    return model, LaneShape(store.models[model].cls, groups, *shape, **kw)


LANES = {
    "one-lane": lambda s: (_lane(s, "demo-mixtral", 4, 4, 4),),
    "ping-pong": lambda s: (_lane(s, "demo-mixtral", 2, 2, 4), _lane(s, "demo-mixtral", 2, 2, 4)),
    "three-models": lambda s: (_lane(s, "demo-mixtral", 2, 2, 4), _lane(s, "demo-qwen3-moe", 2, 2, 4),
                               _lane(s, "demo-deepseek-v3", 2, 2, 4)),
    "split-mla": lambda s: (_lane(s, "demo-deepseek-v3", 2, 2, 4, extras=2),
                            _lane(s, "demo-mixtral", 2, 2, 4)),
    "two-groups": lambda s: (_lane(s, "demo-qwen3-moe", 4, 4, 4, groups=2),),
}


@pytest.mark.parametrize("case", sorted(LANES))
@pytest.mark.parametrize("colocated", [False, True])
def test_decode_updates_arena_in_place(case: str, colocated: bool) -> None:
    store = _store(colocated)
    assert _arena_copies(store, LANES[case](store), True, 2) == 0


def test_prefill_updates_arena_in_place() -> None:
    store = _store(False)
    lanes = (_lane(store, "demo-mixtral", 2, 16, 4), _lane(store, "demo-deepseek-v3", 2, 16, 4))
    assert _arena_copies(store, lanes, False, 1) == 0
