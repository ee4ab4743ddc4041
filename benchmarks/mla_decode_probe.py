"""Where the Mosaic GPU MLA decode kernel's time goes (issue 16: 60% of its tensor-core floor).

Times `pallas_kernels.mla_decode_mgpu.paged_mla_decode_attention_mgpu` on `benchmarks/kernels.py`'s
case (d) (DeepSeek-V3 geometry: 128 heads, latent 512 + rope 64, bf16, 32 sequences x 8K tokens)
and on variants of it that each remove one suspect:

- ``l2``: the same launch over a page table whose pages all lie in the first 16 pages of the
  arena (~1 MiB at R = 64), so every KV read hits L2: the kernel's own (compute and pipeline)
  time, without HBM;
- ``h64 sN``: 64 query heads (one head block) and N splits, so that 128 CTAs (N = 4) read
  their KV once each: with 128 heads two CTAs read the same latents, through L2 when in step;
- ``r128``: the engine's wide-row layout (128-element arena rows: 4 latent chunks + 1 rope
  chunk padded to 128, of which the kernel loads 64 columns: the default's 64-token blocks in
  2 stages, in order); ``r128 bt32 st4 lookahead``: there, the lookahead at 32-token blocks;
- ``wide``: `Config.wide_values` (each warpgroup's P @ V one wgmma per 256 output columns);
- tuning rows (`Config` overrides).

Correctness first: every variant's output against the XLA gather path (relative error). Floors
from the same run: the tensor-core floor (model FLOPs / the measured bf16 matmul peak) and the
HBM floor (KV bytes once / the measured copy bandwidth). The table prints last.

    PYTHONPATH=. python -m benchmarks.mla_decode_probe [--json OUT] [--only NAME,...]   # one GPU
    JAX_PLATFORMS=cpu PYTHONPATH=. python -m benchmarks.mla_decode_probe --smoke          # CPU

``--profile DIR`` (GPU) instead records one call's Mosaic GPU profiler trace into DIR: the named
ranges of each warpgroup (`pallas_kernels.mla_decode_mgpu`'s ``jax.named_scope`` regions) of
the default launch at 32 x 2K tokens, 2 splits (16 blocks of 64 tokens a CTA; beside the
default's two 64-token stages the profiler's buffer holds 41 ranges a warpgroup,
`profile_ranges`: warpgroup 0's first 5 blocks); ``--profile-tune JSON`` overrides its tuning
keywords (e.g. ``{"block_t": 32, "stages": 3}``, the launch profiled before 2026-12-08, whose
buffer holds 256 ranges); ``--analyze
TRACE.json`` (anywhere) prints, per range, its count and mean length in cycles, and the mean
period of a block.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import bench, copy_bandwidth, make_tables, matmul_peak, rel_err, xla_gather_mla
from pallas_kernels.mla_decode_mgpu import paged_mla_decode_attention_mgpu
from pallas_kernels.page_layout import KVSpec, PoolLayout, page_geometry

L2_PAGES = 16  # pages the ``l2`` variant's tables point into


def variants(smoke: bool) -> list[tuple[str, dict]]:
    """(name, settings): heads, row_elems, l2 (bool) and the kernel's tuning keywords."""
    base = dict(heads=16 if smoke else 128, row_elems=64, l2=False)
    rows = [("default", {}), ("l2", dict(l2=True)), ("h64 s4", dict(heads=64, num_splits=4)),
            ("h64 s2", dict(heads=64, num_splits=2)), ("h64 s4 l2", dict(heads=64, num_splits=4, l2=True)),
            ("r128", dict(row_elems=128)), ("r128 l2", dict(row_elems=128, l2=True)),
            ("r128 bt32 st4 lookahead", dict(row_elems=128, block_t=32, stages=4, lookahead=True)),
            ("wide", dict(wide_values=True)), ("wide wg0 4", dict(wide_values=True, wg0_chunks=4)),
            ("r128 wide", dict(row_elems=128, wide_values=True)),
            ("r128 wide wg0 2", dict(row_elems=128, wide_values=True, wg0_chunks=2)),
            ("wg0 2", dict(wg0_chunks=2)), ("wg0 4", dict(wg0_chunks=4)),
            ("s1", dict(num_splits=1)), ("s3", dict(num_splits=3)), ("s4", dict(num_splits=4)),
            ("bt64 st2 lookahead", dict(block_t=64, stages=2, lookahead=True)),
            ("bt32 st4 lookahead", dict(block_t=32, stages=4, lookahead=True)),
            ("bt32 st3 lookahead", dict(block_t=32, stages=3, lookahead=True)),
            ("bt32 st4 in order", dict(block_t=32, stages=4, lookahead=False))]
    if smoke:
        rows = [*rows[:3], ("r128", dict(row_elems=128))]
    return [(name, {**base, **kw}) for name, kw in rows]


