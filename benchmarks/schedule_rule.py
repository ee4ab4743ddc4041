"""Which decode attention schedule to use for a batch (issue 15 item 5): the split grid vs the
persistent work list over batches from uniform to one long sequence among short ones, on a GPU.

    PYTHONPATH=. python -m benchmarks.schedule_rule [--json OUT] [--smoke]

Batches: B sequences, one of `long` tokens and B - 1 of `long * frac` tokens (frac 1 = uniform),
GQA 32 query / 8 KV heads, d 128, bf16, 16 tokens per page, pages shuffled; the page table is as
wide as the longest sequence (as the engine's bucketed tables are). Raggedness = max length /
mean length. Each variant is jitted once and timed (benchmarks/kernels.py `bench`: median of 5
trials of 10 calls). The table gives both times, their ratio and the raggedness, so the rule in
`crosspool_jax.execution.step_calls.attention_schedule` can be read off it. Correctness: both schedules
against the plain-jnp reference on every batch (relative error printed).
`--smoke` runs tiny sizes in interpret mode on CPU (the numbers then mean nothing).

`--cases few-live` (in `all`, the default; `--splits 16,32` also times the split grid at those
fixed split counts) times the batches the engine's buckets make when few slots are live: 8 slots of
which 1 or 2 hold a sequence (the rest empty; and all 8, the full bucket, for comparison), with a
page table 131,072 tokens wide, as the one-GPU smoke replay's most common decode call (one request
at ~43K tokens in an 8-slot, 4,096-page OLMoE bucket). The split grid's split count is chosen from
shapes alone (all slots assumed live), so with one live slot few programs have work; the persistent
work list is cut from the live lengths. Raggedness there is over the live slots, as the engine's
rule reads it.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import bench, copy_bandwidth, gqa_pool, make_tables, rel_err
from pallas_kernels.decode import paged_decode_attention, paged_decode_attention_reference


def batch_lengths(batch: int, long: int, frac: float, live: int | None = None) -> list[int]:
    """One sequence of `long` tokens, `live - 1` of `long * frac` (at least 1), and the other
    `batch - live` slots empty (0 tokens); `live` defaults to every slot."""
    live = batch if live is None else live
    if not 1 <= live <= batch:
        raise ValueError(f"live must be 1..{batch}, got {live}")
    return [long] + [max(1, int(long * frac))] * (live - 1) + [0] * (batch - live)


def run(batch: int, long: int, frac: float, backend: str, bw: float, live: int | None = None,
        table_tokens: int | None = None, splits: tuple[int, ...] = ()) -> dict:
    rng = np.random.default_rng(batch * 7 + long)
    t_pp = 16
    pool, geom = gqa_pool(128)
    lens = batch_lengths(batch, long, frac, live)
    n_live = sum(n > 0 for n in lens)
    max_pages = -(-(table_tokens or long) // t_pp)
    table, n_pages = make_tables(rng, lens, t_pp, max_pages)
    arena = jax.random.normal(jax.random.key(0), pool.arena_shape(n_pages), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(1), (batch, 32, 128), jnp.bfloat16)
    tb, ln = jnp.asarray(table), jnp.asarray(lens, jnp.int32)
    ref = paged_decode_attention_reference(q.astype(jnp.float32), arena.astype(jnp.float32), tb, ln, geom)
    row = {"batch": batch, "live": n_live, "long": long, "short": lens[1] if n_live > 1 else 0,
           "table_tokens": max_pages * t_pp, "raggedness": long / (sum(lens) / n_live)}
    kv_bytes = sum(lens) * geom.bytes_per_token_used
    for sched in ("split", "persistent"):
        f = jax.jit(functools.partial(paged_decode_attention, geom=geom, backend=backend, schedule=sched))
        row[f"{sched}_err"] = rel_err(f(q, arena, tb, ln)[:n_live], ref[:n_live])
        t = bench(f, q, arena, tb, ln)
        row[f"{sched}_us"] = t * 1e6
        row[f"{sched}_of_copy"] = kv_bytes / t / bw
    row["persistent_speedup"] = row["split_us"] / row["persistent_us"]
    for ns in splits:  # the split grid at a fixed split count instead of default_num_splits'
        f = jax.jit(functools.partial(paged_decode_attention, geom=geom, backend=backend,
                                      schedule="split", num_splits=ns))
        row[f"split{ns}_err"] = rel_err(f(q, arena, tb, ln)[:n_live], ref[:n_live])
        row[f"split{ns}_us"] = bench(f, q, arena, tb, ln) * 1e6
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--cases", choices=("all", "ragged", "few-live"), default="all")
    ap.add_argument("--splits", default="",
                    help="few-live cases: also time the split grid at these split counts "
                         "(comma-separated), against the default rule's")
    args = ap.parse_args(argv)
    backend = "interpret" if args.smoke else "gpu"
    bw = copy_bandwidth(1 << 24 if args.smoke else 1 << 31)
    batches = (4,) if args.smoke else (16, 64)
    longs = (256,) if args.smoke else (4096, 32768)
    fracs = (1.0, 0.0625) if args.smoke else (1.0, 0.5, 0.25, 0.0625, 1 / 128)
    splits = tuple(int(x) for x in args.splits.split(",") if x)
    rows = []
    if args.cases in ("all", "ragged"):
        rows += [run(b, n, f, backend, bw) for b in batches for n in longs for f in fracs]
    if args.cases in ("all", "few-live"):
        table = 1024 if args.smoke else 131072
        few = ((1, 1.0), (2, 1.0), (2, 0.0625), (8, 1.0))
        rows += [run(8, n, f, backend, bw, live=live, table_tokens=table, splits=splits)
                 for n in ((256,) if args.smoke else (8192, 43008, 100000)) for live, f in few]
    print(f"\n{jax.devices()[0].device_kind}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'B':>3s} {'live':>4s} {'long':>6s} {'short':>6s} {'table':>6s} {'ragged':>7s} "
          f"{'split us':>9s} {'pers us':>9s} {'pers x':>7s} {'split err':>9s} {'pers err':>9s}")
    for r in rows:
        print(f"{r['batch']:3d} {r['live']:4d} {r['long']:6d} {r['short']:6d} {r['table_tokens']:6d} "
              f"{r['raggedness']:7.2f} {r['split_us']:9.1f} {r['persistent_us']:9.1f} "
              f"{r['persistent_speedup']:7.2f} {r['split_err']:9.1e} {r['persistent_err']:9.1e}")
    swept = [r for r in rows if splits and f"split{splits[0]}_us" in r]
    if swept:
        counts = sorted(set(splits))
        print("\nsplit grid at fixed split counts (us; the default rule's and the persistent list's "
              "for comparison)")
        print(f"{'live':>4s} {'long':>6s} {'short':>6s} {'default':>9s} {'pers':>9s} "
              + " ".join(f"{'x' + str(n):>9s}" for n in counts))
        for r in swept:
            print(f"{r['live']:4d} {r['long']:6d} {r['short']:6d} {r['split_us']:9.1f} "
                  f"{r['persistent_us']:9.1f} " + " ".join(f"{r[f'split{n}_us']:9.1f}" for n in counts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "copy_bandwidth": bw, "rows": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
