"""Paged decode attention on a GPU: correctness first, then ours vs jax's bundled kernel vs XLA.

Run on a GPU machine from the repository root::

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/kernels.py [--json out.json]

On a CPU (``--smoke``) it runs the same code paths at toy sizes in interpret mode, so the script
itself can be checked without a GPU; the numbers it prints then mean nothing.

Cases (bf16 KV, 8 KV heads, 32 query heads, head_dim 128, 16 tokens per page):
  (a) 16 sequences x 32K tokens; (b) 1 sequence of 100K tokens + 63 of 32 tokens;
  (c) 64 sequences x 2K tokens; and (d) MLA (DeepSeek-V3 geometry: 128 heads, latent 512,
  rope 64) 32 sequences x 8K tokens (ours and XLA only).
``--with-mgpu`` adds the Hopper Mosaic GPU MLA kernel (`pallas_kernels.mla_decode_mgpu`): its
correctness checks and its (d) variants run after everything else (a CUDA fault in it would
poison the CUDA context for whatever ran after it).
Achieved bandwidth = KV bytes the step must read (sum of lengths x bytes per token) / time, and
its ratio to the card's copy bandwidth measured in the same run (bytes read + written / time).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.append import kv_append, kv_append_reference, mla_kv_append_reference
from pallas_kernels.decode import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_mla_decode_attention,
    paged_mla_decode_attention_reference,
)
from pallas_kernels.mla_decode_mgpu import paged_mla_decode_attention_mgpu
from pallas_kernels.page_layout import KVSpec, PageGeometry, PoolLayout, page_geometry
from pallas_kernels.paged_reference import read_features, slots_from_positions
from pallas_kernels.prefill import paged_prefill_attention, paged_prefill_attention_reference

TOKENS_PER_PAGE = 16


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    o = np.asarray(out, np.float64)
    r = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(o)):
        return float("nan")
    return float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))


def bench(f, *args, iters: int = 10, trials: int = 5, rotate: list | None = None) -> float:
    """Median seconds per call (each trial: ``iters`` async calls, then one sync).

    rotate: optional list of argument tuples cycled through call by call, so that inputs
    smaller than the L2 cache are not served from it.
    """
    sets = rotate or [args]
    for a in sets:
        jax.block_until_ready(f(*a))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for i in range(iters):
            out = f(*sets[i % len(sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times))


def bench_in_jit(f, sets: list, trials: int = 5) -> float:
    """Median seconds per call of ``f`` when all ``sets`` run back to back in ONE jitted program.

    For small inputs the host's dispatch (tens of us per call) can exceed the device time; one
    program of len(sets) calls measures the device time (sets differ, so XLA cannot merge them).
    """
    g = jax.jit(lambda ss: [f(*a) for a in ss])
    jax.block_until_ready(g(sets))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        jax.block_until_ready(g(sets))
        times.append((time.perf_counter() - t0) / len(sets))
    return float(np.median(times))


def matmul_peak(n: int, dtype: str, iters: int = 10, trials: int = 5) -> float:
    """FLOP/s of an [n, n] x [n, n] matmul in `dtype` on the default device: median over `trials`
    of `iters` calls issued back to back and synced once (a sync per call would add the host's
    round trip to every ~1-ms call and understate the peak, overstating MFU)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ts = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = f(a)
        out.block_until_ready()
        ts.append((time.perf_counter() - t0) / iters)
    return 2 * n ** 3 / float(np.median(ts))


