"""Call 3 (2026-12-08): the MLA decode kernel's old default against the in-order 64-token schedule,
four interleaved rounds each (40 calls x 5 trials, median), on 32 x 8K and a ragged batch of 32.
Run from the checkout root with PYTHONPATH=. (the code of 2026-12-08 before the default changed:
``{}`` was then 32-token blocks, 4 stages, lookahead)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import bench, make_tables, matmul_peak
from pallas_kernels.mla_decode_mgpu import paged_mla_decode_attention_mgpu
from pallas_kernels.page_layout import KVSpec, PoolLayout, page_geometry

pool = PoolLayout(page_bytes=64 * 576 * 2, dtype="bfloat16", row_elems=64)
geom = page_geometry(KVSpec.mla(512, 64), pool)
rng = np.random.default_rng(7)
for case, lens in [("32x8K", [8192] * 32), ("ragged", list(rng.integers(512, 16384, 32)))]:
    max_pages = -(-max(lens) // 64)
    table, n_pages = make_tables(rng, lens, 64, max_pages)
    arena = jax.random.normal(jax.random.key(4), pool.arena_shape(n_pages), jnp.bfloat16)
    ql = jax.random.normal(jax.random.key(5), (32, 128, 512), jnp.bfloat16)
    qr = jax.random.normal(jax.random.key(6), (32, 128, 64), jnp.bfloat16)
    args = (ql, qr, arena, jnp.asarray(table), jnp.asarray(lens, jnp.int32))
    vs = {"default": {}, "io64": dict(block_t=64, stages=2, lookahead=False),
          "io64 wg0 4": dict(block_t=64, stages=2, lookahead=False, wg0_chunks=4)}
    fs = {k: jax.jit(functools.partial(paged_mla_decode_attention_mgpu, geom=geom,
                                       scale=192**-0.5, **v)) for k, v in vs.items()}
    ref = fs["default"](*args).astype(jnp.float32)
    for k, f in fs.items():
        e = float(jnp.abs(f(*args).astype(jnp.float32) - ref).max())
        print(case, k, "max diff vs default", e, flush=True)
    res = {k: [] for k in fs}
    for _ in range(4):
        for k, f in fs.items():
            res[k].append(bench(f, *args, iters=40, trials=5) * 1e6)
    peak = matmul_peak(8192, "bfloat16")
    fl = 2 * 128 * sum(int(x) for x in lens) * (576 + 512)
    for k, v in res.items():
        print(f"| {case} | {k} | {' / '.join(f'{x:.1f}' for x in v)} | median {np.median(v):.1f} us"
              f" | {fl / peak * 1e6 / np.median(v):.1%} of floor"
              f" | {np.median(res['default']) / np.median(v):.2f}x |", flush=True)
