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


def _default_bm(m: int, g: int, group_rows: int | None = None) -> int:
    """The next power of two of the rows a non-empty group holds (group_rows, or the mean over
    all groups), within [16, 128]."""
    return min(128, max(16, next_pow2(group_rows or -(-m // max(1, min(g, m))))))


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
    bm = given.get("bm") or _default_bm(m, g)
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


class Fusion(NamedTuple):
    """What a call fuses around the matmul (static; the defaults fuse nothing).

    gather_x: row i of the product reads ``x[x_rows[i]]`` (x_rows [M] int32), so a permuted copy
      of x is never written (MoE: the tokens' rows in expert order).
    swiglu: ``inter > 0``: the weight's columns are ``[gate (inter) | up (inter) | padding]`` and
      the output is ``silu(x W_gate) * (x W_up)``, [M, inter], computed from the f32 accumulators
      (no [M, 2 * inter] f32 intermediate in memory); 0: the plain product.
    scale_rows: output row i times ``row_scale[i]`` (f32 [M]; MoE: the routing weight).
    scatter: output row i is stored at row ``out_rows[i]`` (int32 [M], a permutation of [0, M)),
      so the result comes out in the caller's order instead of the groups' (MoE: token-major).
    """

    gather_x: bool = False
    swiglu: int = 0
    scale_rows: bool = False
    scatter: bool = False

    @property
    def any(self) -> bool:
        return self.gather_x or self.swiglu > 0 or self.scale_rows or self.scatter


def _item_map(sizes_ref, offsets_ref, *, g: int, gp: int, m: int, bm: int):
    """Per-group vectors of the item map (lanes >= g are 0): (start, end, offset, first item,
    items' end) [gp] each, and the scalars (group items, live items, rows in groups)."""
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
    return (gi, start, end, off_v, first, t_end), (n_grp, n_live, total)


def _epilogue(accs: tuple, fusion: Fusion, chunks: int, scale) -> list:
    """The [bm, R] f32 output tiles of an item from its accumulators (gate tiles, then up tiles
    under SwiGLU); scale: [bm] row factors or None."""
    outs = list(accs)
    if fusion.swiglu:
        outs = [jax.nn.silu(a) * b for a, b in zip(accs[:chunks], accs[chunks:], strict=True)]
    if scale is not None:
        outs = [o * scale[:, None] for o in outs]
    return outs


def _kernel(*refs, g: int, gp: int, m: int, k: int, n: int, cfg: Config, nks: int, num_rows: int,
            fusion: Fusion):
    sizes_ref, offsets_ref, x_ref, w_ref, *aux, o_ref = refs
    x_rows_ref = aux.pop(0) if fusion.gather_x else None
    scale_ref = aux.pop(0) if fusion.scale_rows else None
    dest_ref = aux.pop(0) if fusion.scatter else None
    bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
    r = w_ref.shape[1]
    nk = -(-k // bk)
    jn = pl.program_id(0)  # column block (fastest: all column blocks of an item run together)
    s = pl.program_id(1)  # K split
    p = pl.program_id(2)  # item program: items p, p + P, ... (live items come first)
    n_prog = pl.num_programs(2)
    w_dtype = w_ref.dtype
    prec = dot_precision(w_dtype)
    (gi, start, end, off_v, first, t_end), (n_grp, n_live, total) = _item_map(
        sizes_ref, offsets_ref, g=g, gp=gp, m=m, bm=bm)
    n_mine = jnp.maximum(n_live - p + n_prog - 1, 0) // n_prog

    chunks = bn // r
    stride = n // r  # arena rows per weight row (k)
    # arena-row offsets (within a weight row) of this program's column chunks: gate, then up
    col_rows = [jn * chunks + c for c in range(chunks)]
    if fusion.swiglu:
        col_rows += [fusion.swiglu // r + jn * chunks + c for c in range(chunks)]
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
        src = None
        if x_rows_ref is not None:
            src = pltriton.load(x_rows_ref.at[pl.ds(row0, bm)], mask=rmask, other=0)

        def body(kb, accs):
            k0 = (k_lo + kb) * bk
            kk = k0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
            xm = jnp.broadcast_to(rmask[:, None], (bm, bk))
            if k_tail:
                xm = xm & (kk < k)[None, :]
            if src is None:
                xt = pltriton.load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=xm, other=0)
            else:
                xt = pltriton.load(x_ref.at[src[:, None], kk[None, :]], mask=xm, other=0)
            xt = xt.astype(w_dtype)
            wrow = w_off + jnp.minimum(kk, k - 1) * stride
            wm = jnp.broadcast_to((kk < k)[:, None], (bk, r)) if k_tail else None
            out = []
            for cr, acc in zip(col_rows, accs, strict=True):
                rows_c = jnp.clip(wrow + cr, 0, num_rows - 1)  # in bounds even for a bad offset
                wt = pltriton.load(gather_rows(w_ref, rows_c, r), mask=wm,
                                   other=0 if k_tail else None)
                out.append(acc + lax.dot_general(
                    xt, wt, (((1,), (0,)), ((), ())),
                    preferred_element_type=jnp.float32, precision=prec))
            return tuple(out)

        init = tuple(jnp.zeros((bm, r), jnp.float32) for _ in col_rows)
        accs = lax.fori_loop(0, n_steps, body, init)
        scale = (None if scale_ref is None
                 else pltriton.load(scale_ref.at[pl.ds(row0, bm)], mask=rmask, other=0.0))
        _store_item(o_ref, dest_ref, _epilogue(accs, fusion, chunks, scale), fusion=fusion,
                    split=s, col0=jn * bn, row0=row0, rmask=rmask, m=m)
        return carry

    lax.fori_loop(0, n_mine, item, jnp.int32(0))


def _store_item(o_ref, dest_ref, outs: list, *, fusion: Fusion, split, col0, row0, rmask, m: int
                ) -> None:
    """Stores an item's [bm, R] output tiles (columns ``col0 + c * R``), rounded to the output's
    dtype: into the K split's [split, M, N] partials when nothing is fused, else into [M, N_out]
    at its rows or, with `out_rows`, at the rows `dest_ref` names."""
    bm, r = outs[0].shape
    smask = jnp.broadcast_to(rmask[:, None], (bm, r))
    if not fusion.any:
        for c, o in enumerate(outs):
            pltriton.store(o_ref.at[split, pl.ds(row0, bm), pl.ds(col0 + c * r, r)],
                           o.astype(o_ref.dtype), mask=smask)
        return
    # masked-off rows point past the output: the interpreter writes masked lanes back (a store
    # to row 0 would race the real one); on GPU a masked lane touches no memory
    dst = (None if dest_ref is None
           else pltriton.load(dest_ref.at[pl.ds(row0, bm)], mask=rmask, other=m))
    cols = lax.broadcasted_iota(jnp.int32, (1, r), 1)
    for c, o in enumerate(outs):
        at = (o_ref.at[pl.ds(row0, bm), pl.ds(col0 + c * r, r)] if dst is None
              else o_ref.at[dst[:, None], col0 + c * r + cols])  # a scattered store of whole rows
        pltriton.store(at, o.astype(o_ref.dtype), mask=smask)


def _check_fusion(fusion: Fusion, m: int, n: int, r: int, x_rows, row_scale, out_rows) -> None:
    for flag, arr, name in ((fusion.gather_x, x_rows, "x_rows"),
                            (fusion.scale_rows, row_scale, "row_scale"),
                            (fusion.scatter, out_rows, "out_rows")):
        if flag and arr.shape != (m,):
            raise ValueError(f"{name} {arr.shape} must be [M={m}]")
    if fusion.swiglu and (fusion.swiglu % r or 2 * fusion.swiglu > n):
        raise ValueError(f"swiglu inter={fusion.swiglu} must be a multiple of R={r} with "
                         f"2 * inter <= N={n}")


def _call_config(m: int, k: int, n_out: int, g: int, r: int, itemsize: int, fusion: Fusion,
                 group_rows: int | None = None, **given: int | None) -> Config:
    """`default_config` of one call with its fusions (no K split; SwiGLU: one R-wide chunk per
    half and 8 warps at 128 x 128), checked against what the kernel can tile; ValueError.

    Prefill-sized groups (bm 128: 65 or more rows a group on average) get the tilings that ran
    the fused OLMoE-1B-7B and Qwen3-30B-A3B expert layers 1.42-1.58x faster on one H100 at
    2,048- and 4,096-token chunks (docs/benchmarks.md, "One H100, 2026-12-06 (later)",
    `benchmarks/prefill_matmul.py --layer-tilings`): SwiGLU at bk 32 with 4 stages (2 stages of
    bk 64 before; 48 KiB a stage of one x and two weight tiles is 3 stages at most), and the
    scattered down product with one program per item instead of ~2 persistent programs per SM
    (its 1,024- or 768-deep K loop is short, so a persistent program's per-item pipeline fill
    and epilogue were not hidden). Plain products of prefill-sized groups (the attention-side
    projections) also run one program per item: 1.04-1.15x on a 2,048-token chunk's qkv and o
    projections (one H100, the same section; the SwiGLU matmul was not faster that way). Smaller
    groups (decode) keep the tilings measured for them.
    group_rows: the rows a non-empty group is expected to hold, when the caller knows better than
    the mean over all G groups (a prefill chunk of one model in a program of several: its
    experts' groups are full, the other models' empty); it sets bm unless bm is given.
    """
    if fusion.any:
        given["split_k"] = 1
        if fusion.swiglu and given.get("bn") is None:
            given["bn"] = r  # two accumulator sets (gate, up): one R-wide chunk each
    if given.get("bm") is None and group_rows:
        given["bm"] = _default_bm(m, g, group_rows)
    prefill_rows = (given.get("bm") or _default_bm(m, g)) >= 128
    if fusion.swiglu and prefill_rows and given.get("bk") is None:
        given["bk"] = min(32, max(16, next_pow2(k)))
    if not fusion.swiglu and prefill_rows and given.get("programs") is None:
        given["programs"] = 1 << 30  # capped at the item bound by the caller: one item each
    cfg = default_config(m, k, n_out, g, r, itemsize, **given)
    if fusion.swiglu and given.get("num_warps") is None and cfg.bm * cfg.bn >= 128 * 128:
        cfg = cfg._replace(num_warps=8)  # 2 [bm, bn] f32 accumulators: 128 registers a thread
    if fusion.swiglu and given.get("num_stages") is None:
        # Two weight tiles a stage: at 3 stages of bk 64 the OLMoE prefill layer asked the H200
        # for 245,760 bytes of shared memory (232,448 available, 2026-12-05)
        cfg = cfg._replace(num_stages=4 if prefill_rows and cfg.bk <= 32 else 2)
    for name in ("bm", "bn", "bk"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two >= 16 (Triton dots)")
    if cfg.bn % r or n_out % cfg.bn:
        raise ValueError(f"bn={cfg.bn} must be a multiple of R={r} and divide N={n_out}")
    return cfg


@functools.partial(
    jax.jit,
    static_argnames=("n", "backend", "bm", "bn", "bk", "split_k", "num_warps", "num_stages",
                     "programs", "swiglu", "out_dtype", "group_rows"),
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
    x_rows: jax.Array | None = None,
    swiglu: int = 0,
    row_scale: jax.Array | None = None,
    out_rows: jax.Array | None = None,
    out_dtype: str = "float32",
    group_rows: int | None = None,
) -> jax.Array:
    """`pallas_kernels.arena_matmul.arena_grouped_matmul` on the Pallas GPU kernel.

    x: [M, K], or [T, K] read through x_rows [M] int32; arena_rows: [num_rows, R]; offsets,
    sizes: [G] int32; n: N (static, N % R == 0). backend: "gpu" (Triton) or "interpret" (CPU).
    Tiling arguments default to `default_config` and `_call_config`'s rules (fused calls,
    prefill-sized groups; bm >= 16 and bn, bk powers of two; bn a multiple of R dividing N, or
    dividing ``swiglu``; programs 0: the persistent default, ~2 programs per SM, even where the
    prefill rule would launch one per item); group_rows: a tiling hint, the rows a non-empty
    group is expected to hold (None: M / G; `_call_config`).
    Fusions (`Fusion`): x_rows (gather), swiglu (static inter: [M, inter] output), row_scale
    [M] f32, out_rows [M] int32 (a permutation of [0, M): where each row is stored); any of them
    runs without a K split.
    Returns [M, N] (or [M, swiglu]) `out_dtype` (f32 accumulation); rows past ``sum(sizes)``
    are 0.
    """
    from pallas_kernels.arena_matmul import check_args

    m = x_rows.shape[0] if x_rows is not None else x.shape[0]
    check_args(x, arena_rows, offsets, sizes, n)
    if backend not in ("gpu", "interpret"):
        raise ValueError(f"backend {backend!r}: expected 'gpu' or 'interpret'")
    k = x.shape[1]
    num_rows, r = arena_rows.shape
    g = offsets.shape[0]
    fusion = Fusion(x_rows is not None, swiglu, row_scale is not None, out_rows is not None)
    _check_fusion(fusion, m, n, r, x_rows, row_scale, out_rows)
    n_out = swiglu or n
    if m == 0 or g == 0:
        return jnp.zeros((m, n_out), out_dtype)
    cfg = _call_config(m, k, n_out, g, r, jnp.dtype(arena_rows.dtype).itemsize, fusion,
                       group_rows=group_rows, bm=bm, bn=bn, bk=bk, split_k=split_k,
                       num_warps=num_warps, num_stages=num_stages, programs=programs)
    nk = -(-k // cfg.bk)
    split = max(1, min(cfg.split_k, nk))
    nks = -(-nk // split)
    split = -(-nk // nks)  # no split without a k-block
    gp = max(8, next_pow2(g))
    # More than the item bound would find no item; the grid's third axis holds at most 65535.
    n_prog = max(1, min(cfg.programs, -(-m // cfg.bm) + g, 65535))
    kernel = functools.partial(_kernel, g=g, gp=gp, m=m, k=k, n=n, cfg=cfg, nks=nks,
                               num_rows=num_rows, fusion=fusion)
    aux = [a for a in (x_rows, row_scale, out_rows) if a is not None]
    aux = [a.astype(jnp.float32 if a is row_scale else jnp.int32) for a in aux]
    shape = (m, n_out) if fusion.any else (split, m, n_out)
    # K-split partials are summed in f32 afterwards; otherwise the kernel rounds to out_dtype
    direct = fusion.any or split == 1
    out = pl.pallas_call(
        kernel,
        grid=(n_out // cfg.bn, split, n_prog),
        out_shape=jax.ShapeDtypeStruct(shape, jnp.dtype(out_dtype) if direct else jnp.float32),
        interpret=interpret_flag(backend),
        compiler_params=(gpu_compiler_params(cfg.num_warps, cfg.num_stages)
                         if backend == "gpu" else None),
        name="arena_grouped_matmul",
    )(sizes.astype(jnp.int32), offsets.astype(jnp.int32), x, arena_rows, *aux)
    if fusion.any:
        return out
    out = out.reshape(m, n) if split == 1 else jnp.sum(out, axis=0)
    return out.astype(out_dtype)


__all__ = ["Config", "Fusion", "arena_grouped_matmul_gpu", "default_config"]
