"""GPU (Pallas, Triton lowering) kernel of `pallas_kernels.arena_matmul`: weights read in place.

Contract: the module docstring of `pallas_kernels.arena_matmul` (this file only implements it).

Tiling (megablox-like, but every row tile lies inside ONE group):

* Each non-empty group ``g`` (rows ``[start_g, end_g)``, sizes clipped so that nothing passes M)
  is cut into ``cdiv(size_g, bm)`` row tiles starting at ``start_g``; the rows past
  ``sum(sizes)`` (the tail) are cut the same way. A *work item* is one such tile: group items
  first (in group order), then tail items. Tiles never straddle groups, so a group of <= bm rows
  reads its weight exactly once (per column block), wherever it starts.
* With the tail counted as one more part, ``sum_g cdiv(s_g, bm) <= cdiv(M, bm) + G`` (since
  ``cdiv(a) + cdiv(b) <= cdiv(a + b) + 1``): a static bound on the live items.
* Grid ``(N // bn, split_k, P)``, column blocks fastest: program ``(j, s, p)`` takes items
  ``p, p + P, p + 2P, ...`` below the live count (a dynamic trip count), for columns
  ``[j * bn, (j + 1) * bn)`` and K-split ``s``. ``P`` is at most the item bound (one item per
  program) and by default about 2 programs per SM in all, so a call whose groups are mostly
  empty does not launch G mostly idle programs per column block; the programs with items are
  the first launched.
* The item -> (group, rows) map is computed INSIDE the kernel from ``sizes`` (one [G] vector
  load, two cumsums, then per item a compare-count and a few masked sums), so a call is one
  launch with no jnp prologue (a split-K call adds one jnp sum of the [split_k, M, N] partials).
* Per item: a loop over its k-blocks of ``bk`` (0 steps for tail items), loading the x tile
  ``[bm, bk]`` (masked rows) and the weight tile as ``bn / R`` arena-row gathers of ``[bk, R]``
  (row ``offsets[g] + k * (N / R) + j * bn / R + c``, the pattern of the attention kernels:
  each row is R contiguous elements), f32 accumulation with ``lax.dot_general`` (fp32 weights:
  ``Precision.HIGHEST``, i.e. IEEE fp32, not tf32), then a row-masked store. Tail items store
  zeros without touching a weight, so every output element is written once by exactly one
  program (per split), and an empty group costs nothing but its lane in the item map.

Backends: "gpu" (Triton) and "interpret" (the same kernel under the generic Pallas interpreter on
CPU: that is how tests/kernels/test_arena_matmul.py checks it).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels._common import (
    dot_precision,
    gather_rows,
    gpu_compiler_params,
    interpret_flag,
    next_pow2,
)


class Config(NamedTuple):
    """Static tiling of one call (see `default_config`)."""

    bm: int  # rows per work item (>= 16: Triton dots)
    bn: int  # output columns per program (a multiple of R)
    bk: int  # contraction block per loop step
    split_k: int  # K splits (partials summed by jnp after the kernel)
    num_warps: int
    num_stages: int
    programs: int  # item programs per (column block, split): program p does items p, p + P, ...


def _num_sms() -> int:
    from pallas_kernels.attention_core import num_sms

    return num_sms()


def default_config(m: int, k: int, n: int, g: int, r: int, itemsize: int,
                   num_sms: int | None = None, **given: int | None) -> Config:
    """Static tiling from the shapes only (the live item count is only known on device).

    given: fields fixed by the caller (None: choose); the others are derived from them, in the
    order bm, bn, bk, split_k, programs, so e.g. a given bn changes the default split_k.

    bm: the next power of two of the mean rows per group, within [16, 128] (decode MoE: 16; a
    plain projection of 32 rows: one item of 32, so its weight is read once; a prefill chunk of
    2,048 tokens over 64 experts: 128).
    bn: 128 (or R if R > 128). bk: 128 for 2-byte weights, 64 for fp32 (~32 KiB weight tile a
    stage either way) and for bm 128. On one H200 (docs/benchmarks.md, "Prefill expert
    matmuls"), 16,384-32,768 prefill rows over 64 / 128 experts ran 1.10-1.35x faster (two
    runs) at bm 128 / bk 64 than at bm 64 / bk 128.
    split_k: only when even the upper bound of live items times N / bn leaves SMs idle (the
    few-groups case, e.g. a dense projection): enough splits for about 2 programs per SM, each
    split at least 4 k-blocks.
    programs: item programs P per (column block, split), about 2 programs per SM in all, at most
    the item bound ``cdiv(M, bm) + G`` (then one item each). A smaller P makes each program walk
    several items instead of launching programs that find no item (the bound counts G items
    even when most groups are empty).
    """
    unknown = set(given) - set(Config._fields)
    if unknown:
        raise TypeError(f"unknown tiling fields {sorted(unknown)}")
    sms = num_sms or _num_sms()
    bm = given.get("bm") or min(128, max(16, next_pow2(-(-m // max(1, min(g, m))))))
    bn = given.get("bn") or (max(r, 128) if n % max(r, 128) == 0 else r)
    # a [128, 128] x [128, 128] bf16 stage pair would be 64 KiB; bk 64 keeps 3 stages in SMEM
    bk = given.get("bk") or min(128 if itemsize <= 2 and bm < 128 else 64, max(16, next_pow2(k)))
    split_k = given.get("split_k")
    if not split_k:
        # Upper bound of live group items (tail items load nothing, so they are not counted).
        progs = (-(-m // bm) + max(0, min(g, m) - 1)) * (n // bn)
        split_k = 1
        if progs < sms:
            split_k = max(1, min(-(-2 * sms // max(progs, 1)), -(-k // bk) // 4, 8))
    programs = given.get("programs") or max(
        1, min(-(-m // bm) + g, -(-2 * sms // ((n // bn) * split_k))))
    return Config(bm=bm, bn=bn, bk=bk, split_k=split_k, num_warps=given.get("num_warps") or 4,
                  num_stages=given.get("num_stages") or 3, programs=programs)


def _kernel(sizes_ref, offsets_ref, x_ref, w_ref, o_ref, *, g: int, gp: int, m: int, k: int,
            n: int, cfg: Config, nks: int, num_rows: int):
    bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
    r = w_ref.shape[1]
    nk = -(-k // bk)
    jn = pl.program_id(0)  # column block (fastest: all column blocks of an item run together)
    s = pl.program_id(1)  # K split
    p = pl.program_id(2)  # item program: items p, p + P, ... (live items come first)
    n_prog = pl.num_programs(2)
    w_dtype = w_ref.dtype
    prec = dot_precision(w_dtype)

    # --- item map: vector ops on the [gp] sizes/offsets (lanes >= g are 0), once per program.
    gi = lax.broadcasted_iota(jnp.int32, (gp,), 0)
    gmask = gi < g
    gidx = jnp.minimum(gi, g - 1)
    sz = jnp.maximum(pltriton.load(sizes_ref.at[gidx], mask=gmask, other=0), 0)
    off_v = pltriton.load(offsets_ref.at[gidx], mask=gmask, other=0)
    ends_raw = jnp.cumsum(sz)
    end = jnp.minimum(ends_raw, m)
    start = jnp.minimum(ends_raw - sz, m)
    size = end - start  # clipped: sum(size) <= M
    tiles = (size + bm - 1) // bm
    t_end = jnp.cumsum(tiles)
    first = t_end - tiles  # first item of each group
    n_grp = jnp.sum(tiles)
    total = jnp.sum(size)
    n_live = n_grp + (m - total + bm - 1) // bm  # group items, then tail items (zeros)
    n_mine = jnp.maximum(n_live - p + n_prog - 1, 0) // n_prog

    chunks = bn // r
    stride = n // r  # arena rows per weight row (k)
    col_row = jn * chunks  # arena-row offset of this program's first column chunk
    k_tail = k % bk != 0
    k_lo = s * nks

    def item(t, carry):
        i = p + t * n_prog
        grp = jnp.sum((t_end <= i).astype(jnp.int32))  # the group of item i (when i < n_grp)
        sel = gi == grp

        def pick(v):
            return jnp.sum(jnp.where(sel, v, 0))

        in_grp = i < n_grp
        row0 = jnp.where(in_grp, pick(start) + (i - pick(first)) * bm, total + (i - n_grp) * bm)
        row_end = jnp.minimum(row0 + bm, jnp.where(in_grp, pick(end), m))
        w_off = pick(off_v)
        n_steps = jnp.where(in_grp, jnp.clip(nk - k_lo, 0, nks), 0)  # tail items: no weights
        rows = row0 + lax.broadcasted_iota(jnp.int32, (bm,), 0)
        rmask = rows < row_end

        def body(kb, accs):
            k0 = (k_lo + kb) * bk
            kk = k0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
            xm = jnp.broadcast_to(rmask[:, None], (bm, bk))
            if k_tail:
                xm = xm & (kk < k)[None, :]
            xt = pltriton.load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=xm, other=0)
            xt = xt.astype(w_dtype)
            wrow = w_off + jnp.minimum(kk, k - 1) * stride + col_row
            wm = jnp.broadcast_to((kk < k)[:, None], (bk, r)) if k_tail else None
            out = []
            for c, acc in enumerate(accs):
                rows_c = jnp.clip(wrow + c, 0, num_rows - 1)  # in bounds even for a bad offset
                wt = pltriton.load(gather_rows(w_ref, rows_c, r), mask=wm,
                                   other=0 if k_tail else None)
                out.append(acc + lax.dot_general(
                    xt, wt, (((1,), (0,)), ((), ())),
                    preferred_element_type=jnp.float32, precision=prec))
            return tuple(out)

        init = tuple(jnp.zeros((bm, r), jnp.float32) for _ in range(chunks))
        accs = lax.fori_loop(0, n_steps, body, init)
        smask = jnp.broadcast_to(rmask[:, None], (bm, r))
        for c, acc in enumerate(accs):
            pltriton.store(o_ref.at[s, pl.ds(row0, bm), pl.ds(jn * bn + c * r, r)], acc,
                           mask=smask)
        return carry

    lax.fori_loop(0, n_mine, item, jnp.int32(0))


@functools.partial(
    jax.jit,
    static_argnames=("n", "backend", "bm", "bn", "bk", "split_k", "num_warps", "num_stages",
                     "programs"),
)
def arena_grouped_matmul_gpu(
    x: jax.Array,
    arena_rows: jax.Array,
    offsets: jax.Array,
    sizes: jax.Array,
    n: int,
    *,
    backend: str = "gpu",
    bm: int | None = None,
    bn: int | None = None,
    bk: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs: int | None = None,
) -> jax.Array:
    """`pallas_kernels.arena_matmul.arena_grouped_matmul` on the Pallas GPU kernel.

    x: [M, K]; arena_rows: [num_rows, R]; offsets, sizes: [G] int32; n: N (static, N % R == 0).
    backend: "gpu" (Triton) or "interpret" (CPU). Tiling arguments default to `default_config`
    (bm >= 16 and bn, bk powers of two; bn a multiple of R dividing N).
    Returns [M, N] float32; rows past ``sum(sizes)`` are 0.
    """
    from pallas_kernels.arena_matmul import check_args

    check_args(x, arena_rows, offsets, sizes, n)
    if backend not in ("gpu", "interpret"):
        raise ValueError(f"backend {backend!r}: expected 'gpu' or 'interpret'")
    m, k = x.shape
    num_rows, r = arena_rows.shape
    g = offsets.shape[0]
    if m == 0 or g == 0:
        return jnp.zeros((m, n), jnp.float32)
    cfg = default_config(m, k, n, g, r, jnp.dtype(arena_rows.dtype).itemsize, bm=bm, bn=bn,
                         bk=bk, split_k=split_k, num_warps=num_warps, num_stages=num_stages,
                         programs=programs)
    for name in ("bm", "bn", "bk"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16 (Triton dots)")
    if cfg.bn % r or n % cfg.bn:
        raise ValueError(f"bn={cfg.bn} must be a multiple of R={r} and divide N={n}")
    nk = -(-k // cfg.bk)
    split = max(1, min(cfg.split_k, nk))
    nks = -(-nk // split)
    split = -(-nk // nks)  # no split without a k-block
    gp = max(8, next_pow2(g))
    # More than the item bound would find no item; the grid's third axis holds at most 65535.
    n_prog = max(1, min(cfg.programs, -(-m // cfg.bm) + g, 65535))
    kernel = functools.partial(_kernel, g=g, gp=gp, m=m, k=k, n=n, cfg=cfg, nks=nks,
                               num_rows=num_rows)
    out = pl.pallas_call(
        kernel,
        grid=(n // cfg.bn, split, n_prog),
        out_shape=jax.ShapeDtypeStruct((split, m, n), jnp.float32),
        interpret=interpret_flag(backend),
        compiler_params=(gpu_compiler_params(cfg.num_warps, cfg.num_stages)
                         if backend == "gpu" else None),
        name="arena_grouped_matmul",
    )(sizes.astype(jnp.int32), offsets.astype(jnp.int32), x, arena_rows)
    return out.reshape(m, n) if split == 1 else jnp.sum(out, axis=0)


__all__ = ["Config", "arena_grouped_matmul_gpu", "default_config"]
