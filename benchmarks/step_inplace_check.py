"""Counts copies of the arena in the compiled one-program step on THIS platform (GPU: the Triton
kernels and XLA:GPU's passes differ from the CPU test in tests/test_pooled_step_inplace.py).

    PYTHONPATH=. python -m benchmarks.step_inplace_check [--model olmoe|demo] [--batch 8]

Prints, per variant, the number of arena-sized copies and the first few such HLO lines (an
arena copy costs two passes over the device's whole memory).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks.step import MODELS, build_store, decode_inputs
from crosspool_jax.execution.pooled_step import (
    LaneShape,
    StepSpec,
    build_step,
    model_geometry,
    one_model_group_inputs,
)
from crosspool_jax.memory.topology import PoolTopology
from pallas_kernels.page_layout import PoolLayout


def arena_copy_lines(text: str, shard: tuple[int, ...], dtype: str = "bf16") -> list[str]:
    n, rpp, r = shard
    shapes = {f"{dtype}[{n},{rpp},{r}]", f"{dtype}[{n * rpp},{r}]"}
    return [ln.strip() for ln in text.splitlines()
            if (" copy(" in ln or "copy-start(" in ln) and any(s in ln for s in shapes)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="olmoe", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--out", default=None, help="write the optimised HLO of each variant here")
    args = ap.parse_args()
    devs = jax.devices()
    platform = "gpu" if devs[0].platform in ("gpu", "cuda") else "cpu"
    cfg = MODELS[args.model]()
    layout = PoolLayout(65536, "bfloat16", 128, 1)
    geom = model_geometry(cfg, layout, platform)
    kv_pages = args.batch * cfg.num_layers * (-(-(args.context + 4) // geom.tokens_per_page)) + 8
    for kind in ("pool", "coloc") if len(devs) >= 2 else ("coloc",):
        topo = PoolTopology.split("1+1", devs) if kind == "pool" else None
        store, _ = build_store(cfg, topo, devs[0] if kind == "coloc" else None, layout, kv_pages)
        arr = decode_inputs(store, cfg, geom.tokens_per_page, args.batch, args.context, 2,
                            np.random.default_rng(0))
        arr.update(one_model_group_inputs(store, "m", [args.batch], args.batch, args.batch))
        inp = {k: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding) for k, v in arr.items()}
        for mm in ("gpu" if platform == "gpu" else "reference", "reference"):
            lane = LaneShape(store.models["m"].cls, 1, args.batch, args.batch, arr["tail_pages"].shape[-1])
            spec = StepSpec((lane,),
                            True, 2, None, matmul_backend=mm)
            text = build_step(spec, store, platform).lower(store.arena, (inp,)).compile().as_text()
            shard = (store.layout.num_pages, store.layout.rows_per_page, store.layout.row_elems)
            lines = arena_copy_lines(text, shard)
            print(f"{kind:6s} matmul={mm:9s} arena copies: {len(lines)}", flush=True)
            for ln in lines[:6]:
                print("   ", ln[:240])
            if args.out:
                with open(f"{args.out}/step_{kind}_{mm}.hlo.txt", "w") as f:
                    f.write(text)
        del store


if __name__ == "__main__":
    main()
