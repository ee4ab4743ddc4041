"""Expert matmuls at prefill shapes on one GPU (issue 16): our kernels against XLA and jax's own.

    PYTHONPATH=. python -m benchmarks.prefill_matmul [--json OUT.json] [--layers-only]  # one GPU
    JAX_PLATFORMS=cpu PYTHONPATH=. python -m benchmarks.prefill_matmul --smoke  # CPU, interpreters

A 2,048-token prefill chunk routed top-8 makes 16,384 expert rows (a 4,096-token chunk 32,768, an
8,192-token call 65,536):
cases (rows M, experts G, K, N) for OLMoE-1B-7B (64 experts; gate/up 2048 x 2048, down 1024 x
2048) and Qwen3-30B-A3B (128 experts; 2048 x 1536, 768 x 2048), and the attention-side
projections of a 2,048- or 4,096-token chunk (one group: OLMoE qkv 2048 x 6144, o 2048 x 2048;
Qwen3 qkv 2048 x 5120, o 4096 x 2048), bf16, group sizes multinomial over a Dirichlet(2) split,
f32 output. Implementations:

- `triton ...`: `arena_grouped_matmul_gpu` (weights row-major in the arena) at its default tiling,
  the tilings of `TRITON_TILINGS` and those `--tilings` adds;
- `mgpu ...`: `arena_grouped_matmul_mgpu` (Mosaic GPU, one warpgroup, wgmma, TMA; weights as column
  panels) and, with `--with-ws` (always in `--smoke`), `mgpu-ws ...`: `arena_grouped_matmul_mgpu_ws`
  (warp-specialized; opt-in because its first GPU run hit a misaligned TMA store, which leaves the
  CUDA context unusable for every later measurement of the run: see its module docstring);
- `jax ragged_dot_mgpu` (jax's Mosaic GPU example kernel, bf16 out) and `xla ragged_dot`, both over
  pre-sliced [G, K, N] weights (the weights already materialised, which the engine cannot afford);
- `dense`: one XLA [M, K] x [K, N] matmul of the same FLOPs (what a matmul of this size reaches).

A second table times a whole routed-expert layer as the engine runs it (`MOE_CASES`: a 2,048- or
4,096-token chunk, top-8): `fused` (the engine's path: the gate/up matmul reads each row's token
through `x_rows` and applies SwiGLU in its epilogue, bf16 out; the down matmul scales rows by their
routing weights and stores them token-major in bf16; then a [T, k, D] sum in f32) against
`unfused` (what the engine ran before: a gathered copy of the tokens, an f32 [rows, 2I] product,
SwiGLU, an f32 [rows, D] product, the routing scale and `moe.unpermute_sum`), both on the Triton
kernel at its default tiling, `fused, 2026-12-05` (the fused layer as the engine ran it before
the tilings of 2026-12-06: f32 rows) and the variants `--layer-tilings` adds (each matmul's
tiling, the down rows' dtype); each output must agree with `unfused` (relative error < 1e-2)
before it is timed.

Correctness first: each of our kernels against a float64 numpy product of its own weight layout on
ragged groups (empty groups, a tail of rows past sum(sizes) that must be exactly 0). Timing: 3
input sets back to back in one program (`benchmarks.kernels.bench_in_jit`), TFLOP/s = 2 M K N /
seconds, and its share of a dense bf16 8192^3 matmul peak measured in the same run
(`benchmarks.kernels.matmul_peak`: calls back to back, as `benchmarks/prefill.py` measures it).
The table prints last. `--smoke` runs the same code at toy sizes under the Pallas interpreters on
CPU: it checks the script, its numbers mean nothing (so each kernel is timed on one input set,
once: `SMOKE_SETS`, `SMOKE_TRIALS`).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import traceback
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.kernels import bench_in_jit, matmul_peak
from crosspool_jax.models.moe import unpermute_sum
from pallas_kernels.arena_matmul_gpu import arena_grouped_matmul_gpu
from pallas_kernels.arena_matmul_mgpu import arena_grouped_matmul_mgpu

R = 128  # the GPU arena's row width
SMOKE_SETS, SMOKE_TRIALS = 1, 1  # --smoke: input sets per program, timed runs (interpreters: slow)
CASES = (("olmoe gate/up", 16384, 64, 2048, 2048), ("olmoe down", 16384, 64, 1024, 2048),
         ("qwen3 gate/up", 16384, 128, 2048, 1536), ("qwen3 down", 16384, 128, 768, 2048),
         ("olmoe gate/up 4K", 32768, 64, 2048, 2048), ("qwen3 gate/up 4K", 32768, 128, 2048, 1536),
         ("olmoe down 4K", 32768, 64, 1024, 2048), ("qwen3 down 4K", 32768, 128, 768, 2048),
         ("olmoe gate/up 8K", 65536, 64, 2048, 2048), ("qwen3 gate/up 8K", 65536, 128, 2048, 1536),
         # the attention-side projections of a prefill chunk: one group (one model)
         ("olmoe qkv 2K", 2048, 1, 2048, 6144), ("olmoe o 2K", 2048, 1, 2048, 2048),
         ("olmoe qkv 4K", 4096, 1, 2048, 6144), ("qwen3 qkv 2K", 2048, 1, 2048, 5120),
         ("qwen3 o 2K", 2048, 1, 4096, 2048), ("olmoe o 4K", 4096, 1, 2048, 2048),
         ("qwen3 qkv 4K", 4096, 1, 2048, 5120), ("qwen3 o 4K", 4096, 1, 4096, 2048))
SMOKE_CASES = (("toy", 256, 4, 128, 256),)
# routed-expert layers: (name, tokens T, top-k, experts E, hidden D, expert intermediate I)
MOE_CASES = (("olmoe layer", 2048, 8, 64, 2048, 1024), ("qwen3 layer", 2048, 8, 128, 2048, 768),
             ("olmoe layer 4K", 4096, 8, 64, 2048, 1024), ("qwen3 layer 4K", 4096, 8, 128, 2048, 768),
             ("olmoe layer 8K", 8192, 8, 64, 2048, 1024))
SMOKE_MOE_CASES = (("toy layer", 24, 2, 4, 128, 128),)
TILING_FIELDS = ("bm", "bn", "bk", "num_warps", "num_stages", "programs")
TRITON_TILINGS: tuple[dict[str, int], ...] = ({}, {"bm": 64, "bk": 128},
                                              {"bm": 128, "bk": 64, "num_warps": 8},
                                              {"bm": 128, "bn": 256, "bk": 64, "num_warps": 8,
                                               "num_stages": 2})
MGPU_CONFIGS: tuple[dict[str, int], ...] = ({}, {"grid_block_n": 4},
                                            {"block_k": 128, "max_concurrent_steps": 3})
WS_CONFIGS: tuple[dict[str, int], ...] = ({}, {"grid_block_n": 4}, {"max_concurrent_steps": 3},
                                          {"wgmma_in_flight": 1}, {"block_m": 64})


def panels_to_kn(block: np.ndarray, k: int, n: int, r: int) -> np.ndarray:
    """A weight stored as N / R column panels ([K * N / R, R] rows) -> [K, N]."""
    return block.reshape(n // r, k, r).transpose(1, 0, 2).reshape(k, n)


def arena_of(g: int, k: int, n: int, r: int, seed: int = 1) -> tuple[jax.Array, np.ndarray]:
    """[rows, r] bf16 arena holding g weights of [K, N] at offsets 8-row aligned with 8-row gaps."""
    rows = k * n // r
    offs = np.array([8 + i * (rows + 8) for i in range(g)], np.int32)
    total = -(-(int(offs[-1]) + rows + 8) // 8) * 8
    return jax.random.normal(jax.random.key(seed), (total, r), jnp.bfloat16), offs


def numpy_product(x: jax.Array, arena: jax.Array, offs: np.ndarray, sizes: np.ndarray, k: int,
                  n: int, panels: bool) -> np.ndarray:
    """The expected [M, N] output (float64 products of the bf16 values), 0 past sum(sizes)."""
    a = np.asarray(arena.astype(jnp.float32), np.float64)
    xs = np.asarray(x.astype(jnp.float32), np.float64)
    r = a.shape[1]
    rows = k * n // r
    y = np.zeros((x.shape[0], n))
    at = 0
    for i, s in enumerate(sizes):
        blk = a[offs[i]:offs[i] + rows]
        w = panels_to_kn(blk, k, n, r) if panels else blk.reshape(k, n)
        y[at:at + s] = xs[at:at + s] @ w
        at += int(s)
    return y


def _spec_variants(spec: str) -> list[tuple[str, list[str]]]:
    """'a=1,b=2;c=3' -> [('a=1,b=2', ['a=1', 'b=2']), ('c=3', ['c=3'])]: a sweep option's variants
    (';'-separated, empty ones dropped) and each one's comma-separated items."""
    texts = [v.strip() for v in spec.split(";")]
    return [(t, [i.strip() for i in t.split(",")]) for t in texts if t]