def copy_bandwidth(nbytes: int) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + bytes written."""
    x = jnp.arange(nbytes // 4, dtype=jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    t = bench(f, x, iters=20)
    return 2 * x.nbytes / t


def gqa_pool(row_elems: int, dtype: str = "bfloat16", kv_heads: int = 8,
             head_dim: int = 128) -> tuple[PoolLayout, PageGeometry]:
    itemsize = 2 if dtype == "bfloat16" else 4
    page_bytes = TOKENS_PER_PAGE * 2 * kv_heads * head_dim * itemsize
    pool = PoolLayout(page_bytes=page_bytes, dtype=dtype, row_elems=row_elems)
    geom = page_geometry(KVSpec.gqa(kv_heads, head_dim), pool)
    assert geom.tokens_per_page == TOKENS_PER_PAGE, geom
    return pool, geom


def make_tables(rng: np.random.Generator, lens: list[int], t_pp: int, max_pages: int,
                extra: int = 0) -> tuple[np.ndarray, int]:
    """Random non-ordered page tables: [B, max_pages] int32 over num_pages pages."""
    need = [max(1, -(-n // t_pp)) for n in lens]
    num_pages = sum(need) + extra
    perm = rng.permutation(num_pages).astype(np.int32)
    table = np.zeros((len(lens), max_pages), np.int32)
    at = 0
    for b, k in enumerate(need):
        table[b, :k] = perm[at:at + k]
        table[b, k:] = perm[at]  # valid ids past the end (the bundled kernel reads whole pages)
        at += k
    return table, num_pages


# ---- XLA baselines ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("geom", "max_len"))
def xla_gather_decode(q, arena, table, lens, *, geom: PageGeometry, max_len: int):
    """Plain XLA: gather each sequence's K/V rows into dense arrays, then masked attention."""
    f = read_features(arena, geom, table, max_len)
    b, hq, d = q.shape
    kvh = geom.spec.kv_heads
    qg = q.reshape(b, kvh, hq // kvh, d)
    s = jnp.einsum("bkgd,bkld->bkgl", qg, f["k"], preferred_element_type=jnp.float32) * d**-0.5
    valid = jnp.arange(max_len)[None, :] < lens[:, None]
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bkgl,bkld->bkgd", p.astype(q.dtype), f["v"],
                   preferred_element_type=jnp.float32)
    return o.reshape(b, hq, d).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("geom", "max_len", "scale"))
