"""Where does a GPU process hold a second arena-sized buffer? Peak device memory after each phase of
building a colocated arena and running one decode step on it (the way the engine does: zero arena,
models written in place with `place_model_random`, step compiled, first call, more calls).

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python -m benchmarks.arena_memory_probe [--models 4]

Prints one line per phase: bytes in use and the peak so far (the peak never goes down, so a jump
in the peak belongs to the phase that printed it). OLMoE-1B-7B shapes, bf16, 32 requests x 2K.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step import decode_inputs, olmoe_config
from crosspool_jax.execution.pooled_step import (
    LaneShape,
    StepSpec,
    build_step,
    model_geometry,
    one_model_group_inputs,
)
from crosspool_jax.memory.arena import ArenaStore, model_rows
from crosspool_jax.memory.topology import Role
from crosspool_jax.models.params import weight_specs
from pallas_kernels.page_layout import PoolLayout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args()
    dev = jax.devices()[0]
    gib = 2 ** 30

    def phase(name: str) -> None:
        st = dev.memory_stats() or {}
        print(f"{name:34s} in use {st.get('bytes_in_use', 0) / gib:7.2f} GiB   peak "
              f"{st.get('peak_bytes_in_use', 0) / gib:7.2f} GiB   limit "
              f"{st.get('bytes_limit', 0) / gib:7.2f}", flush=True)

    phase("start")
    cfg = olmoe_config()
    layout = PoolLayout(65536, "bfloat16", 128, 1)
    rows = model_rows(cfg, weight_specs(cfg, jnp.bfloat16), 1, layout)
    rpp = layout.rows_per_page
    w_pages = args.models * (-(-(rows[Role.KV] + rows[Role.WEIGHTS]) // rpp) + 1) + 1
    tpp = model_geometry(cfg, layout, "gpu").tokens_per_page
    kv_pages = args.batch * cfg.num_layers * (-(-(args.context + 4) // tpp)) + 8
    store = ArenaStore(None, dataclasses.replace(layout, num_pages=w_pages + kv_pages), w_pages,
                       colocated=dev)
    jax.block_until_ready(store.arena)
    phase(f"zero arena ({store.arena.nbytes / gib:.2f} GiB)")
    for i in range(args.models):
        store.place_model_random(f"m{i}", cfg, seed=i)
    jax.block_until_ready(store.arena)
    phase(f"{args.models} models placed (random)")
    arr = decode_inputs(store, cfg, tpp, args.batch, args.context, 4, np.random.default_rng(0))
    arr.update(one_model_group_inputs(store, "m0", [args.batch], args.batch, args.batch))
    lane = LaneShape(store.models["m0"].cls, 1, args.batch, args.batch, arr["tail_pages"].shape[-1])
    prog = build_step(StepSpec((lane,), True, 4, None), store, "gpu")
    inp = ({k: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding) for k, v in arr.items()},)
    t0 = time.perf_counter()
    lowered = prog.lower(store.arena, inp)
    phase("lowered")
    compiled = lowered.compile()
    phase(f"compiled ({time.perf_counter() - t0:.1f} s)")
    mem = compiled.memory_analysis()
    print(f"  memory_analysis: temp {mem.temp_size_in_bytes / gib:.3f} GiB, alias "
          f"{mem.alias_size_in_bytes / gib:.2f} GiB, args {mem.argument_size_in_bytes / gib:.2f} GiB, "
          f"out {mem.output_size_in_bytes / gib:.2f} GiB", flush=True)
    store.arena, out = compiled(store.arena, inp)
    jax.block_until_ready(out)
    phase("first call")
    for _ in range(3):
        store.arena, out = compiled(store.arena, inp)
    jax.block_until_ready(out)
    phase("3 more calls")
    store.arena, out = prog(store.arena, inp)  # through the jit wrapper, as the engine calls it
    jax.block_until_ready(out)
    phase("call through jit (cache hit?)")


if __name__ == "__main__":
    main()