def parse_tilings(spec: str) -> tuple[dict[str, int], ...]:
    """``--tilings``: Triton tilings separated by ';', each comma-separated ``FIELD=INT`` (FIELD
    one of `TILING_FIELDS`), e.g. 'programs=100000;num_warps=8,bn=256'; ValueError."""
    out = []
    for _, items in _spec_variants(spec):
        tiling = {}
        for item in items:
            field, _, val = item.partition("=")
            if field not in TILING_FIELDS or not val.isdigit():
                raise ValueError(f"{item!r}: expected FIELD=INT with FIELD in {TILING_FIELDS}")
            tiling[field] = int(val)
        out.append(tiling)
    return tuple(out)


def implementations(backend: str, with_ws: bool, extra: tuple[dict[str, int], ...] = ()
                    ) -> list[tuple[str, bool, Callable[..., jax.Array]]]:
    """(label, weights as panels, f(x, arena, offsets, sizes, n)) of our kernels; extra: more
    Triton tilings (`--tilings`)."""
    out: list[tuple[str, bool, Callable[..., jax.Array]]] = []
    for t in TRITON_TILINGS + extra:
        label = "triton " + (" ".join(f"{a}={b}" for a, b in t.items()) or "default")
        out.append((label, False, functools.partial(arena_grouped_matmul_gpu, backend=backend, **t)))
    kernels = [("mgpu", arena_grouped_matmul_mgpu, MGPU_CONFIGS)]
    if with_ws:
        from pallas_kernels.arena_matmul_mgpu_ws import arena_grouped_matmul_mgpu_ws

        kernels.append(("mgpu-ws", arena_grouped_matmul_mgpu_ws, WS_CONFIGS))
    for name, fn, configs in kernels:
        for c in configs:
            label = f"{name} " + (" ".join(f"{a}={b}" for a, b in c.items()) or "default")
            out.append((label, True, functools.partial(fn, backend=backend, **c)))
    return out