def xla_gather_mla(ql, qr, arena, table, lens, *, geom: PageGeometry, max_len: int, scale: float):
    f = read_features(arena, geom, table, max_len)
    s = (jnp.einsum("bhc,blc->bhl", ql, f["latent"], preferred_element_type=jnp.float32)
         + jnp.einsum("bhr,blr->bhl", qr, f["rope"], preferred_element_type=jnp.float32)) * scale
    valid = jnp.arange(max_len)[None, :] < lens[:, None]
    s = jnp.where(valid[:, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhl,blc->bhc", p.astype(ql.dtype), f["latent"],
                   preferred_element_type=jnp.float32)
    return o.astype(ql.dtype)


# ---- correctness ----------------------------------------------------------------------------------


def check_correctness(backend: str, smoke: bool,
                      with_mgpu: bool = False) -> list[tuple[str, float, float]]:
    """Fresh random inputs, NaN-poisoned arena; returns (name, rel err, limit) rows.

    with_mgpu: also the Mosaic GPU MLA kernel's rows (`check_mla_mgpu`), last.
    """
    rng = np.random.default_rng(int(time.time()))
    rows = []
    t_pp = TOKENS_PER_PAGE
    lens = [0, 1, t_pp - 1, t_pp, t_pp + 1, 300 if smoke else 3000]
    for dtype, limit in (("bfloat16", 1e-2), ("float32", 1e-4)):
        for r_el in (64, 128) if dtype == "bfloat16" else (128,):
            pool, geom = gqa_pool(r_el, dtype)
            jdt = jnp.dtype(dtype)
            max_pages = -(-max(lens) // t_pp)
            table, n_pages = make_tables(rng, lens, t_pp, max_pages, extra=3)
            arena = jnp.full(pool.arena_shape(n_pages), jnp.nan, jdt)
            seq = np.concatenate([np.full(n, b) for b, n in enumerate(lens)]).astype(np.int32)
            pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
            slots = slots_from_positions(jnp.asarray(table), jnp.asarray(seq), jnp.asarray(pos),
                                         t_pp)
            n = len(seq)
            k = jnp.asarray(rng.standard_normal((n, 8, 128)), jdt)
            v = jnp.asarray(rng.standard_normal((n, 8, 128)), jdt)
            # skipped slots (-1, as padding rows and idle devices send): only the others are written
            skip = jnp.asarray(rng.random(n) < 0.25).at[0].set(True)
            slots_skip = jnp.where(skip, -1, slots)
            ref_skip = kv_append_reference(arena, slots_skip, k, v, geom)
            got_skip = kv_append(jnp.array(arena), slots_skip, k, v, geom, backend=backend)
            same = bool(jnp.array_equal(got_skip, ref_skip, equal_nan=True))
            rows.append((f"kv_append skipped slots {dtype} R={r_el} (exact)",
                         0.0 if same else float("nan"), 0.0))
            ref_arena = kv_append_reference(arena, slots, k, v, geom)
            arena = kv_append(arena, slots, k, v, geom, backend=backend)
            same = bool(jnp.array_equal(arena, ref_arena, equal_nan=True))
            rows.append((f"kv_append {dtype} R={r_el} (exact)", 0.0 if same else float("nan"), 0.0))
            q = jnp.asarray(rng.standard_normal((len(lens), 32, 128)), jdt)
            tb, ln = jnp.asarray(table), jnp.asarray(lens, jnp.int32)
            ref = paged_decode_attention_reference(q, arena, tb, ln, geom)
            for sched in ("split", "persistent"):
                out = paged_decode_attention(q, arena, tb, ln, geom, backend=backend,
                                             schedule=sched)
                rows.append((f"decode {sched} {dtype} R={r_el}", rel_err(out, ref), limit))
            if r_el == 128:
                ref_w = paged_decode_attention_reference(q, arena, tb, ln, geom, soft_cap=20.0,
                                                         window=100)
                out = paged_decode_attention(q, arena, tb, ln, geom, backend=backend,
                                             soft_cap=20.0, window=100)
                rows.append((f"decode softcap+window {dtype}", rel_err(out, ref_w), limit))
                ql = [1, 0, 3, t_pp, 2, 40]
                cu = jnp.asarray(np.concatenate([[0], np.cumsum(ql)]), jnp.int32)
                qp = jnp.asarray(rng.standard_normal((int(cu[-1]), 32, 128)), jdt)
                ref_p = paged_prefill_attention_reference(qp, arena, tb, ln, cu, geom)
                out = paged_prefill_attention(qp, arena, tb, ln, cu, geom, backend=backend)
                rows.append((f"prefill {dtype}", rel_err(out, ref_p), limit))
    # MLA decode (bf16)
    pool = PoolLayout(page_bytes=t_pp * 576 * 2, dtype="bfloat16", row_elems=64)
    geom = page_geometry(KVSpec.mla(512, 64), pool)
    table, n_pages = make_tables(rng, lens, geom.tokens_per_page,
                                 -(-max(lens) // geom.tokens_per_page), extra=2)
    arena = jnp.asarray(rng.standard_normal(pool.arena_shape(n_pages)), jnp.bfloat16)
    tb, ln = jnp.asarray(table), jnp.asarray(lens, jnp.int32)
    ql = jnp.asarray(rng.standard_normal((len(lens), 16, 512)), jnp.bfloat16)
    qr = jnp.asarray(rng.standard_normal((len(lens), 16, 64)), jnp.bfloat16)
    ref = paged_mla_decode_attention_reference(ql, qr, arena, tb, ln, geom, scale=0.04)
    out = paged_mla_decode_attention(ql, qr, arena, tb, ln, geom, scale=0.04, backend=backend)
    rows.append(("mla decode bfloat16", rel_err(out, ref), 1e-2))
    if with_mgpu:
        rows += check_mla_mgpu(backend, smoke)
    return rows


# The Mosaic GPU MLA kernel's configurations timed by default (keyword arguments; {} = defaults).
MGPU_CONFIGS = [dict(), dict(block_t=64), dict(stages=3), dict(num_splits=1), dict(num_splits=4),
                dict(wg0_chunks=2), dict(wg0_chunks=4), dict(wg0_chunks=5)]


def check_mla_mgpu(backend: str, smoke: bool) -> list[tuple[str, float, float]]:
    """The Mosaic GPU MLA decode kernel vs the reference: (name, rel err, limit) rows.

    DeepSeek-V3 geometry (latent 512 + rope 64, R = 64, 64 tokens per page), NaN in every
    arena row no token was written to, -1 past each sequence's pages, the lengths 0, 1, T-1, T,
    T+1 and a long one; 128 heads (2 head blocks; 64 in smoke), 16 (one padded block); the
    log-sum-exp (its max abs error, -inf exactly where the length is 0); window + soft cap;
    several KV splits and block sizes. A kernel that raises gives a NaN row (so the other rows
    are kept); `backend` "interpret" (smoke) runs Mosaic GPU's interpreter.
    """
    rng = np.random.default_rng(int(time.time()) + 1)
    pool = PoolLayout(page_bytes=64 * 576 * 2, dtype="bfloat16", row_elems=64)
    geom = page_geometry(KVSpec.mla(512, 64), pool)
    t_pp = geom.tokens_per_page
    lens = [0, 1, t_pp - 1, t_pp, t_pp + 1, 300 if smoke else 3000]
    need = [-(-n // t_pp) for n in lens]
    perm = rng.permutation(sum(need) + 2).astype(np.int32)
    table = np.full((len(lens), max(need) + 1), -1, np.int32)
    at = 0
    for b, k in enumerate(need):
        table[b, :k] = perm[at:at + k]
        at += k
    seq = np.concatenate([np.full(n, b) for b, n in enumerate(lens)]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)
    tb, ln = jnp.asarray(table), jnp.asarray(lens, jnp.int32)
    slots = slots_from_positions(jnp.maximum(tb, 0), jnp.asarray(seq), jnp.asarray(pos), t_pp)
    arena = mla_kv_append_reference(
        jnp.full(pool.arena_shape(len(perm)), jnp.nan, jnp.bfloat16), slots,
        jnp.asarray(rng.standard_normal((len(seq), 512)), jnp.bfloat16),
        jnp.asarray(rng.standard_normal((len(seq), 64)), jnp.bfloat16), geom)
    cases = [(64 if smoke else 128, {}, {})]
    if not smoke:
        cases += [(128, {"block_t": 64}, {}), (128, {"num_splits": 3}, {}),
                  (128, {"wg0_chunks": 2}, {}), (128, {"wg0_chunks": 5}, {}),
                  (16, {}, {"window": 200, "soft_cap": 30.0})]
    rows = []
    for heads, cfg, masks in cases:
        name = ("mla decode mgpu H=" + str(heads)
                + "".join(f" {k}={v}" for k, v in {**cfg, **masks}.items()))
        ql = jnp.asarray(rng.standard_normal((len(lens), heads, 512)), jnp.bfloat16)
        qr = jnp.asarray(rng.standard_normal((len(lens), heads, 64)), jnp.bfloat16)
        ref, ref_lse = paged_mla_decode_attention_reference(ql, qr, arena, tb, ln, geom,
                                                            scale=0.04, return_lse=True,
                                                            **masks)
        try:
            out, lse = paged_mla_decode_attention_mgpu(ql, qr, arena, tb, ln, geom, scale=0.04,
                                                       backend=backend, return_lse=True,
                                                       **cfg, **masks)
            lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
            empty = np.asarray(lens) == 0
            lse_ok = bool(np.all(np.isneginf(lse[empty])) and np.all(np.isfinite(lse[~empty])))
            lse_err = float(np.max(np.abs(lse[~empty] - ref_lse[~empty]))) if lse_ok else np.nan
            rows.append((name, rel_err(out, ref), 1e-2))
            rows.append((name + " lse (max abs err)", lse_err, 1e-3))
        except Exception as e:  # keep the rows checked so far
            print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            rows.append((name, float("nan"), 1e-2))
    return rows


# ---- timing ---------------------------------------------------------------------------------------


ROTATE_BYTES = 256 << 20  # inputs below this are cycled through copies (the H200 L2 is 60 MB)


def time_case(name: str, lens: list[int], backend: str, smoke: bool, bw: float,
              configs: list[dict], bundled_cfgs: list[dict],
              r64_configs: tuple[dict, ...] = ()) -> list[dict]:
    rng = np.random.default_rng(1)
    t_pp = TOKENS_PER_PAGE
    pool, geom = gqa_pool(128)
    max_pages = -(-max(lens) // t_pp)
    max_pages = -(-max_pages // 128) * 128  # the bundled kernel wants k_splits | pages/seq
    table, n_pages = make_tables(rng, lens, t_pp, max_pages)
    kv_bytes = sum(lens) * geom.bytes_per_token_used
    copies = 1 if smoke else int(min(8, max(1, -(-ROTATE_BYTES // kv_bytes))))
    arenas = [jax.random.normal(jax.random.key(10 + i), pool.arena_shape(n_pages), jnp.bfloat16)
              for i in range(copies)]
    arena = arenas[0]
    q = jax.random.normal(jax.random.key(1), (len(lens), 32, 128), jnp.bfloat16)
    tb, ln = jnp.asarray(table), jnp.asarray(lens, jnp.int32)
    results = []
    ref = None
    if copies > 1:
        print(f"  ({copies} input copies rotated: the KV is smaller than {ROTATE_BYTES >> 20} MB)")

    def record(label: str, f, *args, check: bool = True, rotate: list | None = None):
        nonlocal ref
        try:
            out = f(*args)
            err = rel_err(out, ref) if (check and ref is not None) else float("nan")
            t_host = bench(f, *args, iters=3 if smoke else 10, trials=3 if smoke else 5,
                           rotate=rotate)
            t = bench_in_jit(f, rotate) if rotate and len(rotate) > 1 else t_host
            gbps = kv_bytes / t
            row = {"case": name, "impl": label, "us": t * 1e6, "host_loop_us": t_host * 1e6,
                   "TB/s": gbps / 1e12, "of_copy": gbps / bw, "rel_err": err}
            extra = f"  (host loop {t_host * 1e6:.1f} us)" if t != t_host else ""
            print(f"  {name} {label:<44} {t * 1e6:10.1f} us  {gbps / 1e12:6.3f} TB/s  "
                  f"{gbps / bw:6.1%} of copy  err {err:.1e}{extra}", flush=True)
            results.append(row)
            return out
        except Exception as e:  # keep going: one failing variant must not hide the rest
            print(f"  {name} {label}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            traceback.print_exc(limit=2, file=sys.stdout)
            return None

    rot = [(q, a, tb, ln) for a in arenas]
    ref = record("xla gather (plain XLA)",
                 functools.partial(xla_gather_decode, geom=geom, max_len=max_pages * t_pp),
                 q, arena, tb, ln, check=False, rotate=rot)
    for cfg in configs:
        f = jax.jit(functools.partial(paged_decode_attention, geom=geom, backend=backend, **cfg))
        record("ours " + ",".join(f"{k}={v}" for k, v in cfg.items()), f, q, arena, tb, ln,
               rotate=rot)
    if r64_configs:
        # The same K/V in a pool with 64-element rows (what a pool that also hosts head_dim-64 or
        # MLA models uses): page rows [kv_heads, 2, 2 chunks, T, 64].
        pool64, geom64 = gqa_pool(64)
        used = geom.used_rows
        pg = arena[:, :used].reshape(n_pages, 8, 2, t_pp, 2, 64).transpose(0, 1, 2, 4, 3, 5)
        arena64 = jnp.zeros(pool64.arena_shape(n_pages), jnp.bfloat16)
        arena64 = arena64.at[:, :geom64.used_rows].set(pg.reshape(n_pages, geom64.used_rows, 64))
        del pg
        for cfg in r64_configs:
            f = jax.jit(functools.partial(paged_decode_attention, geom=geom64, backend=backend,
                                          **cfg))
            record("ours R=64 " + ",".join(f"{k}={v}" for k, v in cfg.items()), f, q, arena64,
                   tb, ln)
        del arena64
    if bundled_cfgs:
        from jax.experimental.pallas.ops.gpu import paged_attention as bundled

        # The same K/V in the bundled kernel's own layout: [kv_heads, pages, page_size, head_dim]
        # (our page with R = 128 is [kv_heads, 2, T, 128]).
        qs = (q.astype(jnp.float32) * 128**-0.5).astype(q.dtype)  # it applies no softmax scale
        brot = []
        for a in arenas:
            pages = a[:, :geom.used_rows].reshape(n_pages, 8, 2, t_pp, 128)
            brot.append((qs, jnp.transpose(pages[:, :, 0], (1, 0, 2, 3)),
                         jnp.transpose(pages[:, :, 1], (1, 0, 2, 3)), tb, ln))
            del pages
        for cfg in bundled_cfgs:
            f = jax.jit(functools.partial(bundled.paged_attention, interpret=smoke, **cfg))
            record("bundled pallas.ops.gpu.paged_attention "
                   + ",".join(f"{k}={v}" for k, v in cfg.items()), f, *brot[0], rotate=brot)
        del brot
    del arena, arenas, rot
    return results


def time_mla(lens: list[int], backend: str, smoke: bool, bw: float,
             configs: list[dict], mgpu_configs: list[dict] | None = None) -> list[dict]:
    """Case (d), MLA decode: XLA and `configs` of the Triton kernel; with ``mgpu_configs``
    (a list, even empty) instead the Mosaic GPU kernel's configurations and not the others
    (XLA still gives the reference). TFLOP/s counts the scores and P @ V of every head:
    ``2 * heads * tokens * (576 + 512)``."""
    heads = 16 if smoke else 128
    pool = PoolLayout(page_bytes=64 * 576 * 2, dtype="bfloat16", row_elems=64)
    geom = page_geometry(KVSpec.mla(512, 64), pool)
    t_pp = geom.tokens_per_page
    rng = np.random.default_rng(2)
    max_pages = -(-max(lens) // t_pp)
    table, n_pages = make_tables(rng, lens, t_pp, max_pages)
    arena = jax.random.normal(jax.random.key(4), pool.arena_shape(n_pages), jnp.bfloat16)
    ql = jax.random.normal(jax.random.key(5), (len(lens), heads, 512), jnp.bfloat16)
    qr = jax.random.normal(jax.random.key(6), (len(lens), heads, 64), jnp.bfloat16)
    tb, ln = jnp.asarray(table), jnp.asarray(lens, jnp.int32)
    kv_bytes = sum(lens) * geom.bytes_per_token_used
    scale = 192**-0.5
    flops = 2 * heads * sum(lens) * (576 + 512)
    rows = []
    ref = xla_gather_mla(ql, qr, arena, tb, ln, geom=geom, max_len=max_pages * t_pp, scale=scale)
    impls = []
    if mgpu_configs is None:
        impls.append(("xla gather (plain XLA)", functools.partial(
            xla_gather_mla, geom=geom, max_len=max_pages * t_pp, scale=scale)))
        for cfg in configs:
            impls.append(("ours " + ",".join(f"{k}={v}" for k, v in cfg.items()), jax.jit(
                functools.partial(paged_mla_decode_attention, geom=geom, scale=scale,
                                  backend=backend, **cfg))))
    for cfg in mgpu_configs or ():
        impls.append(("ours mgpu " + ",".join(f"{k}={v}" for k, v in cfg.items()), jax.jit(
            functools.partial(paged_mla_decode_attention_mgpu, geom=geom, scale=scale,
                              backend=backend, **cfg))))
    for label, f in impls:
        try:
            out = f(ql, qr, arena, tb, ln)
            err = rel_err(out, ref)
            t = bench(f, ql, qr, arena, tb, ln, iters=3 if smoke else 10, trials=3 if smoke else 5)
            gbps = kv_bytes / t
            print(f"  (d) MLA {label:<40} {t * 1e6:10.1f} us  {gbps / 1e12:6.3f} TB/s  "
                  f"{gbps / bw:6.1%} of copy  {flops / t / 1e12:6.1f} TFLOP/s  err {err:.1e}",
                  flush=True)
            rows.append({"case": "(d) mla", "impl": label, "us": t * 1e6, "TB/s": gbps / 1e12,
                         "of_copy": gbps / bw, "TFLOP/s": flops / t / 1e12, "rel_err": err})
        except Exception as e:
            print(f"  (d) MLA {label}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    del arena
    return rows


def _report(checks: list[tuple[str, float, float]]) -> bool:
    """Prints the check rows; True if any failed."""
    bad = False
    for name, err, limit in checks:
        ok = (err <= limit) if limit else err == 0.0
        bad |= not ok
        print(f"  check {name:<40} rel err {err:.2e}  (limit {limit:.0e})  "
              f"{'ok' if ok else 'FAIL'}", flush=True)
    return bad


def _configs(smoke: bool) -> tuple[dict[str, list[int]], list[dict], list[dict], list[int]]:
    """(GQA cases: lengths by name, our kernel's configurations, the bundled kernel's, MLA lengths)."""
    if smoke:
        cases = {"(a)": [256] * 4, "(b)": [1000] + [32] * 7, "(c)": [128] * 8}
        ours = [dict(), dict(schedule="persistent", num_programs=4)]
        return cases, ours, [dict(k_splits=2, pages_per_compute_block=4, block_h=16)], [200] * 2
    cases = {"(a)": [32768] * 16, "(b)": [100_000] + [32] * 63, "(c)": [2048] * 64}
    cases["(e)"] = [1024] * 8  # the shape of the recorded bundled-kernel baseline
    sms = 132
    ours = [
        dict(),
        dict(num_stages=3),
        dict(schedule="persistent"),
        dict(schedule="persistent", items_per_program=4),
        dict(schedule="persistent", block_t=128, num_stages=3),
        dict(schedule="persistent", num_programs=4 * sms),
    ]
    bundled = [dict(k_splits=k, pages_per_compute_block=p) for k, p in ((16, 8), (32, 4), (4, 8))]
    return cases, ours, bundled, [8192] * 32


def _print_tables(rows: list[dict]) -> None:
    """Every row as a markdown table, then the best of each implementation kind per case."""
    print("\n| case | implementation | us | KV TB/s | of copy BW | rel err vs XLA | host-loop us |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['impl']} | {r['us']:.1f} | {r['TB/s']:.3f} | "
              f"{r['of_copy']:.1%} | {r['rel_err']:.1e} | {r.get('host_loop_us', r['us']):.1f} |")
    best = {}
    for r in rows:
        kind = ("mgpu" if r["impl"].startswith("ours mgpu")
                else "ours" if r["impl"].startswith("ours") else r["impl"].split()[0])
        k = (r["case"], kind)
        if k not in best or r["us"] < best[k]["us"]:
            best[k] = r
    print("\nbest per case: ")
    for case in sorted({r["case"] for r in rows}):
        o, bu = best.get((case, "ours")), best.get((case, "bundled"))
        x = best.get((case, "xla"))
        line = f"  {case}: ours {o['us']:.1f} us ({o['of_copy']:.1%} of copy)" if o else f"  {case}:"
        if o and bu:
            line += f", bundled {bu['us']:.1f} us -> {bu['us'] / o['us']:.2f}x"
        if o and x:
            line += f", xla {x['us']:.1f} us -> {x['us'] / o['us']:.2f}x"
        mg = best.get((case, "mgpu"))
        if mg:
            line += (f", mgpu {mg['us']:.1f} us ({mg['TFLOP/s']:.0f} TFLOP/s)"
                     + (f" -> {o['us'] / mg['us']:.2f}x ours" if o else ""))
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes, interpret mode (CPU)")
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--correctness-only", action="store_true", help="check, print, exit (no timing)")
    ap.add_argument("--with-mgpu", action="store_true",
                    help="also check and time the Mosaic GPU MLA kernel, after everything else")
    ap.add_argument("--mla-only", action="store_true",
                    help="only case (d), MLA decode: the GQA cases and their checks are skipped "
                         "(with --with-mgpu the Mosaic kernel's check still runs first)")
    ap.add_argument("--mgpu-configs", default=None, metavar="JSON",
                    help="with --with-mgpu: the Mosaic kernel's configurations to time, a JSON "
                         "list of keyword dicts (default: MGPU_CONFIGS)")
    args = ap.parse_args()
    smoke = args.smoke
    backend = "interpret" if smoke else "gpu"
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}  device {dev.device_kind}  platform {dev.platform}  "
          f"date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    t0 = time.time()
    bw = copy_bandwidth(1 << (20 if smoke else 31))
    print(f"copy bandwidth (read + write): {bw / 1e12:.3f} TB/s", flush=True)
    failed = False
    if not args.skip_correctness and not args.mla_only:
        # With --correctness-only the Mosaic GPU rows come last here; else after the timing.
        failed |= _report(check_correctness(backend, smoke,
                                            with_mgpu=args.with_mgpu and args.correctness_only))
        print(f"correctness done in {time.time() - t0:.0f}s", flush=True)
    if args.correctness_only:
        print(f"correctness {'FAILED' if failed else 'ok'}")
        raise SystemExit(1 if failed else 0)
    cases, ours, bundled_cfgs, mla_lens = _configs(smoke)
    if args.mla_only:
        cases = {}
    rows = []
    for name, lens in cases.items():
        print(f"case {name}: {len(lens)} sequences, {sum(lens)} tokens", flush=True)
        r64 = (dict(),) if name == "(a)" else ()
        rows += time_case(name, lens, backend, smoke, bw, ours, bundled_cfgs, r64)
    print("case (d): MLA decode", flush=True)
    mla_cfgs = [dict(), dict(schedule="persistent")] if smoke else [
        dict(), dict(group_block=64, num_warps=8, block_t=32), dict(schedule="persistent")]
    rows += time_mla(mla_lens, backend, smoke, bw, mla_cfgs)
    if args.with_mgpu:  # last: a CUDA fault here cannot spoil the numbers above
        if not args.skip_correctness:
            print("Mosaic GPU MLA kernel: correctness", flush=True)
            failed |= _report(check_mla_mgpu(backend, smoke))
        print("case (d): MLA decode, Mosaic GPU kernel", flush=True)
        mgpu_cfgs = ([dict()] if smoke else MGPU_CONFIGS) if args.mgpu_configs is None \
            else json.loads(args.mgpu_configs)
        rows += time_mla(mla_lens, backend, smoke, bw, [], mgpu_configs=mgpu_cfgs)
    _print_tables(rows)
    print(f"total {time.time() - t0:.0f}s; correctness {'FAILED' if failed else 'ok'}")
    out_path = args.json or (os.path.join(os.environ["OUT"], "kernels.json")
                             if os.environ.get("OUT") else None)
    if out_path:
        with open(out_path, "w") as fh:
            json.dump({"device": dev.device_kind, "copy_bw": bw, "rows": rows,
                       "correctness_failed": failed}, fh, indent=1)


if __name__ == "__main__":
    main()