def run_variant(name: str, s: dict, lens: list[int], backend: str, smoke: bool) -> dict:
    """One variant: builds its arena and tables, checks it against XLA, times it."""
    heads, r = s["heads"], s["row_elems"]
    pool = PoolLayout(page_bytes=64 * 576 * 2 if r == 64 else 64 * 640 * 2, dtype="bfloat16",
                      row_elems=r)
    geom = page_geometry(KVSpec.mla(512, 64), pool)
    t_pp = geom.tokens_per_page
    rng = np.random.default_rng(2)
    max_pages = -(-max(lens) // t_pp)
    table, n_pages = make_tables(rng, lens, t_pp, max_pages)
    if s["l2"]:
        table = table % min(L2_PAGES, n_pages)
    arena = jax.random.normal(jax.random.key(4), pool.arena_shape(n_pages), jnp.bfloat16)
    ql = jax.random.normal(jax.random.key(5), (len(lens), heads, 512), jnp.bfloat16)
    qr = jax.random.normal(jax.random.key(6), (len(lens), heads, 64), jnp.bfloat16)
    tb, ln = jnp.asarray(table), jnp.asarray(lens, jnp.int32)
    scale = 192**-0.5
    ref = xla_gather_mla(ql, qr, arena, tb, ln, geom=geom, max_len=max_pages * t_pp, scale=scale)
    tune = {k: v for k, v in s.items() if k not in ("heads", "row_elems", "l2")}
    f = jax.jit(functools.partial(paged_mla_decode_attention_mgpu, geom=geom, scale=scale,
                                  backend=backend, **tune))
    err = rel_err(f(ql, qr, arena, tb, ln), ref)
    t = bench(f, ql, qr, arena, tb, ln, iters=3 if smoke else 10, trials=3 if smoke else 5)
    return {"name": name, "heads": heads, "row_elems": r, "l2": s["l2"], "tune": tune,
            "tokens_per_page": t_pp, "us": t * 1e6, "rel_err": err,
            "flops": 2 * heads * sum(lens) * (576 + 512), "kv_bytes": sum(lens) * 576 * 2}


def profile(out_dir: str, tune: dict | None = None) -> None:
    """Records the profiler trace of one call of the profiled launch (module doc), with the
    kernel's tuning keywords ``tune`` over it, into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    pool = PoolLayout(page_bytes=64 * 576 * 2, dtype="bfloat16", row_elems=64)
    geom = page_geometry(KVSpec.mla(512, 64), pool)
    lens = [2048] * 32
    max_pages = -(-max(lens) // geom.tokens_per_page)
    table, n_pages = make_tables(np.random.default_rng(2), lens, geom.tokens_per_page, max_pages)
    arena = jax.random.normal(jax.random.key(4), pool.arena_shape(n_pages), jnp.bfloat16)
    ql = jax.random.normal(jax.random.key(5), (len(lens), 128, 512), jnp.bfloat16)
    qr = jax.random.normal(jax.random.key(6), (len(lens), 128, 64), jnp.bfloat16)
    args = (ql, qr, arena, jnp.asarray(table), jnp.asarray(lens, jnp.int32))
    kw = dict(geom=geom, scale=192**-0.5, num_splits=2, **(tune or {}))
    plain = jax.jit(functools.partial(paged_mla_decode_attention_mgpu, **kw))
    t = bench(plain, *args)
    print(f"profile case without the profiler: {t * 1e6:.1f} us", flush=True)
    traced = jax.jit(functools.partial(paged_mla_decode_attention_mgpu, profile_dir=out_dir, **kw))
    jax.block_until_ready(traced(*args))
    for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
        print(f"trace {path}", flush=True)
        analyze(path)


def analyze(path: str) -> None:
    """Per range name: count and mean length; the mean period of a block (from one
    ``wg0_issue_s`` to the next). The profiler stamps ranges with the SM's cycle counter
    (``%clock``) and writes ``ts`` in thousands of them, so lengths print in cycles."""
    with open(path) as fh:
        events = json.load(fh)["traceEvents"]
    open_at: dict[tuple, float] = {}
    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    starts: dict[int, list[float]] = collections.defaultdict(list)
    for e in events:
        key = (e["pid"], e["tid"], e["name"])
        if e["ph"] == "B":
            open_at[key] = e["ts"]
            if e["name"] == "wg0_issue_s":
                starts[e["tid"]].append(e["ts"])
        elif key in open_at:
            total[e["name"]] += e["ts"] - open_at.pop(key)
            count[e["name"]] += 1
    print(f"{'range':<18} {'count':>7} {'mean cycles':>12}")
    for name in sorted(total):
        print(f"{name:<18} {count[name]:>7} {total[name] / count[name] * 1e3:>12.1f}")
    periods = [b - a for s in starts.values() for a, b in itertools.pairwise(s)]
    if periods:
        print(f"block period (wg0_issue_s to the next): mean {np.mean(periods) * 1e3:.1f}, "
              f"median {np.median(periods) * 1e3:.1f} cycles over {len(periods)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, interpret mode, toy sizes")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, metavar="DIR", help="record a profiler trace")
    ap.add_argument("--profile-tune", default="{}", metavar="JSON",
                    help="with --profile: tuning keywords over the profiled launch's")
    ap.add_argument("--analyze", default=None, metavar="TRACE", help="summarise a trace")
    args = ap.parse_args()
    if args.analyze:
        analyze(args.analyze)
        return
    if args.profile:
        profile(args.profile, json.loads(args.profile_tune))
        return
    smoke = args.smoke
    backend = "interpret" if smoke else "gpu"
    lens = [200, 130] if smoke else [8192] * 32
    peak = matmul_peak(256 if smoke else 8192, "bfloat16")
    bw = copy_bandwidth(2**20 if smoke else 2**30)
    print(f"device {jax.devices()[0].device_kind}; bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; "
          f"copy {bw / 1e12:.3f} TB/s", flush=True)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    rows = []
    for name, s in variants(smoke):
        if only and name not in only:
            continue
        try:
            row = run_variant(name, s, lens, backend, smoke)
        except Exception as e:  # one variant's failure must not hide the others' numbers
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        row["tensor_floor_us"] = row["flops"] / peak * 1e6
        row["hbm_floor_us"] = row["kv_bytes"] / bw * 1e6  # bw: bytes moved (read + write) / s
        rows.append(row)
        print(f"{name}: {row['us']:.1f} us, err {row['rel_err']:.1e}", flush=True)
    bad = [r["name"] for r in rows if not r["rel_err"] <= 1e-2]
    print("\n| variant | heads | R | T | us | TFLOP/s | of tensor floor | HBM floor us | err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['heads']} | {r['row_elems']} | {r['tokens_per_page']} | "
              f"{r['us']:.1f} | {r['flops'] / r['us'] / 1e6:.1f} | "
              f"{r['tensor_floor_us'] / r['us']:.1%} | {r['hbm_floor_us']:.1f} | {r['rel_err']:.1e} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "peak_flops": peak,
                       "copy_bytes_per_s": bw, "rows": rows}, fh, indent=1)
    if bad:
        print(f"FAILED correctness: {bad}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
