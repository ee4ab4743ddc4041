"""Chunked-prefill attention (`paged_prefill_attention`) on a GPU: correctness, then launch
configurations timed at the engine's page layout, as TFLOP/s and share of the card's bf16 peak.

    PYTHONPATH=. python -m benchmarks.prefill_attention [--json OUT] [--smoke] [--configs 0,1]
        [--with-mgpu [--mgpu-configs 0,1]] [--mla] [--cases 1x2048@0,1x2048@30K]

Geometries (bf16 KV, head_dim 128, 256-KiB pages of 128-element rows, as the engine's GPU arena):
OLMoE-1B-7B (16 query heads, 16 KV heads: 32 tokens per page) and Qwen3-30B-A3B (32 query heads,
4 KV heads: 128 tokens per page). Cases (`--cases`): one request's chunk of 512 tokens after 0, 8K
and 32K tokens of KV, and a ragged batch of four 512-token chunks after 0, 4K, 16K and 32K tokens
(the default); and the engine's 2,048-token chunk after 0, 2K and 30K tokens.
FLOPs = 4 x head_dim x query heads x (query, key) pairs, each query token seeing the keys up to
and including its own position (causal). The peak is DESIGN.md's measured 790 TFLOP/s (bf16, H200).

Correctness first: every configuration's output against the float32 reference
(`paged_prefill_attention_reference`) on the case it is timed on (relative L2 error printed).
`--smoke` runs toy sizes in interpret mode on a CPU (the numbers then mean nothing).

`--with-mgpu` then also runs the Hopper Mosaic GPU kernel (`pallas_kernels.prefill_mgpu`) in the
configurations of MGPU_CONFIGS on every case, each checked against the same reference first. It is
opt-in and runs after every Triton configuration: a CUDA fault in a new kernel poisons the CUDA
context for the rest of the process.

`--mla` runs only DeepSeek-V3's MLA in absorbed form instead (128 heads, latent 512 + rope 64,
bf16, 64 tokens per page of 64-element rows, as `benchmarks/kernels.py`'s MLA decode), same
cases: the Triton kernel (`paged_mla_prefill_attention`, its defaults) and, with `--with-mgpu`, the
tensor-core path (`pallas_kernels.mla_prefill_mgpu`: each query token a row of the Mosaic GPU MLA
decode kernel). FLOPs = 2 x heads x (576 + 512) per causal (query, key) pair.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import bench, make_tables, rel_err
from pallas_kernels.mla_prefill_mgpu import paged_mla_prefill_attention_mgpu
from pallas_kernels.page_layout import KVSpec, PoolLayout, page_geometry
from pallas_kernels.prefill import (
    paged_mla_prefill_attention,
    paged_mla_prefill_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
)
from pallas_kernels.prefill_mgpu import paged_prefill_attention_mgpu

PEAK_BF16 = 790e12  # DESIGN.md: measured bf16 matmul peak of one H200
GEOMETRIES = {"olmoe": (16, 16), "qwen3-30b-a3b": (32, 4)}  # (query heads, KV heads), head_dim 128
CASES = {  # name -> (chunk tokens, [context before the chunk] per request)
    "1x512@0": (512, [0]),
    "1x512@8K": (512, [8192]),
    "1x512@32K": (512, [32768]),
    "4x512@0/4K/16K/32K": (512, [0, 4096, 16384, 32768]),
    # the engine's GPU prefill chunk (2,048 tokens): a prompt's first chunk, its second, one deep
    # into a long prompt (each already has 16 query blocks x the heads' programs before any split)
    "1x2048@0": (2048, [0]),
    "1x2048@2K": (2048, [2048]),
    "1x2048@30K": (2048, [30720]),
    "1x4096@0": (4096, [0]),  # a 4K prompt in one chunk (benchmarks/prefill.py's 4K case)
}
DEFAULT_CASES = ("1x512@0", "1x512@8K", "1x512@32K", "4x512@0/4K/16K/32K")
# launch configurations: None = the kernel's defaults; "rows" = query rows per program (block_q =
# rows / the padded GQA group: 64 rows is the default)
CONFIGS: list[dict[str, Any] | None] = [
    None,
    # the kernel's defaults before 2026-12-04 (GPU_PREFILL_DEFAULTS came from this table)
    {"rows": 64, "block_t": 64, "num_warps": 4, "num_stages": 2, "num_splits": 1},
    {"num_splits": 4},
    {"num_splits": 8},
    {"block_t": 128, "num_stages": 3},
    {"block_t": 128, "num_stages": 3, "num_splits": 4},
    {"rows": 128, "num_warps": 8},
    {"rows": 128, "num_warps": 8, "num_splits": 4},
    {"rows": 128, "block_t": 128, "num_warps": 8, "num_stages": 3, "num_splits": 4},
    {"rows": 32, "num_splits": 4},
    # the defaults with fewer KV splits (the 2,048-token chunks)
    {"num_splits": 1},
    {"num_splits": 2},
]
# `paged_prefill_attention_mgpu` keywords (None = its defaults: 128-key steps, 2 stages, splits by
# `prefill_mgpu.default_num_splits`)
MGPU_CONFIGS: list[dict[str, Any] | None] = [
    None,
    {"num_splits": 1},
    {"num_splits": 2},
    {"num_splits": 4},
    {"num_splits": 8},
    {"stages": 3},
    {"block_t": 64, "stages": 3},
]
MAX_REL_ERR = 2e-2  # a Mosaic GPU configuration further than this from the reference is not timed


def kernel_args(cfg: dict[str, Any] | None, q_heads: int, kv_heads: int) -> dict[str, Any]:
    """`paged_prefill_attention` keywords of a CONFIGS entry ("rows" -> block_q)."""
    out = dict(cfg or {})
    rows = out.pop("rows", None)
    if rows is not None:
        group = 1 << (q_heads // kv_heads - 1).bit_length()
        out["block_q"] = max(1, rows // group)
    return out


def causal_pairs(chunk: int, contexts: list[int]) -> int:
    """(query, key) pairs of chunks of `chunk` tokens after each of `contexts` tokens."""
    return sum(chunk * c + chunk * (chunk + 1) // 2 for c in contexts)


def build_case(q_heads: int, kv_heads: int, chunk: int, contexts: list[int], smoke: bool,
               seed: int = 0) -> tuple[Any, ...]:
    """(q, arena, page_table, kv_lens, cu_q_lens, geom) of one case: random bf16 KV and queries,
    random non-ordered page tables."""
    rng = np.random.default_rng(seed)
    pool = PoolLayout(16384 if smoke else 262144, "bfloat16", 64 if smoke else 128)
    geom = page_geometry(KVSpec.gqa(kv_heads, 128), pool)
    lens = [c + chunk for c in contexts]
    max_pages = -(-max(lens) // geom.tokens_per_page)
    table, n_pages = make_tables(rng, lens, geom.tokens_per_page, max_pages)
    arena = jax.random.normal(jax.random.key(seed), pool.arena_shape(n_pages), jnp.bfloat16)
    q = jax.random.normal(jax.random.key(seed + 1), (chunk * len(contexts), q_heads, 128), jnp.bfloat16)
    cu = np.arange(len(contexts) + 1, dtype=np.int32) * chunk
    return q, arena, jnp.asarray(table), jnp.asarray(lens, jnp.int32), jnp.asarray(cu), geom


def reference_in_pieces(reference: Any, queries: tuple[jax.Array, ...], arena: jax.Array,
                        table: jax.Array, chunk: int, contexts: list[int], piece: int = 16
                        ) -> jax.Array:
    """The float32 reference of a case, `piece` query tokens of one request at a time (the
    reference gathers the keys per query token: a whole 512-token chunk at 32K tokens of context
    would need ~130 GB). ``reference(*queries, arena, page_table, kv_lens, cu_q_lens)`` is the
    kernel's reference with its geometry and options bound; `queries` are the per-token query
    arrays (q; or q_latent, q_rope)."""
    out = []
    arena32 = arena.astype(jnp.float32)
    for b, ctx in enumerate(contexts):
        for p0 in range(0, chunk, piece):
            n = min(piece, chunk - p0)
            rows = slice(b * chunk + p0, b * chunk + p0 + n)
            out.append(reference(*(q[rows].astype(jnp.float32) for q in queries), arena32,
                                 table[b:b + 1], jnp.asarray([ctx + p0 + n], jnp.int32),
                                 jnp.asarray([0, n], jnp.int32)))
    return jnp.concatenate(out)


def time_config(rows: list[dict[str, Any]], gname: str, cname: str, label: str, f: Any,
                args: tuple[Any, ...], ref: jax.Array, flops: int, smoke: bool,
                max_err: float | None = None) -> None:
    """Checks ``f(*args)`` against `ref`, times it and appends its row to `rows` (printed as JSON);
    an exception, or an error over `max_err`, is printed instead of a row."""
    try:
        err = rel_err(f(*args).astype(jnp.float32), ref)
        if max_err is not None and not err <= max_err:
            print(f"{gname} {cname} {label}: WRONG rel_err={err:.3e} (over {max_err}), not timed",
                  flush=True)
            return
        t = bench(f, *args, iters=2 if smoke else 10, trials=2 if smoke else 5)
    except Exception as e:  # one failing configuration must not hide the rest
        print(f"{gname} {cname} {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        traceback.print_exc(limit=2, file=sys.stdout)
        return
    row = {"geometry": gname, "case": cname, "config": label, "us": round(t * 1e6, 1),
           "tflops": round(flops / t / 1e12, 2), "of_peak": round(flops / t / PEAK_BF16, 4),
           "rel_err": err}
    rows.append(row)
    print(json.dumps(row), flush=True)


def run(smoke: bool, configs: list[dict[str, Any] | None],
        mgpu_configs: list[dict[str, Any] | None] | None = None,
        cases: tuple[str, ...] = DEFAULT_CASES) -> list[dict[str, Any]]:
    """Every case of `cases` with every Triton configuration in `configs`; then, if
    `mgpu_configs` is given, every case again with the Mosaic GPU kernel in each of those (after
    all Triton runs)."""
    backend = "interpret" if smoke else "gpu"
    rows: list[dict[str, Any]] = []
    kept = []  # the cases (and their references) for the Mosaic GPU pass
    for gname, (hq, kvh) in GEOMETRIES.items():
        if smoke:
            hq, kvh = hq // 4, max(1, kvh // 4)
        for cname in cases:
            chunk, contexts = CASES[cname]
            if smoke:
                chunk, contexts = 16, [c // 256 for c in contexts]
            q, arena, table, lens, cu, geom = build_case(hq, kvh, chunk, contexts, smoke)
            ref = reference_in_pieces(functools.partial(paged_prefill_attention_reference,
                                                        geom=geom), (q,), arena, table, chunk,
                                      contexts)
            flops = 4 * 128 * hq * causal_pairs(chunk, contexts)
            args = (q, arena, table, lens, cu)
            for cfg in configs:
                label = "default" if cfg is None else ",".join(f"{k}={v}" for k, v in cfg.items())
                f = jax.jit(functools.partial(paged_prefill_attention, geom=geom, backend=backend,
                                              **kernel_args(cfg, hq, kvh)))
                time_config(rows, gname, cname, label, f, args, ref, flops, smoke)
            if mgpu_configs:
                kept.append((gname, cname, geom, args, ref, flops))
    for gname, cname, geom, args, ref, flops in kept:
        for cfg in mgpu_configs or []:
            label = "mgpu" + ("" if cfg is None else ":" + ",".join(f"{k}={v}" for k, v in cfg.items()))
            f = jax.jit(functools.partial(paged_prefill_attention_mgpu, geom=geom, backend=backend,
                                          **(cfg or {})))
            time_config(rows, gname, cname, label, f, args, ref, flops, smoke, max_err=MAX_REL_ERR)
    return rows


MLA_HEADS, MLA_SCALE = 128, 192**-0.5  # DeepSeek-V3: 128 heads, softmax scale of d = 128 + 64


def build_mla_case(heads: int, chunk: int, contexts: list[int], smoke: bool, seed: int = 0
                   ) -> tuple[Any, ...]:
    """(q_latent, q_rope, arena, page_table, kv_lens, cu_q_lens, geom) of one MLA case (random
    bf16 arena, random non-ordered page tables)."""
    rng = np.random.default_rng(seed)
    lat, rope = (128, 64) if smoke else (512, 64)
    t_pp = 16 if smoke else 64
    pool = PoolLayout(page_bytes=t_pp * (lat + rope) * 2, dtype="bfloat16", row_elems=64)
    geom = page_geometry(KVSpec.mla(lat, rope), pool)
    lens = [c + chunk for c in contexts]
    table, n_pages = make_tables(rng, lens, t_pp, -(-max(lens) // t_pp))
    arena = jax.random.normal(jax.random.key(seed), pool.arena_shape(n_pages), jnp.bfloat16)
    t = chunk * len(contexts)
    ql = jax.random.normal(jax.random.key(seed + 1), (t, heads, lat), jnp.bfloat16)
    qr = jax.random.normal(jax.random.key(seed + 2), (t, heads, rope), jnp.bfloat16)
    cu = np.arange(len(contexts) + 1, dtype=np.int32) * chunk
    return (ql, qr, arena, jnp.asarray(table), jnp.asarray(lens, jnp.int32), jnp.asarray(cu),
            geom)


def run_mla(smoke: bool, with_mgpu: bool, cases: tuple[str, ...] = DEFAULT_CASES
            ) -> list[dict[str, Any]]:
    """Every case of `cases` with MLA: the Triton kernel, then (``with_mgpu``) the tensor-core
    path."""
    backend = "interpret" if smoke else "gpu"
    heads = 64 if smoke else MLA_HEADS
    rows: list[dict[str, Any]] = []
    kept = []
    for cname in cases:
        chunk, contexts = CASES[cname]
        if smoke:
            chunk, contexts = 16, [c // 256 for c in contexts]
        ql, qr, arena, table, lens, cu, geom = build_mla_case(heads, chunk, contexts, smoke)
        ref = reference_in_pieces(functools.partial(paged_mla_prefill_attention_reference,
                                                    geom=geom, scale=MLA_SCALE), (ql, qr), arena,
                                  table, chunk, contexts)
        flops = 2 * heads * (geom.spec.kv_lora_rank * 2 + geom.spec.rope_dim) * causal_pairs(
            chunk, contexts)
        args = (ql, qr, arena, table, lens, cu)
        f = jax.jit(functools.partial(paged_mla_prefill_attention, geom=geom, scale=MLA_SCALE,
                                      backend=backend))
        time_config(rows, "deepseek-v3 mla", cname, "triton default", f, args, ref, flops, smoke)
        kept.append((cname, geom, args, ref, flops))
    for cname, geom, args, ref, flops in kept if with_mgpu else []:
        f = jax.jit(functools.partial(paged_mla_prefill_attention_mgpu, geom=geom,
                                      scale=MLA_SCALE, backend=backend))
        time_config(rows, "deepseek-v3 mla", cname, "mgpu (rows of the decode kernel)", f, args,
                    ref, flops, smoke, max_err=MAX_REL_ERR)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes, interpret mode (CPU)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--configs", default=None, metavar="I,J",
                    help="indexes into CONFIGS to run (default: all; 0 = the kernel's defaults)")
    ap.add_argument("--with-mgpu", action="store_true",
                    help="then also the Mosaic GPU kernel (prefill_mgpu) in MGPU_CONFIGS, after all "
                         "Triton configurations")
    ap.add_argument("--mgpu-configs", default=None, metavar="I,J",
                    help="with --with-mgpu: indexes into MGPU_CONFIGS to run (default: all)")
    ap.add_argument("--mla", action="store_true",
                    help="only DeepSeek-V3 MLA (Triton; with --with-mgpu also the Mosaic GPU path)")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help=f"comma-separated case names (default: the 512-token ones; all: {', '.join(CASES)})")
    args = ap.parse_args(argv)
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = set(cases) - set(CASES)
    if unknown:
        ap.error(f"--cases: unknown {sorted(unknown)}; known: {list(CASES)}")
    picks = CONFIGS if args.configs is None else [CONFIGS[int(i)] for i in args.configs.split(",")]
    mgpu = None
    if args.with_mgpu:
        mgpu = (MGPU_CONFIGS if args.mgpu_configs is None
                else [MGPU_CONFIGS[int(i)] for i in args.mgpu_configs.split(",")])
    rows = (run_mla(args.smoke, args.with_mgpu, cases) if args.mla
            else run(args.smoke, picks, mgpu, cases))
    dev = jax.devices()[0]
    print(f"\n{dev.device_kind}; TFLOP/s and share of {PEAK_BF16 / 1e12:.0f} TFLOP/s")
    print(f"{'geometry':14s} {'case':20s} {'config':62s} {'us':>9s} {'TFLOP/s':>8s} {'peak':>6s} {'err':>8s}")
    for r in rows:
        print(f"{r['geometry']:14s} {r['case']:20s} {r['config']:62s} {r['us']:9.1f} {r['tflops']:8.2f} "
              f"{r['of_peak']:6.1%} {r['rel_err']:8.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "peak": PEAK_BF16, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