def check_correctness(backend: str, smoke: bool, with_ws: bool,
                      impls: tuple[str, ...] | None = None,
                      extra: tuple[dict[str, int], ...] = ()) -> list[dict[str, Any]]:
    """Our kernels (those `impls` selects, as in `time_case`) on ragged cases against
    `numpy_product` (rel. error, tail exactly 0)."""
    rng = np.random.default_rng(7)
    cases = [(200, 3, 128, 256, [70, 0, 100]), (333, 5, 128, 384, [0, 0, 300, 0, 0])]
    if not smoke:
        cases.append((4096, 64, 2048, 1024, list(rng.multinomial(4000, np.ones(64) / 64))))
    rows = []
    for m, g, k, n, sizes in cases:
        arena, offs = arena_of(g, k, n, R)
        x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
        sz = np.asarray(sizes, np.int32)
        want = {p: numpy_product(x, arena, offs, sz, k, n, p) for p in (False, True)}
        for label, panels, f in implementations(backend, with_ws, extra):
            if (smoke and not label.endswith("default") and not extra) or (
                    impls and not label.startswith(impls)):
                continue
            try:
                got = np.asarray(f(x, arena, jnp.asarray(offs), jnp.asarray(sz), n=n), np.float64)
                err = float(np.linalg.norm(got - want[panels]) / np.linalg.norm(want[panels]))
                tail = float(np.abs(got[int(sz.sum()):]).max()) if sz.sum() < m else 0.0
                ok = err < 1e-2 and tail == 0.0
            except Exception as e:  # a kernel that fails to build is reported, not fatal
                err, tail, ok = float("nan"), float("nan"), False
                print(f"  {label}: {type(e).__name__}: {str(e)[:600]}", flush=True)
            rows.append({"case": f"M={m} G={g} K={k} N={n}", "impl": label, "rel_err": err,
                         "tail_max": tail, "ok": ok})
            print(f"check {rows[-1]['case']:28s} {label:36s} rel {err:.1e} tail {tail} "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
    return rows


def time_case(case: tuple, backend: str, peak: float, smoke: bool, with_ws: bool,
              impls: tuple[str, ...] | None = None,
              extra: tuple[dict[str, int], ...] = ()) -> list[dict[str, Any]]:
    """Times our implementations (those whose label starts with one of `impls`; None: all), then
    the baselines, on one `CASES` row."""
    name, m, g, k, n = case
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    arena, offs = arena_of(g, k, n, R)
    sets = [(jax.random.normal(jax.random.key(10 + j), (m, k), jnp.bfloat16), arena, jnp.asarray(offs),
             jnp.asarray(rng.multinomial(m, rng.dirichlet(np.ones(g) * 2)).astype(np.int32)))
            for j in range(SMOKE_SETS if smoke else 3)]
    flops = 2 * m * k * n
    rows: list[dict[str, Any]] = []

    def record(label: str, f: Callable[..., jax.Array], ss: list) -> None:
        try:
            t = bench_in_jit(f, ss, trials=SMOKE_TRIALS if smoke else 5)
        except Exception as e:
            print(f"  {name} {label}: {type(e).__name__}: {str(e)[:600]}", flush=True)
            return
        rows.append({"case": name, "impl": label, "M": m, "G": g, "K": k, "N": n, "us": t * 1e6,
                     "tflops": flops / t / 1e12, "of_peak": flops / t / peak})
        print(f"  {name:18s} {label:36s} {t * 1e6:9.1f} us {flops / t / 1e12:7.1f} TFLOP/s "
              f"{flops / t / peak:6.1%}", flush=True)

    for label, _, f in implementations(backend, with_ws, extra):
        # the interpreters are slow: one tiling each, unless tilings were asked for
        if smoke and not label.endswith("default") and not extra:
            continue
        if impls is not None and not label.startswith(impls):
            continue
        record(label, functools.partial(f, n=n), sets)
    rows_w = k * n // R
    w3 = jnp.stack([lax.dynamic_slice_in_dim(arena, int(o), rows_w).reshape(k, n) for o in offs])
    pre = [(s[0], w3, s[3]) for s in sets]
    record("xla ragged_dot (pre-sliced)",
           lambda x, w, s: lax.ragged_dot(x, w, s, preferred_element_type=jnp.float32), pre)
    if not smoke:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

        record("jax ragged_dot_mgpu (pre-sliced)", lambda x, w, s: ragged_dot_mgpu.ragged_dot(
            x, w, group_sizes=s, block_m=128, block_n=128, block_k=64, max_concurrent_steps=4,
            grid_block_n=1), pre)
    cap = max(int(np.asarray(s[3]).max()) for s in sets)
    cap = -(-cap // 128) * 128
    record(f"xla batched, groups padded to {cap} (pre-sliced)",
           functools.partial(padded_batched_matmul, capacity=cap), pre)
    record("dense (same FLOPs)", lambda x, w, s: jnp.dot(x, w[0], preferred_element_type=jnp.float32), pre)
    if g == 1:  # a projection: XLA's dot on the weight sliced out of the arena inside the program
        for dt in ("float32", "bfloat16"):
            record(f"xla dot, sliced in program, {dt} out", functools.partial(
                sliced_dot, k=k, n=n, out_dtype=dt), sets)
            record(f"triton default, {dt} out", functools.partial(
                arena_grouped_matmul_gpu, n=n, backend=backend, out_dtype=dt), sets)
    return rows


def sliced_dot(x: jax.Array, arena: jax.Array, offs: jax.Array, sizes: jax.Array, *, k: int, n: int,
               out_dtype: str) -> jax.Array:
    """x [M, K] @ the [K, N] weight at arena row offs[0] (sliced out: a K * N copy), f32
    accumulation, out_dtype [M, N]; sizes unused (one group of every row)."""
    del sizes
    w = lax.dynamic_slice_in_dim(arena, offs[0], k * n // arena.shape[1]).reshape(k, n)
    return jnp.dot(x, w, preferred_element_type=jnp.dtype(out_dtype))


def padded_batched_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, capacity: int) -> jax.Array:
    """x [M, K] rows in group order, w [G, K, N], sizes [G] -> [M, N] f32 (0 past sum(sizes)):
    each group's rows gathered into a [G, capacity, K] block (every group <= capacity rows), one
    batched XLA matmul, the rows gathered back. What a capacity-padded dense expert layer costs."""
    g, m = w.shape[0], x.shape[0]
    starts = jnp.cumsum(sizes) - sizes
    c = jnp.arange(capacity)
    rows = jnp.where(c[None, :] < sizes[:, None], starts[:, None] + c[None, :], m)  # [G, C]
    xp = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[rows]
    y = jnp.einsum("gck,gkn->gcn", xp, w, preferred_element_type=jnp.float32)
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(m), side="right")  # [M]
    valid = group < g
    gi = jnp.minimum(group, g - 1)
    return jnp.where(valid[:, None], y[gi, jnp.clip(jnp.arange(m) - starts[gi], 0, capacity - 1)], 0.0)


# a fused layer variant: (gate/up tiling, down tiling, the down rows' dtype or None for f32)
LayerVariant = tuple[dict[str, int], dict[str, int], str | None]
LAYER_VARIANTS: dict[str, LayerVariant | None] = {
    "unfused": None,
    "fused": ({}, {}, "bfloat16"),  # as the engine runs it
    # the engine before 2026-12-06 (later): SwiGLU at bk 64 / 2 stages, the down product's
    # persistent programs (programs 0: the default's ~2 per SM) and f32 rows
    "fused, 2026-12-05": ({"bk": 64, "num_stages": 2}, {"programs": 0}, None)}


def parse_layer_tilings(spec: str) -> dict[str, LayerVariant]:
    """``--layer-tilings``: variants separated by ';', each a comma-separated list of
    ``gu.FIELD=INT`` (the gate/up matmul), ``dn.FIELD=INT`` (the down matmul; FIELD one of
    `TILING_FIELDS`) or ``dn.out=bfloat16`` (the down product's rows stored in bf16 before the
    k-sum instead of f32) -> {label: variant}, the label being the variant's own text."""
    out: dict[str, LayerVariant] = {}
    for text, items in _spec_variants(spec):
        gu: dict[str, int] = {}
        dn: dict[str, int] = {}
        dn_out = None
        for item in items:
            key, _, val = item.partition("=")
            side, _, field = key.partition(".")
            if side == "dn" and field == "out":
                if val not in ("bfloat16", "float32"):
                    raise ValueError(f"{item!r}: dn.out is bfloat16 or float32")
                dn_out = val
            elif side in ("gu", "dn") and field in TILING_FIELDS and val.isdigit():
                (gu if side == "gu" else dn)[field] = int(val)
            else:
                raise ValueError(f"{item!r}: expected gu.FIELD=INT, dn.FIELD=INT (FIELD in "
                                 f"{TILING_FIELDS}) or dn.out=bfloat16")
        out[f"fused {text}"] = (gu, dn, dn_out)
    return out


def moe_layer(variant: LayerVariant | None, backend: str, k: int, inter: int, d: int
              ) -> Callable[..., jax.Array]:
    """f(x [T, D], arena, gate/up offsets [E], down offsets [E], order [T k], sizes [E],
    weights [T k] f32) -> [T, D] f32: one routed-expert layer, unfused (variant None) or fused
    with the variant's tilings (module doc)."""
    mm = functools.partial(arena_grouped_matmul_gpu, backend=backend)

    def run(x, arena, off_gu, off_dn, order, sizes, weights):
        if variant is not None:
            gu, dn, dn_out = variant
            act = mm(x, arena, off_gu, sizes, 2 * inter, x_rows=order // k, swiglu=inter,
                     out_dtype=x.dtype, **gu)
            o = mm(act, arena, off_dn, sizes, d, row_scale=weights, out_rows=order,
                   out_dtype=dn_out or "float32", **dn)
            return o.reshape(-1, k, d).astype(jnp.float32).sum(axis=1)
        h = mm(x[order // k], arena, off_gu, sizes, 2 * inter)
        act = (jax.nn.silu(h[:, :inter]) * h[:, inter:]).astype(x.dtype)
        o = mm(act, arena, off_dn, sizes, d)
        return unpermute_sum(o * weights[:, None], order, k)

    return run


def time_moe_layer(case: tuple, backend: str, smoke: bool, peak: float,
                   variants: dict[str, LayerVariant | None]) -> list[dict[str, Any]]:
    """The variants (LAYER_VARIANTS and --layer-tilings') on one `MOE_CASES` layer: each output
    compared with `unfused`, then each timed (a variant that differs or fails to build is
    reported, not timed). FLOPs: 6 T k D I (gate, up and down)."""
    name, t, k, e, d, inter = case
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    gu, off_gu = arena_of(e, d, 2 * inter, R, seed=3)
    dn, off_dn = arena_of(e, inter, d, R, seed=4)
    arena = jnp.concatenate([gu, dn])
    offs = (jnp.asarray(off_gu), jnp.asarray(off_dn + gu.shape[0]))
    sets = []
    for j in range(SMOKE_SETS if smoke else 3):
        experts = np.stack([rng.choice(e, k, replace=False, p=rng.dirichlet(np.ones(e) * 2))
                            for _ in range(t)]).reshape(-1)
        order = np.argsort(experts, kind="stable").astype(np.int32)
        sizes = np.bincount(experts, minlength=e).astype(np.int32)
        x = jax.random.normal(jax.random.key(20 + j), (t, d), jnp.bfloat16)
        w = jnp.asarray(rng.uniform(0.0, 0.3, t * k), jnp.float32)
        sets.append((x, arena, *offs, jnp.asarray(order), jnp.asarray(sizes), w))
    flops = 6 * t * k * d * inter
    base = np.asarray(jax.jit(moe_layer(None, backend, k, inter, d))(*sets[0]), np.float64)
    rows = []
    for v, spec in variants.items():
        f = moe_layer(spec, backend, k, inter, d)
        try:
            got = np.asarray(jax.jit(f)(*sets[0]), np.float64)
        except Exception as ex:  # a tiling the card cannot build (e.g. shared memory)
            print(f"  {name}: {v}: {type(ex).__name__}: {str(ex)[:400]}", flush=True)
            rows.append({"case": name, "impl": v, "ok": False, "error": str(ex)[:400]})
            continue
        err = float(np.linalg.norm(got - base) / np.linalg.norm(base))
        print(f"  {name}: {v} vs unfused rel err {err:.1e}", flush=True)
        if not err < 1e-2:
            rows.append({"case": name, "impl": v, "rel_err": err, "ok": False})
            continue
        us = bench_in_jit(f, sets, trials=SMOKE_TRIALS if smoke else 5) * 1e6
        rows.append({"case": name, "impl": v, "T": t, "k": k, "E": e, "D": d, "I": inter,
                     "us": us, "tflops": flops / us / 1e6, "of_peak": flops / (us * 1e-6) / peak,
                     "rel_err": err, "ok": True})
        print(f"  {name:18s} {v:40s} {us:9.1f} us", flush=True)
    return rows


def pick_cases(cases: tuple, names: str | None) -> tuple:
    """The cases named in a comma-separated list (None: all of them); ValueError on a name that
    is not a case."""
    if not names:
        return cases
    wanted = [c.strip() for c in names.split(",")]
    unknown = set(wanted) - {c[0] for c in cases}
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; known: {[c[0] for c in cases]}")
    return tuple(c for c in cases if c[0] in wanted)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes under the interpreters (CPU)")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    ap.add_argument("--with-ws", action="store_true", help="also the warp-specialized Mosaic kernel")
    ap.add_argument("--cases", default=None,
                    help="comma-separated case names to time (default all; e.g. 'olmoe gate/up 4K')")
    ap.add_argument("--impls", default=None,
                    help="comma-separated label prefixes of our implementations to time (e.g. "
                         "'triton default,mgpu-ws'; default all)")
    ap.add_argument("--tilings", default="",
                    help="more Triton tilings to time: 'programs=100000;num_warps=8,bn=256' "
                         "(see parse_tilings)")
    ap.add_argument("--layer-cases", default=None,
                    help="comma-separated MoE layer case names (default all; e.g. 'olmoe layer 4K')")
    ap.add_argument("--layer-tilings", default="",
                    help="more fused-layer variants: 'gu.num_stages=3;dn.num_warps=8,dn.out=bfloat16' "
                         "(see parse_layer_tilings)")
    ap.add_argument("--layers-only", action="store_true",
                    help="only the MoE layer table (fused vs unfused): the kernel sweep takes minutes")
    args = ap.parse_args(argv)
    with_ws = args.with_ws or args.smoke
    dev = jax.devices()[0]
    backend = "interpret" if args.smoke else "gpu"
    if not args.smoke and dev.platform != "gpu":
        print(f"needs a GPU (found {dev.platform}); use --smoke on CPU", file=sys.stderr)
        return 2
    impls = tuple(i.strip() for i in args.impls.split(",")) if args.impls else None
    try:
        extra = parse_tilings(args.tilings)
    except ValueError as e:
        ap.error(f"--tilings: {e}")
    checks = [] if args.layers_only else check_correctness(backend, args.smoke, with_ws, impls,
                                                           extra)
    peak = matmul_peak(256 if args.smoke else 8192, "bfloat16")
    rows = []
    try:
        cases = pick_cases(SMOKE_CASES if args.smoke else CASES, args.cases)
        layer_cases = pick_cases(SMOKE_MOE_CASES if args.smoke else MOE_CASES, args.layer_cases)
    except ValueError as e:
        ap.error(str(e))
    for case in [] if args.layers_only else cases:
        try:
            rows += time_case(case, backend, peak, args.smoke, with_ws, impls, extra)
        except Exception:
            print(f"case {case[0]} failed:\n{traceback.format_exc()[-1500:]}", flush=True)
    try:
        variants = {**LAYER_VARIANTS, **parse_layer_tilings(args.layer_tilings)}
    except ValueError as e:
        ap.error(f"--layer-tilings: {e}")
    layers: list[dict[str, Any]] = []
    for case in layer_cases:
        try:
            layers += time_moe_layer(case, backend, args.smoke, peak, variants)
        except Exception:
            print(f"case {case[0]} failed:\n{traceback.format_exc()[-1500:]}", flush=True)
    out = {"benchmark": "benchmarks/prefill_matmul.py", "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "command": " ".join(sys.argv), "device": dev.device_kind, "jax": jax.__version__,
        "peak_flops": peak, "correctness": checks, "rows": rows, "moe_layers": layers}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    print(f"\n{dev.device_kind}; dense bf16 peak {peak / 1e12:.1f} TFLOP/s; correctness "
          f"{'ok' if all(c['ok'] for c in checks) else 'FAILED'}")
    print(f"{'case':18s} {'implementation':36s} {'us':>9s} {'TFLOP/s':>8s} {'of peak':>8s}")
    for r in rows:
        print(f"{r['case']:18s} {r['impl']:36s} {r['us']:9.1f} {r['tflops']:8.1f} {r['of_peak']:8.1%}")
    print(f"\n{'MoE layer':18s} {'variant':40s} {'us':>9s} {'vs unfused':>10s} {'of peak':>8s} "
          f"{'rel err':>8s}")
    by = {(r["case"], r["impl"]): r for r in layers}
    for case in {r["case"]: None for r in layers}:
        base = by.get((case, "unfused"))
        for v in variants:
            r = by.get((case, v))
            if r is None:
                continue
            if not r["ok"]:
                why = r.get("error") or f"differs from unfused: rel err {r['rel_err']:.1e}"
                print(f"{case:18s} {v:40s} FAILED ({why[:80]})")
                continue
            vs = f"{base['us'] / r['us']:9.2f}x" if base and base.get("ok") else f"{'-':>10s}"
            print(f"{case:18s} {v:40s} {r['us']:9.1f} {vs} {r['of_peak']:8.1%} {r['rel_err']:8.1e}")
    ok = all(c["ok"] for c in checks) and all(r["ok"] for r in layers)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
