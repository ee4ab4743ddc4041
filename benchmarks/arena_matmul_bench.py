"""Grouped matmul over arena weights on a GPU: correctness vs the reference, then timings.

Run on a GPU machine from the repository root::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/arena_matmul_bench.py [--json out.json]

``--smoke`` runs the same code paths at toy sizes under the Pallas interpreter on CPU (to check
the script; its numbers mean nothing).

Cases (bf16 weights, R = 64):
  (a) decode MoE: M = 64 rows routed to 8 / 32 / 64 of 64 experts (random counts, >= 1 row per
      chosen expert), K = 2048, N = 2048 (OLMoE gate|up, one expert = [2048, 2048]);
  (b) dense projection: one group, M = 32, K = 4096, N = 6144;
  (c) all 64 groups empty (M = 64, K = N = 2048): the cost of a phase a device sits out.
Weight bytes = the bytes of the non-empty groups' weights (what the call must read); achieved
rate = weight bytes / time, and its ratio to the copy bandwidth measured in the same run (a
1 GiB ``a + 1`` copy: bytes read + written / time). Each timed call cycles through several sets
of offsets that name different weights (more bytes than L2), and the time is the device time of
all sets run back to back in one jitted program. Compared against ``lax.ragged_dot`` over
pre-sliced [G, K, N] weights (the weights already materialised: the best XLA can do) and the
plain-jnp reference (slice from the arena, then ragged_dot: the non-Pallas fallback). Our kernel
runs with `default_config` and a few tiling variants (each row shows the configuration it
resolves to; ``programs=32768`` is clipped to the item bound: one item per program, the plain
grid; ``programs=4``: each program walks many items); the table comes last.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
import traceback
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.kernels import bench_in_jit, copy_bandwidth, rel_err
from pallas_kernels.arena_matmul import arena_grouped_matmul_reference
from pallas_kernels.arena_matmul_gpu import arena_grouped_matmul_gpu, default_config


def poisoned_case(rng, sizes, m, k, n, r, dtype):
    """Small host-built case: weights at shuffled offsets with gaps, gaps and tail rows of x NaN."""
    g = len(sizes)
    rows = k * n // r
    order = rng.permutation(g)
    gaps = rng.integers(0, 7, size=g + 1)
    offsets = np.zeros(g, np.int32)
    at = int(gaps[0])
    for j, w in enumerate(order):
        offsets[w] = at
        at += rows + int(gaps[j + 1])
    arena = np.full((at, r), np.nan, np.float32)
    for w in range(g):
        arena[offsets[w]:offsets[w] + rows] = rng.standard_normal((rows, r))
    x = rng.standard_normal((m, k)).astype(np.float32)
    total = int(sum(sizes))
    x_clean = x.copy()
    x_clean[total:] = 0.0
    x[total:] = np.nan
    return (jnp.asarray(x, dtype), jnp.asarray(x_clean, dtype), jnp.asarray(arena, dtype),
            jnp.asarray(offsets), jnp.asarray(np.asarray(sizes, np.int32)), total)


def check_correctness(backend: str, smoke: bool) -> list[tuple[str, float, float, bool]]:
    """(name, rel err, limit, tail rows exactly 0 and no NaN) per check."""
    rng = np.random.default_rng(0)
    if smoke:
        cases = {
            "moe bf16 R64": ([0, 1, 20, 0, 3, 17, 0, 2], 50, 64, 256, 64, "bfloat16"),
            "dense f32 R128": ([24], 24, 80, 256, 128, "float32"),
            "all empty": ([0, 0, 0], 16, 32, 128, 64, "bfloat16"),
        }
        variants = [{}, {"split_k": 2, "bk": 16}]
    else:
        sz = rng.multinomial(200, np.ones(12) / 12).tolist()
        sz[3] = 0
        sz[7] = 1
        cases = {
            "moe bf16 R64 (12 groups, 0/1/many rows, tail)": (sz, 256, 2048, 1024, 64, "bfloat16"),
            "moe f32 R64": (sz, 256, 512, 1024, 64, "float32"),
            "moe bf16 R128 K/N not pow2": ([5, 0, 40, 1, 17], 80, 1344, 768, 128, "bfloat16"),
            "dense bf16 (1 group)": ([32], 32, 4096, 2048, 64, "bfloat16"),
            "dense f32 K tail": ([48], 64, 1000, 512, 64, "float32"),
            "all empty": ([0] * 8, 64, 2048, 1024, 64, "bfloat16"),
        }
        variants = [{}, {"split_k": 2}, {"bn": 256, "num_warps": 8}, {"bm": 32, "bk": 64},
                    {"programs": 1}]
    out = []
    for name, (sizes, m, k, n, r, dtype) in cases.items():
        x, x_clean, arena, offs, szs, total = poisoned_case(rng, sizes, m, k, n, r, dtype)
        ref = arena_grouped_matmul_reference(x_clean, arena, offs, szs, n)
        limit = 1e-2 if dtype == "bfloat16" else 1e-5
        for v in variants:
            if v.get("bn", 0) > n:
                continue
            label = f"{name} {v or 'default'}"
            try:
                got = arena_grouped_matmul_gpu(x, arena, offs, szs, n, backend=backend, **v)
                got = np.asarray(got)
                tail_ok = bool(np.all(got[total:] == 0.0)) and bool(np.all(np.isfinite(got)))
                err = rel_err(got, ref) if total else float(np.abs(got).max())
                out.append((label, err, limit, tail_ok))
            except Exception as e:
                print(f"  check {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                out.append((label, float("inf"), limit, False))
    return out


def moe_sets(rng, num_sets: int, m: int, g: int, live: int) -> list[np.ndarray]:
    """``num_sets`` size vectors: ``m`` rows over ``live`` random experts of ``g`` (each >= 1)."""
    sets = []
    for _ in range(num_sets):
        chosen = rng.choice(g, size=live, replace=False)
        counts = np.ones(live, np.int64) + rng.multinomial(m - live, np.ones(live) / live)
        sz = np.zeros(g, np.int32)
        sz[chosen] = counts
        sets.append(sz)
    return sets


def time_case(name, *, m, k, n, g, live, r, num_sets, backend, bw, variants, with_xla=True):
    """Times our kernel (each variant), ragged_dot over pre-sliced weights and the reference."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    dtype = jnp.bfloat16
    rows_w = k * n // r
    # One arena holding g * copies weights at shuffled, gapped offsets; set j uses copy j, so
    # consecutive calls read different bytes (dense: a 50 MB weight would otherwise sit in L2).
    copies = num_sets if g == 1 else 1
    nw = g * copies
    order = rng.permutation(nw)
    gaps = rng.integers(0, 16, size=nw)
    starts = np.zeros(nw, np.int64)
    at = 0
    for j, w in enumerate(order):
        at += int(gaps[j])
        starts[w] = at
        at += rows_w
    assert at < 2**31
    arena = jax.random.normal(jax.random.key(1), (at, r), dtype)
    if g == 1:
        size_sets = [np.array([m], np.int32)] * num_sets
        off_sets = [starts[j:j + 1].astype(np.int32) for j in range(num_sets)]
    else:
        size_sets = (moe_sets(rng, num_sets, m, g, live) if live
                     else [np.zeros(g, np.int32)] * num_sets)
        off_sets = [starts[:g].astype(np.int32)] * num_sets
    xs = [jax.random.normal(jax.random.key(10 + j), (m, k), dtype) for j in range(num_sets)]
    sets = [(xs[j], arena, jnp.asarray(off_sets[j]), jnp.asarray(size_sets[j]))
            for j in range(num_sets)]
    n_live = int(np.mean([np.count_nonzero(s) for s in size_sets]))
    wbytes = n_live * k * n * jnp.dtype(dtype).itemsize
    d = default_config(m, k, n, g, r, 2)
    print(f"case {name}: M={m} K={k} N={n} G={g} live={n_live}  weight bytes {wbytes / 1e6:.1f} MB"
          f"  default {d._asdict()}", flush=True)
    ref0 = np.asarray(arena_grouped_matmul_reference(*sets[0], n))
    rows = []

    def record(label, f, cfg=""):
        try:
            err = rel_err(np.asarray(f(*sets[0])), ref0) if n_live else float(
                np.abs(np.asarray(f(*sets[0]))).max())
            t = bench_in_jit(f, sets)
        except Exception as e:
            print(f"  {label:<34} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            return
        rate = wbytes / t
        rows.append({"case": name, "impl": label, "config": cfg, "us": t * 1e6,
                     "weight_GBps": rate / 1e9, "of_copy": rate / bw, "rel_err": err})
        print(f"  {label:<34} {t * 1e6:9.1f} us  {rate / 1e12:6.3f} TB/s  {rate / bw:6.1%} of copy"
              f"  err {err:.1e}  {cfg}", flush=True)

    for v in variants:
        cfg = default_config(m, k, n, g, r, 2, **v)  # what the kernel resolves the variant to
        f = functools.partial(arena_grouped_matmul_gpu, n=n, backend=backend, **v)
        record("ours " + (" ".join(f"{a}={b}" for a, b in v.items()) or "default"), f,
               " ".join(f"{a}={b}" for a, b in cfg._asdict().items()))
    if with_xla:
        ws = {}
        for j in range(num_sets):  # pre-sliced [G, K, N] weights, one per distinct offsets set
            key = tuple(off_sets[j])
            if key not in ws:
                ws[key] = jnp.stack([lax.dynamic_slice_in_dim(arena, int(o), rows_w).reshape(k, n)
                                     for o in off_sets[j]])
        xla_sets = [(xs[j], ws[tuple(off_sets[j])], jnp.asarray(size_sets[j]))
                    for j in range(num_sets)]

        def ragged(x, w, s):
            return lax.ragged_dot(x, w, s, preferred_element_type=jnp.float32)

        try:
            err = rel_err(np.asarray(ragged(*xla_sets[0])), ref0) if n_live else 0.0
            t = bench_in_jit(ragged, xla_sets)
            rate = wbytes / t
            rows.append({"case": name, "impl": "xla ragged_dot (pre-sliced)", "config": "",
                         "us": t * 1e6, "weight_GBps": rate / 1e9, "of_copy": rate / bw,
                         "rel_err": err})
            print(f"  {'xla ragged_dot (pre-sliced)':<34} {t * 1e6:9.1f} us  {rate / 1e12:6.3f} "
                  f"TB/s  {rate / bw:6.1%} of copy  err {err:.1e}", flush=True)
        except Exception as e:
            print(f"  xla ragged_dot FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        del ws, xla_sets
        record("reference (slice + ragged_dot)",
               functools.partial(arena_grouped_matmul_reference, n=n))
    del arena
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes, interpret mode (CPU)")
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="default configuration only")
    args = ap.parse_args()
    smoke = args.smoke
    backend = "interpret" if smoke else "gpu"
    dev = jax.devices()[0]
    if not smoke and dev.platform != "gpu":
        raise SystemExit(f"needs a GPU (found {dev.platform}); use --smoke on CPU")
    print(f"jax {jax.__version__}  device {dev.device_kind}  platform {dev.platform}  "
          f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    t0 = time.time()
    bw = copy_bandwidth(1 << (20 if smoke else 30))
    print(f"copy bandwidth (read + write): {bw / 1e12:.3f} TB/s", flush=True)
    failed = False
    if not args.skip_correctness:
        for name, err, limit, tail_ok in check_correctness(backend, smoke):
            ok = err <= limit and tail_ok
            failed |= not ok
            print(f"  check {name:<60} rel err {err:.2e} (limit {limit:.0e}) tail/finite "
                  f"{'ok' if tail_ok else 'BAD'}  {'ok' if ok else 'FAIL'}", flush=True)
        print(f"correctness done in {time.time() - t0:.0f}s", flush=True)

    if smoke:
        shape = dict(m=24, k=64, n=128, r=64, num_sets=2)
        cases = [("(a) 4/8 experts", dict(shape, g=8, live=4)),
                 ("(b) dense", dict(shape, g=1, live=1)),
                 ("(c) all empty", dict(shape, g=8, live=0))]
        sweep = [{}, {"split_k": 2}, {"programs": 1}]
    else:
        moe = dict(m=64, k=2048, n=2048, g=64, r=64)
        cases = [("(a) 8/64 experts", dict(moe, live=8, num_sets=4)),
                 ("(a) 32/64 experts", dict(moe, live=32, num_sets=3)),
                 ("(a) 64/64 experts", dict(moe, live=64, num_sets=2)),
                 ("(b) dense 32x4096x6144", dict(m=32, k=4096, n=6144, g=1, live=1, r=64,
                                                 num_sets=4)),
                 ("(c) all 64 empty", dict(moe, live=0, num_sets=2))]
        sweep = [{}, {"bn": 256}, {"bn": 64}, {"bk": 256}, {"bk": 64}, {"num_warps": 8},
                 {"num_stages": 2}, {"num_stages": 4}, {"split_k": 1}, {"split_k": 2},
                 {"split_k": 4}, {"programs": 1 << 15}, {"programs": 4},
                 {"bn": 256, "num_warps": 8, "num_stages": 4}]
    if args.no_sweep:
        sweep = [{}]
    rows = []
    for name, kw in cases:
        variants = [{}] if name.startswith("(c)") else sweep
        try:
            rows += time_case(name, backend=backend, bw=bw, variants=variants, **kw)
        except Exception:
            print(f"case {name} FAILED:\n{traceback.format_exc()[-2000:]}", flush=True)

    print("\nbest per case:")
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case and r["impl"].startswith("ours")]
        xla = [r for r in rows if r["case"] == case and r["impl"].startswith("xla")]
        if not mine:
            continue
        b = min(mine, key=lambda r: r["us"])
        dflt = next((r for r in mine if r["impl"] == "ours default"), b)
        line = (f"  {case}: best {b['impl']} {b['us']:.1f} us ({b['of_copy']:.1%} of copy); "
                f"default {dflt['us']:.1f} us")
        if xla:
            line += f"; xla ragged_dot {xla[0]['us']:.1f} us -> {xla[0]['us'] / b['us']:.2f}x"
        print(line)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s; total {time.time() - t0:.0f}s; correctness "
          f"{'FAILED' if failed else 'ok'}")
    print("\n| case | implementation | us | weight TB/s | of copy BW | rel err vs reference | config |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['impl']} | {r['us']:.1f} | {r['weight_GBps'] / 1e3:.3f} | "
              f"{r['of_copy']:.1%} | {r['rel_err']:.1e} | {r['config']} |")
    out_path = args.json or (os.path.join(os.environ["OUT"], "arena_matmul.json")
                             if os.environ.get("OUT") else None)
    if out_path:
        with open(out_path, "w") as fh:
            json.dump({"device": dev.device_kind, "copy_bw": bw, "rows": rows,
                       "correctness_failed": failed}, fh, indent=1)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
