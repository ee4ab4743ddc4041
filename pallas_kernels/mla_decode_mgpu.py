"""Hopper (Mosaic GPU: wgmma + TMA) MLA decode attention in absorbed form over the paged arena.

What it computes: `pallas_kernels.decode.paged_mla_decode_attention` (same arguments, same
result): for each sequence b and query head h, ``softmax(scale * [q_latent | q_rope] @
[latent | rope]^T) @ latent`` over the sequence's first ``lengths[b]`` tokens (the last
``window`` of them with a window; logits soft-capped with ``soft_cap``), as [B, H,
kv_lora_rank] in q_latent's dtype, and with ``return_lse`` the log-sum-exp [B, H] f32 of the
scaled (capped) logits (-inf for an empty sequence).

Layout read. The arena is ``[num_pages, rows_per_page, R]``; an MLA page holds T tokens as
``[latent_chunks + rope_chunks, T, R]`` (`pallas_kernels.page_layout`), so the ``block_t`` tokens
of one block (``block_t`` divides T, so a block never straddles pages) are, per chunk, one
contiguous ``[block_t, R]`` run of rows: one TMA box. A rope key narrower than a row (DeepSeek's
64 in the engine's 128-element rows) is loaded, for Q and every block, only `rope_cols` wide
(the box's first columns; the rest of the row is zero padding, which adds nothing to a score).

Design. One CTA per (head block of 64 query heads, KV split, sequence), head blocks fastest in
the grid, so the CTAs that read the same latents run side by side (L2). The query heads are the
M = 64 rows of every wgmma (Triton's MLA kernel runs M = 16 mma). A CTA runs three warpgroups:

* memory warpgroup (40 registers): loads the head block's query, ``[chunks, 64, R]``, into
  shared memory once, then streams the split's KV blocks, all chunks of a block into one
  pipeline stage ``[chunks, block_t, R]`` (TMA; up to ``stages`` blocks resident), waiting for
  both compute warpgroups to release a stage before refilling it. A block's page id is read
  from the page table one block ahead, so that scalar load's latency hides behind the previous
  block's wait and copies.
* warpgroup 0, scores (232 registers): for block i, ``S = sum_c Q_c @ K_c^T`` over every score
  chunk (latent and rope) into one f32 ``[64, block_t]`` accumulator -- with the lookahead
  (Schedule, below) issued during block i-1, so block i's score wgmmas run while block i-1's
  softmax does; then the online softmax of
  block i in f32 (base-2 exponentials; scale, soft cap, mask of tokens ``>= length`` and, with a
  window, ``< length - window``); it publishes P (``[64, block_t]`` in the KV dtype) and the
  rescale factor ``alpha`` ([64] f32) in shared memory for warpgroup 1 and computes
  ``O_0 = alpha * O_0 + P @ V_c`` over the first ``wg0_chunks`` latent chunks (`Config`; by
  default 3 of 8, `default_wg0_chunks`).
* warpgroup 1, values (232 registers): ``O_1 = alpha * O_1 + P @ V_c`` over the others.

So S is computed once per block and the f32 output [64, kv_lora_rank] is split over two
warpgroups (by default 96 and 160 registers of a thread at 512 columns). Each compute
warpgroup releases a stage after its last wgmma on it (and warpgroup 1 releases P for the next
block).

Schedule (`Config.lookahead`). With the lookahead, the tensor cores see, per block, the score
wgmmas of the next block during the softmax, then both P @ V parts; but block i+1 must have
landed before block i's softmax, so it holds a second stage. Without it, warpgroup 0 runs block
i's scores, softmax and P @ V in that order (FlashMLA's order): only the block in use holds a
stage, and the others load ahead. The default (`default_config`) takes the largest block_t
that fits 2 stages and the lookahead only with 3 stages or more: DeepSeek runs 64-token blocks
in 2 stages in order, so each score wgmma is N = 64 tokens wide and Q (its A operand, from
shared memory) is read half as often per token as at 32. That holds at R = 64 and, since the
rope chunk is loaded 64 columns wide (2026-12-08), at the engine's R = 128 rows too (before, a
128-wide rope chunk left room for 32-token blocks only, in 3 stages with the lookahead; the
R = 128 form of the new default is not yet timed). On one H100 (docs/benchmarks.md "One
H100, 2026-12-08 (night)"), DeepSeek-V3 at R = 64, 32 x 8K: 173.1 us in order at 64 tokens
against 223.6 us with the lookahead at 32 tokens and 4 stages (the default before; 1.29x),
293.9 against 388.1 us on a ragged batch (1.32x); in order at 32 tokens and 4 stages ran 0.92x
the lookahead there, and the lookahead at 64 tokens in 2 stages 281.8 us (2026-12-06).

Where the time goes with the lookahead at 32-token blocks (the default before 2026-12-08; one
H100, 2026-12-06 late, `benchmarks/mla_decode_probe.py --profile`, the
named ranges below): a 32-token block takes ~3,100 cycles, mostly warpgroup 0 in series: issuing
the 36 score wgmmas ~900 cycles (the issue stalls until most of them have run, so they barely
overlap the softmax), the softmax ~500, publishing P ~230, its P @ V with the wait ~730;
warpgroup 1 waits ~2,350 of its ~3,100. All KV reads hitting L2 makes it only 1.08x faster: the
loop, not HBM, is the bound. A "seesaw" schedule (each compute warpgroup owning every other
block's scores and softmax and half the output; ad45e85, tested in the interpreter) ran 0.79x
this one on the same H100: a pair of blocks holds two stages until both warpgroups are done
with it, so with 4 stages the next pair's loads start too late (its memory warpgroup waited
~3,600 cycles a block for a free stage); it was removed.

A "handoff" schedule (warpgroup 1 issuing block i + 1's score wgmmas and handing S to
warpgroup 0 through two f32 shared-memory slots while warpgroup 0 ran block i's softmax; 3
stages at R = 64; 3aa5171, tested in the interpreter) ran 0.90x this one on one H100
(2026-12-07, `benchmarks/mla_decode_probe.py`, DeepSeek-V3 32 x 8K: 239.5 us against 216.7;
with ``wg0_chunks`` 4 231.5, 5 215.0 (1.01x, within noise); at R = 128 473.5 us). Its profile
(the 2K-token case) showed warpgroup 1's score range at ~2,260 cycles a block, warpgroup 0
waiting ~1,200 a block for S and a block period of ~3,650 cycles against ~3,100 here: moving
the score wgmmas to the other warpgroup does not shorten a block, since they themselves take
most of it. It was removed.

Two value warpgroups (c29ec12: four warpgroups a CTA, warpgroup 0 keeping N of the 8 value
chunks and the other two splitting the rest, each given the registers its output needs; tested
in the interpreter with the race detector) ran on one H100 (2026-12-07 night,
`benchmarks/mla_decode_probe.py`, DeepSeek-V3 32 x 8K, us): this kernel 235.4; N = 2 226.1
(1.04x), N = 1 229.9 (1.02x), N = 0 600.6 (not understood; not profiled); at R = 128 256.8
against 255.4. Warpgroup 0's own P @ V is not what bounds a block, so it was reverted.

Tokens past the length in a partial last block: their rows may hold anything, NaN included.
They are masked to -inf in S (P = 0), and since NaN * 0 = NaN, each compute warpgroup also
zeroes those rows of its own value chunks in shared memory before its P @ V (through the
transposed [R, block_t] view, which fits the WGMMA register layout); warpgroup 1 does so only
after P is published, when warpgroup 0's score wgmma on those rows has completed.

Each CTA writes its unnormalised O [64, kv_lora_rank], running max m and sum l (f32,
natural-log units) straight from registers to global memory; `split_softmax_combine` merges the
splits in jnp. Default splits: about one wave of CTAs (`default_num_splits`).

Swizzle. A wgmma takes one swizzle for both operands and its contraction must be a whole number
of swizzle widths; P @ V contracts over ``block_t`` tokens, so every operand (Q, K/V chunks, P)
is swizzled ``block_t`` elements wide: 64 B at block_t = 32 (128 B only at block_t = 64).

Shared memory (bf16, DeepSeek: 576 elements a token at R = 64, and at R = 128 with the rope
chunk 64 wide): Q 72 KiB + ``stages x block_t x 1,152`` B of pipeline + P + alpha + barriers
(`smem_plan`, equal to what Mosaic GPU allocates): block_t = 64 with 2 stages is 225 KiB of the
227 KiB, block_t = 32 with 4 stages 221 KiB. One CTA per SM.

Wide values (`Config.wide_values`, off by default: not yet timed). By default a stage holds each
latent chunk as its own [block_t, R] buffer, so a compute warpgroup's P @ V is one wgmma per
chunk, N = R = 64 columns at DeepSeek's R = 64 (8 per block between the two warpgroups), each
reading its shared-memory operands for a narrow output. With wide values a stage holds the
block's latent as one [block_t, latent_chunks x R] buffer (tiled 8 x swizzle), so a warpgroup's
P @ V is one wgmma per 256 output columns (`_value_pieces`; FlashMLA runs N = 256), and a score
chunk is a column slice of it. TMA writes only contiguous shared memory, and in that buffer a
chunk's 8-token tile rows are not adjacent, so the memory warpgroup loads each chunk 8 tokens a
box (`_Smem.load_boxes`: 64 boxes of 1 KiB a 64-token block at R = 64, 32 of 2 KiB at R = 128,
against 9 or 5). The bytes in shared memory are the same.

Differences between the backends. Mosaic GPU's interpreter cannot run a wgmma whose left
operand is in registers, nor one into an accumulator set from registers, so under
``backend="interpret"`` warpgroup 0 reads P from shared memory like warpgroup 1 and each
P @ V goes into a fresh accumulator added in registers afterwards; on the GPU warpgroup 0 takes
P from registers and both accumulate in place (`_pv_accumulate`). Everything else (barriers,
TMA indexing, the masks, the softmax, the zeroing) is the same code.

Requirements (ValueError otherwise, so that a caller can fall back to the Triton kernel): an MLA
geometry, a bf16 or f16 arena, R in (64, 128), T a multiple of 16, at least one latent chunk
for each compute warpgroup, rows_per_page a multiple of 8, block_t in (16, 32, 64) dividing T,
at least 2 stages and the shared-memory plan within 227 KiB. Queries are cast to the arena's
dtype; H is padded to a multiple of 64 heads.

Status: tested in Mosaic GPU's interpreter and cross-lowered on CPU
(tests/kernels/test_mla_decode_mgpu.py); on one H100 (2026-12-05, ``benchmarks/kernels.py
--with-mgpu``, docs/benchmarks.md) correct and 1.81x the Triton kernel on DeepSeek-V3's 32 x 8K
ragged batch, 33% of its tensor-core floor; with ``wg0_chunks`` 3 of 8, 215.8-228.5 us, 37-39%
(two H100s, 2026-12-06), 219.2 us on a third, 217.8 us on a fourth; on one H200 (2026-12-06
late, `benchmarks/mla_decode_probe.py`) 226.7 us, 38.2% of that card's floor. The engine's GPU
page layout (256-KiB pages of
128-element rows) holds 192 MLA tokens a page since 2026-12-06 (night) (200 before, which this
kernel refused, so `pallas_kernels.dispatch` ran the Triton one); cross-lowered at that layout on
CPU. Inside the engine on one H100 (2026-12-06 night, DeepSeek-V2-Lite: 16 heads, padded to 64)
it took 3,061 us a decode call of 8 x 4K against Triton's 2,635 (0.86x), so `dispatch`'s "auto"
runs it only for 64 heads or more (`MLA_AUTO_MIN_HEADS`). In order at 64-token blocks (the
default since 2026-12-08): 173.1 us on one H100 at R = 64, 49.6% of the floor (60%: not met),
timed at a5e7ebe, before the rope chunk got shared-memory buffers of its own (not re-timed since);
at the engine's R = 128 rows (the rope chunk 64 wide) not yet timed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import attention_core
from pallas_kernels._common import split_softmax_combine
from pallas_kernels.page_layout import KVKind, PageGeometry

HEADS_PER_CTA = 64  # wgmma M: the query heads of one CTA (a head block)
WGMMA_MAX_N = 256  # widest wgmma (output columns of one P @ V with wide values)
SMEM_BYTES = 227 * 1024  # an H100/H200 CTA's dynamic shared memory
SMEM_ALIGN = 1024  # Mosaic GPU aligns each shared-memory buffer to this many bytes
BARRIER_BYTES = 8  # one mbarrier
SCORE_REGISTERS = 232  # per thread of each compute warpgroup (setmaxnreg)
MEMORY_REGISTERS = 40  # per thread of the memory warpgroup
MIN_SPLIT_TOKENS = 512  # a split shorter than this would spend more on loading Q than on KV
PROFILE_RANGES = 256  # most named ranges a warpgroup records when profiling (`profile_ranges`)
PROFILE_RANGE_BYTES = 3 * 16  # shared memory per range the profiler keeps (3 warpgroups x 16 B)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static tiling of one launch.

    block_t: tokens per KV block (a divisor of T in 16/32/64; wgmma N of the scores, K of P @ V).
    stages: KV blocks in shared memory at once (the memory warpgroup runs ``stages - 1`` ahead).
    num_splits: KV splits per sequence (CTAs per (sequence, head block)).
    wg0_chunks: value (latent) chunks of the output that warpgroup 0 accumulates beside the
      scores (warpgroup 1 takes the rest); 0: `default_wg0_chunks`.
    lookahead: warpgroup 0 issues block i+1's score wgmmas before block i's softmax (True), so
      they overlap it but hold a second stage; False: block i's scores, then its softmax, so
      only the block in use holds a stage and the other stages load ahead (FlashMLA's order).
    wide_values: a stage keeps a block's latent chunks side by side, one [block_t, latent]
      buffer loaded 8 tokens a TMA box, so each compute warpgroup's P @ V is one wgmma per 256
      output columns (FlashMLA's N = 256) instead of one per R-wide chunk (module doc, "Wide
      values"); False: a [block_t, R] buffer per chunk, one TMA box each.
    """

    block_t: int
    stages: int
    num_splits: int
    wg0_chunks: int = 0
    lookahead: bool = True
    wide_values: bool = False


def rope_cols(geom: PageGeometry, block_t: int) -> int:
    """Columns of each rope chunk that the kernel loads (of Q and of every KV block) and
    contracts: R, or, where the rope key is narrower than one row (DeepSeek's 64 in the engine's
    128-element rows), its width rounded up to a swizzle (``block_t`` elements of a 16-bit
    dtype), since the rest of the row is zero padding that adds nothing to a score."""
    r, rope = geom.row_elems, geom.spec.rope_dim
    return r if rope >= r else min(r, -(-rope // block_t) * block_t)


def smem_plan(geom: PageGeometry, block_t: int, stages: int, itemsize: int = 2) -> int:
    """Bytes of shared memory a CTA allocates: Q (latent, then rope chunks), the KV stages
    (latent, then rope chunks; rope chunks `rope_cols` wide), P and alpha (each buffer aligned
    to `SMEM_ALIGN`) and the barriers (1 for Q, 2 per stage, 2 for P)."""
    lat, rope = geom.head_chunks * geom.row_elems, geom.rope_chunks * rope_cols(geom, block_t)
    buffers = (lat * HEADS_PER_CTA * itemsize, rope * HEADS_PER_CTA * itemsize,  # Q
               stages * lat * block_t * itemsize, stages * rope * block_t * itemsize,  # KV
               HEADS_PER_CTA * block_t * itemsize,  # P
               HEADS_PER_CTA * 4)  # alpha
    aligned = sum(-(-x // SMEM_ALIGN) * SMEM_ALIGN for x in buffers)
    return aligned + BARRIER_BYTES * (3 + 2 * stages)


def max_stages(geom: PageGeometry, block_t: int, itemsize: int = 2) -> int:
    """The most pipeline stages (2 to 4) whose shared memory fits; 0 if not even 2 do."""
    for stages in (4, 3, 2):
        if smem_plan(geom, block_t, stages, itemsize) <= SMEM_BYTES:
            return stages
    return 0


def default_num_splits(batch: int, head_blocks: int, max_tokens: int, block_t: int) -> int:
    """KV splits per sequence from static shapes: about one wave of CTAs (one CTA per SM: the
    shared memory allows no more), at least one split per `attention_core.TOKENS_PER_SPLIT`
    tokens the page table can hold, at most one per `MIN_SPLIT_TOKENS` (and per block)."""
    want = max(1, attention_core.num_sms() // max(1, batch * head_blocks))
    want = max(want, -(-max_tokens // attention_core.TOKENS_PER_SPLIT))
    cap = max(1, max_tokens // MIN_SPLIT_TOKENS)
    return int(max(1, min(want, cap, -(-max_tokens // block_t))))


def default_wg0_chunks(latent_chunks: int) -> int:
    """Warpgroup 0's share of the value chunks: 3 of 8 (at least 1), since it also computes every
    score wgmma and the softmax. DeepSeek-V3 (8 latent chunks of 64), 32 x 8K ragged, on two
    H100s (2026-12-06, `benchmarks/kernels.py --with-mgpu`, docs/benchmarks.md), us: 3 of 8 ran
    215.8 / 228.5, 2: 211.9 / 242.6, 4 (half, the default before): 228.9 / 244.2, 5: 269.7 / -,
    1: - / 483.4 (32-token blocks with the lookahead). In order at 64-token blocks (one H100,
    2026-12-08, docs/benchmarks.md): 2 of 8 ran 0.90x and 4 of 8 0.97x the 3."""
    return max(1, latent_chunks * 3 // 8)


def default_config(geom: PageGeometry, batch: int, num_heads: int, max_tokens: int,
                   itemsize: int = 2, block_t: int | None = None, stages: int | None = None,
                   num_splits: int | None = None, wg0_chunks: int | None = None,
                   lookahead: bool | None = None, wide_values: bool = False) -> Config:
    """The launch's `Config` for ``batch`` sequences of ``num_heads`` query heads and at most
    ``max_tokens`` attended tokens each; the arguments given override the defaults.

    block_t: the first of 64, 32, 16 that divides T and leaves room for 2 stages (DeepSeek:
    64, at R = 64 and at R = 128, whose rope chunk is loaded 64 columns wide, `rope_cols`).
    stages: as many as fit, at most 4.
    lookahead: only with 3 stages or more (it holds a second stage, so with 2 nothing would
    load ahead; module doc, "Schedule"). num_splits: `default_num_splits`. wg0_chunks:
    `default_wg0_chunks`. wide_values: off (not yet timed).
    """
    t = geom.tokens_per_page
    if block_t is None:
        fits = [bt for bt in (64, 32, 16) if t % bt == 0 and max_stages(geom, bt, itemsize) >= 2]
        block_t = fits[0] if fits else 16
    if stages is None:  # 2 when nothing fits: `check_supported` then reports the bytes
        stages = max(2, max_stages(geom, block_t, itemsize))
    head_blocks = -(-num_heads // HEADS_PER_CTA)
    if num_splits is None:
        num_splits = default_num_splits(batch, head_blocks, max_tokens, block_t)
    return Config(block_t=block_t, stages=stages, num_splits=num_splits,
                  wg0_chunks=wg0_chunks or default_wg0_chunks(geom.head_chunks),
                  lookahead=stages >= 3 if lookahead is None else lookahead,
                  wide_values=wide_values)


def profile_ranges(geom: PageGeometry, cfg: Config, itemsize: int = 2) -> int:
    """Named ranges each warpgroup can record when profiling (`profile_dir`): the profiler's
    buffer takes `PROFILE_RANGE_BYTES` of shared memory a range, so as many as the launch's
    `smem_plan` leaves room for, at most `PROFILE_RANGES` (DeepSeek's default, 64-token blocks
    in 2 stages: 41, enough for the first 5 blocks of warpgroup 0's 7 ranges a block)."""
    left = SMEM_BYTES - smem_plan(geom, cfg.block_t, cfg.stages, itemsize)
    return max(0, min(PROFILE_RANGES, left // PROFILE_RANGE_BYTES))


def check_supported(geom: PageGeometry, arena: jax.Array, cfg: Config) -> None:
    """Raises ValueError for what this kernel does not support (the caller falls back)."""
    if geom.spec.kind != KVKind.MLA:
        raise ValueError("paged_mla_decode_attention_mgpu needs an MLA geometry")
    dt = jnp.dtype(arena.dtype)
    if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"wgmma needs a bf16/f16 arena, got {dt}")
    r, t = geom.row_elems, geom.tokens_per_page
    if r not in (64, 128):
        raise ValueError(f"arena row width R={r}: expected 64 or 128")
    if t % 16:
        raise ValueError(f"tokens per page T={t} must be a multiple of 16")
    wg0 = cfg.wg0_chunks or default_wg0_chunks(geom.head_chunks)
    if not 1 <= wg0 < geom.head_chunks:
        raise ValueError(f"wg0_chunks={wg0}: each compute warpgroup needs at least one of the "
                         f"{geom.head_chunks} latent chunks")
    if geom.rows_per_page % 8:
        raise ValueError(f"rows_per_page={geom.rows_per_page} must be a multiple of 8")
    if cfg.block_t not in (16, 32, 64) or t % cfg.block_t:
        raise ValueError(f"block_t={cfg.block_t} must be 16, 32 or 64 and divide T={t}")
    if cfg.stages < 2 or cfg.num_splits < 1:
        # One stage would deadlock with the lookahead: the scores warpgroup waits for block
        # i+1 before it releases block i.
        raise ValueError(f"stages={cfg.stages} must be >= 2 and num_splits={cfg.num_splits} "
                         ">= 1")
    need = smem_plan(geom, cfg.block_t, cfg.stages, dt.itemsize)
    if need > SMEM_BYTES:
        raise ValueError(f"block_t={cfg.block_t} with {cfg.stages} stages needs {need} bytes of "
                         f"shared memory; a CTA has {SMEM_BYTES}")


def _swizzled(block_t: int, dtype) -> tuple:
    """Tiling + swizzle transforms of every shared-memory operand (Q, K/V chunks, P).

    A wgmma takes one swizzle for both operands, and its contraction must be a whole number of
    swizzle widths; the P @ V contraction is ``block_t`` long, so the swizzle is ``block_t``
    elements wide (bytes: 128 at block_t 64, 64 at 32, 32 at 16), and Q / K (contraction R, a
    multiple of it) use the same."""
    swizzle = plgpu.find_swizzle(block_t * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _pv_accumulate(o: tuple, p_regs: jax.Array | None, p_smem, v_refs: list,
                   interpret: bool) -> tuple:
    """``o[c] + P @ v_refs[c]`` for each value chunk c; returns once every wgmma issued by this
    warpgroup is done (the P @ V ones and any score wgmma still in flight).

    o: [64, R] f32 (WGMMA layout); P: [64, block_t] in registers (``p_regs``, GPU only; None:
    use ``p_smem``) or the shared-memory ref ``p_smem``; v_refs: [block_t, R] shared refs.
    GPU: accumulators set to ``o``, the wgmmas accumulate in place; interpret: each into a fresh
    zero accumulator, added in registers (module doc, "Differences between the backends").
    """
    if interpret:
        out = []
        for oc, v in zip(o, v_refs, strict=True):
            def one(acc_ref, v=v):
                plgpu.wgmma(acc_ref, p_smem, v)
                return acc_ref[...]

            out.append(oc + pl.run_scoped(one, plgpu.ACC(oc.shape, jnp.float32)))
        return tuple(out)
    a = p_smem if p_regs is None else p_regs

    def run(*acc_refs):
        for acc_ref, oc in zip(acc_refs, o, strict=True):
            acc_ref[...] = oc
        for acc_ref, v in zip(acc_refs, v_refs, strict=True):
            plgpu.wgmma(acc_ref, a, v)
        return tuple(acc_ref[...] for acc_ref in acc_refs)

    return pl.run_scoped(run, *(plgpu.ACC(oc.shape, jnp.float32) for oc in o))


def _zero_tail_rows(v_refs: list, n_valid: jax.Array, block_t: int) -> None:
    """Zeroes rows ``>= n_valid`` of each [block_t, R] shared ref when the block is partial
    (``n_valid < block_t``), through the transposed view: [R, block_t] has a multiple of 64 rows,
    the WGMMA register layout's unit, which [block_t, R] (block_t < 64) has not."""

    @pl.when(n_valid < block_t)
    def _():
        for v in v_refs:
            vt = v.T  # [R, block_t]: R (a multiple of 64) rows, the WGMMA layout fits
            x = plgpu.load(vt, layout=plgpu.Layout.WGMMA)
            tok = plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=plgpu.Layout.WGMMA)
            vt[...] = jnp.where(tok < n_valid, x, jnp.zeros_like(x))
        plgpu.commit_smem()  # the generic-proxy stores before the wgmma (async proxy) reads


_ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)  # [64]: one value per row of a WGMMA tile (m, l, alpha)


@dataclasses.dataclass(frozen=True)
class _Cta:
    """What the warpgroups of one CTA share; built once by `_kernel` (module doc for the roles).

    Static: block_t, stages (`Config`); row_elems (R), tokens_per_page (T), rows_per_page;
    score_chunks: Q / K chunks per token (latent, then rope); latent_chunks: value chunks (the
    output's); rope_cols: the columns of a rope chunk loaded (`rope_cols`); wg0_chunks: value
    chunks [0, wg0_chunks) of warpgroup 0 (`Config`; warpgroup 1 has the rest); lookahead,
    wide_values (`Config`); max_pages: page-table width; num_pages: arena pages; dtype: the arena's (Q,
    K/V and P); scale, soft_cap, window, interpret: `_kernel`'s.
    Traced int32 scalars: b (sequence), hb (head block), item (row of o_ref / m_ref / l_ref);
    lo_all: the sequence's first attended token (0, or length - window); lo / hi: the split's
    tokens [lo, hi), lo block-aligned; n_blocks: KV blocks of block_t tokens from lo to hi.
    Global refs (`_kernel`'s arguments): table_ref, q_ref, kv_ref, read by the memory warpgroup;
    o_ref, m_ref, l_ref, written by the epilogues (`_write_partial`, `_write_empty_partial`).
    """

    # static
    block_t: int
    stages: int
    row_elems: int
    tokens_per_page: int
    rows_per_page: int
    score_chunks: int
    latent_chunks: int
    rope_cols: int
    wg0_chunks: int
    lookahead: bool
    wide_values: bool
    max_pages: int
    num_pages: int
    dtype: jnp.dtype
    scale: float
    soft_cap: float | None
    window: int | None
    interpret: bool
    # traced int32 scalars
    b: jax.Array
    hb: jax.Array
    item: jax.Array
    lo_all: jax.Array
    lo: jax.Array
    hi: jax.Array
    n_blocks: jax.Array
    # global refs
    table_ref: object
    q_ref: object
    kv_ref: object
    o_ref: object
    m_ref: object
    l_ref: object


@dataclasses.dataclass(frozen=True)
class _Smem:
    """The CTA's shared-memory buffers and barriers, in `_kernel`'s allocation order.

    q: [latent_chunks, 64, R] and q_rope: [rope_chunks, 64, rope_cols] (None without a rope
    key) the head block's query; kv: [stages, latent_chunks, block_t, R] (wide values:
    [stages, block_t, latent_chunks * R]) and kv_rope: [stages, rope_chunks, block_t,
    rope_cols] (or None) the pipeline, one KV block per stage; p: [64,
    block_t] P in the KV dtype; alpha: [64] f32 the rescale factor of the block in P.
    q_bar: Q landed (one arrival per chunk copy); kv_full[stages]: a stage's block landed (one
    arrival per copy, `_copies_per_block`); kv_consumed[stages]: a stage released by both compute warpgroups
    (2 arrivals); p_full: P and alpha published by warpgroup 0; p_free: P and alpha released
    by warpgroup 1.
    """

    q: object
    q_rope: object
    kv: object
    kv_rope: object
    p: object
    alpha: object
    q_bar: object
    kv_full: object
    kv_consumed: object
    p_full: object
    p_free: object

    wide: bool = False  # `Config.wide_values`: kv is [stages, block_t, latent_chunks * R]

    def latent_chunk(self, slot, c: int):
        """The [block_t, R] ref of latent chunk c of the block in stage ``slot`` (with wide
        values a column slice of the stage's one buffer)."""
        r = self.q.shape[-1]
        return self.kv.at[slot, :, pl.ds(c * r, r)] if self.wide else self.kv.at[slot, c]

    def value_refs(self, slot, first: int, count: int) -> list:
        """The [block_t, w] refs that P @ V reads for latent chunks [first, first + count) of
        the block in stage ``slot``, one per `_value_pieces` piece."""
        if not self.wide:
            return [self.kv.at[slot, c] for c in range(first, first + count)]
        return [self.kv.at[slot, :, pl.ds(c0, w)]
                for c0, w in _value_pieces(first, count, self.q.shape[-1], True)]

    def q_chunks(self) -> list:
        """Q's score chunks in order: [64, R] refs of the latent, then [64, rope_cols] of the
        rope key."""
        rope = [] if self.q_rope is None else [self.q_rope.at[c] for c in range(self.q_rope.shape[0])]
        return [self.q.at[c] for c in range(self.q.shape[0])] + rope

    def k_chunks(self, slot) -> list:
        """The score chunks of the block in stage ``slot``, in Q's order: [block_t, R] refs,
        then [block_t, rope_cols]."""
        rope = ([] if self.kv_rope is None
                else [self.kv_rope.at[slot, c] for c in range(self.kv_rope.shape[1])])
        return [self.latent_chunk(slot, c) for c in range(self.q.shape[0])] + rope

    def load_boxes(self, slot, block_t: int) -> list[tuple[int, int, Any]]:
        """The TMA copies that fill stage ``slot``: (score chunk c, first token in the block,
        destination ref), each of ``dst.shape[0]`` tokens of chunk c (its first
        ``dst.shape[1]`` columns); with wide values 8 tokens a latent box (one contiguous tile
        row of the buffer)."""
        boxes = []
        r = self.q.shape[-1]
        for c in range(self.q.shape[0]):
            for t, n in _latent_boxes(block_t, self.wide):
                dst = (self.kv.at[slot, pl.ds(t, n), pl.ds(c * r, r)] if self.wide
                       else self.kv.at[slot, c])
                boxes.append((c, t, dst))
        if self.kv_rope is not None:
            boxes += [(self.q.shape[0] + c, 0, self.kv_rope.at[slot, c])
                      for c in range(self.kv_rope.shape[1])]
        return boxes


def _value_pieces(first: int, count: int, r: int, wide: bool) -> list[tuple[int, int]]:
    """(first column, width) of the P @ V operands (and output accumulators) of latent chunks
    [first, first + count): each R-wide chunk, or with wide values runs of at most
    `WGMMA_MAX_N` columns."""
    if not wide:
        return [(c * r, r) for c in range(first, first + count)]
    lo, hi = first * r, (first + count) * r
    return [(c0, min(WGMMA_MAX_N, hi - c0)) for c0 in range(lo, hi, WGMMA_MAX_N)]


def _latent_boxes(block_t: int, wide: bool) -> list[tuple[int, int]]:
    """(first token, tokens) of each TMA box that loads one latent chunk of a block: the whole
    block, or with wide values 8 tokens a box (one contiguous tile row of the wide buffer)."""
    return [(t, 8) for t in range(0, block_t, 8)] if wide else [(0, block_t)]


def _copies_per_block(cta: _Cta) -> int:
    """TMA copies (kv_full arrivals) that fill one stage, as `_Smem.load_boxes` issues them:
    `_latent_boxes` per latent chunk, one per rope chunk."""
    rope = cta.score_chunks - cta.latent_chunks
    return cta.latent_chunks * len(_latent_boxes(cta.block_t, cta.wide_values)) + rope


def _zero_outputs(cta: _Cta, first: int, count: int) -> tuple:
    """A compute warpgroup's empty O for latent chunks [first, first + count): f32 zeros
    [64, w] in the WGMMA layout, one per `_value_pieces` piece."""
    return tuple(_zeros_wgmma((HEADS_PER_CTA, w)) for _, w in
                 _value_pieces(first, count, cta.row_elems, cta.wide_values))


def _zeros_wgmma(shape) -> jax.Array:
    """f32 zeros of ``shape`` in the WGMMA register layout (an empty accumulator)."""
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _issue_scores(cta: _Cta, smem: _Smem, slot, acc_ref) -> None:
    """Issues S += Q_c @ K_c^T over every score chunk of the block in ``slot`` (asynchronous
    wgmmas into ``acc_ref``, [64, block_t] f32)."""
    for q, k in zip(smem.q_chunks(), smem.k_chunks(slot), strict=True):
        plgpu.wgmma(acc_ref, q, k.T)


def _scores_now(cta: _Cta, smem: _Smem, slot) -> jax.Array:
    """S [64, block_t] f32 of the block in ``slot``: its score wgmmas issued and waited for."""

    def run(acc_ref):
        with jax.named_scope("wg0_issue_s"):
            _issue_scores(cta, smem, slot, acc_ref)
        with jax.named_scope("wg0_read_s"):
            return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC((HEADS_PER_CTA, cta.block_t), jnp.float32))


def _kernel(len_ref, split_ref, table_ref, q_ref, kv_ref, o_ref, m_ref, l_ref, *,
            geom: PageGeometry, cfg: Config, scale: float, soft_cap: float | None,
            window: int | None, num_pages: int, head_blocks: int, interpret: bool) -> None:
    """One CTA: (head block, split, sequence) from the grid; module doc for the roles.

    len_ref: [B] int32; split_ref: [1] int32 tokens per split (a multiple of block_t);
    table_ref: [B, max_pages] int32; q_ref: [B, HB, chunks, 64, R] (a rope chunk's first
    `rope_cols` columns are read); kv_ref: flat arena rows
    [num_pages * rows_per_page, R]. o_ref: [items, latent_chunks, 64, R] f32; m_ref / l_ref:
    [items, 64] f32, item = (b * num_splits + split) * HB + head block.
    Computes the split's token range into a `_Cta`, allocates the `_Smem` and runs, per
    warpgroup, `_memory_warpgroup`, `_scores_warpgroup` or `_values_warpgroup`.
    """
    bt = cfg.block_t
    hb = lax.axis_index("hb")
    s = lax.axis_index("split")
    b = lax.axis_index("b")
    item = (b * cfg.num_splits + s) * head_blocks + hb
    length = len_ref[b]
    lo_all = jnp.maximum(length - window, 0) if window is not None else jnp.int32(0)
    lo = jnp.minimum(lo_all // bt * bt + s * split_ref[0], length)  # block-aligned
    hi = jnp.minimum(lo + split_ref[0], length)
    n_blocks = (hi - lo + bt - 1) // bt
    cta = _Cta(block_t=bt, stages=cfg.stages, row_elems=geom.row_elems,
               tokens_per_page=geom.tokens_per_page, rows_per_page=geom.rows_per_page,
               score_chunks=len(geom.score_chunk_rows), latent_chunks=geom.head_chunks,
               rope_cols=rope_cols(geom, bt), wide_values=cfg.wide_values,
               wg0_chunks=cfg.wg0_chunks or default_wg0_chunks(geom.head_chunks),
               lookahead=cfg.lookahead, max_pages=table_ref.shape[1],
               num_pages=num_pages, dtype=kv_ref.dtype, scale=scale, soft_cap=soft_cap,
               window=window, interpret=interpret, b=b, hb=hb, item=item, lo_all=lo_all, lo=lo,
               hi=hi, n_blocks=n_blocks, table_ref=table_ref, q_ref=q_ref, kv_ref=kv_ref,
               o_ref=o_ref, m_ref=m_ref, l_ref=l_ref)

    n_chunks, m_rows, r, dt = cta.score_chunks, HEADS_PER_CTA, cta.row_elems, cta.dtype
    n_lat, n_rope, w_rope = cta.latent_chunks, n_chunks - cta.latent_chunks, cta.rope_cols

    def warpgroups(*refs):  # run by each of the 3 warpgroups (collective over "wg")
        it = iter(refs)  # the buffers below, in order; the rope ones only with a rope key
        q, q_rope = next(it), next(it) if n_rope else None
        kv, kv_rope = next(it), next(it) if n_rope else None
        smem = _Smem(q, q_rope, kv, kv_rope, *it, wide=cta.wide_values)
        wg = lax.axis_index("wg")
        pl.when(wg == 2)(functools.partial(_memory_warpgroup, cta, smem))
        pl.when(wg == 0)(functools.partial(_scores_warpgroup, cta, smem))
        pl.when(wg == 1)(functools.partial(_values_warpgroup, cta, smem))

    tf = _swizzled(bt, dt)  # one swizzle for both operands of every wgmma (module doc)
    q_bufs = [plgpu.SMEM((n_lat, m_rows, r), dt, transforms=tf)]  # q
    kv_shape = (cfg.stages, bt, n_lat * r) if cfg.wide_values else (cfg.stages, n_lat, bt, r)
    kv_bufs = [plgpu.SMEM(kv_shape, dt, transforms=tf)]  # kv
    if n_rope:
        q_bufs.append(plgpu.SMEM((n_rope, m_rows, w_rope), dt, transforms=tf))  # q_rope
        kv_bufs.append(plgpu.SMEM((cfg.stages, n_rope, bt, w_rope), dt, transforms=tf))  # kv_rope
    pl.run_scoped(
        warpgroups,
        *q_bufs,
        *kv_bufs,
        plgpu.SMEM((m_rows, bt), dt, transforms=tf),  # p
        plgpu.SMEM((m_rows,), jnp.float32),  # alpha
        plgpu.Barrier(num_arrivals=n_chunks),  # q_bar
        plgpu.Barrier(num_arrivals=_copies_per_block(cta), num_barriers=cfg.stages),  # kv_full
        plgpu.Barrier(num_arrivals=2, num_barriers=cfg.stages),  # kv_consumed
        plgpu.Barrier(num_arrivals=1),  # p_full
        plgpu.Barrier(num_arrivals=1),  # p_free
        collective_axes="wg",
    )


def _memory_warpgroup(cta: _Cta, smem: _Smem) -> None:
    """Warpgroup 2 (TMA): Q into ``smem.q`` once, then the split's KV blocks into the pipeline
    stages, block i into stage i % stages once both compute warpgroups released block
    i - stages; page ids read one block ahead (module doc)."""
    plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")
    for c, dst in enumerate(smem.q_chunks()):
        src = cta.q_ref.at[cta.b, cta.hb, c, :, pl.ds(0, dst.shape[-1])]
        plgpu.copy_gmem_to_smem(src, dst, smem.q_bar)
    bt, stages, t_pp = cta.block_t, cta.stages, cta.tokens_per_page
    lo, n_blocks = cta.lo, cta.n_blocks

    def page_of(i):
        """Page id of block i (table index and id clamped: never a fault)."""
        t = lo + jnp.minimum(i, jnp.maximum(n_blocks - 1, 0)) * bt
        page = cta.table_ref[cta.b, jnp.clip(t // t_pp, 0, cta.max_pages - 1)]
        return jnp.clip(page, 0, cta.num_pages - 1)

    def load(i, page):
        page_next = page_of(i + 1)  # issued now, used next step: hides its latency
        slot = lax.rem(i, stages)

        with jax.named_scope("mem_wait_free"):
            @pl.when(i >= stages)
            def _():
                plgpu.barrier_wait(smem.kv_consumed.at[slot])

        row0 = page * cta.rows_per_page + lax.rem(lo + i * bt, t_pp)
        for c, t, dst in smem.load_boxes(slot, bt):  # a rope chunk: its first rope_cols columns
            src = cta.kv_ref.at[pl.ds(pl.multiple_of(row0 + c * t_pp + t, 8), dst.shape[0]),
                                pl.ds(0, dst.shape[-1])]
            plgpu.copy_gmem_to_smem(src, dst, smem.kv_full.at[slot])
        return page_next

    lax.fori_loop(0, n_blocks, load, page_of(0))

    # Observe the last releases too (every phase of a barrier is waited for in order).
    @pl.loop(jnp.maximum(n_blocks - stages, 0), n_blocks)
    def _(i):
        plgpu.barrier_wait(smem.kv_consumed.at[lax.rem(i, stages)])


def _scores_warpgroup(cta: _Cta, smem: _Smem) -> None:
    """Warpgroup 0: waits for Q, then writes the empty result of a split without tokens or runs
    the score / softmax / first-half P @ V pipeline (`_scores_pipeline`)."""
    plgpu.set_max_registers(SCORE_REGISTERS, action="increase")
    plgpu.barrier_wait(smem.q_bar)
    pl.when(cta.n_blocks == 0)(functools.partial(_write_empty_partial, cta))
    pl.when(cta.n_blocks > 0)(functools.partial(_scores_pipeline, cta, smem))


def _scores_pipeline(cta: _Cta, smem: _Smem) -> None:
    """Warpgroup 0 over n_blocks >= 1 blocks: with lookahead, block 0's scores, then
    `_scores_block` per block (carry: m, l [64] f32 base 2; O_0, wg0_chunks x [64, R] f32; the
    block's S [64, block_t] f32); without, `_scores_block_in_order` per block (the same carry
    without S); then the epilogue of O_0, m and l."""
    if cta.lookahead:
        plgpu.barrier_wait(smem.kv_full.at[0])
        s_first = _scores_now(cta, smem, 0)
        m_f, l_f, o, _ = lax.fori_loop(0, cta.n_blocks, functools.partial(_scores_block, cta, smem),
                                       (*_wg0_start(cta), s_first))
    else:
        m_f, l_f, o = lax.fori_loop(0, cta.n_blocks,
                                    functools.partial(_scores_block_in_order, cta, smem),
                                    _wg0_start(cta))
    plgpu.barrier_wait(smem.p_free)  # the last release of P: every phase is observed
    _write_partial(cta, o, 0, m_f, l_f)


def _scores_block_in_order(cta: _Cta, smem: _Smem, i, carry) -> tuple:
    """Block i's scores, softmax and P @ V in that order (no lookahead).

    carry: (m, l [64] f32 base 2, O_0 wg0_chunks x [64, R] f32); returns it for block i + 1.
    Publishes P and alpha for warpgroup 1 and releases block i's stage."""
    m_i, l_i, o = carry
    slot = lax.rem(i, cta.stages)
    with jax.named_scope("wg0_wait_kv"):
        plgpu.barrier_wait(smem.kv_full.at[slot])
    sc = _scores_now(cta, smem, slot)
    with jax.named_scope("wg0_softmax"):
        m_new, l_new, alpha, p16 = _online_softmax(cta, sc, cta.lo + i * cta.block_t, m_i, l_i)
    o_new = _publish_and_pv0(cta, smem, i, alpha, p16, o)
    plgpu.barrier_arrive(smem.kv_consumed.at[slot])
    return m_new, l_new, o_new


def _scores_block(cta: _Cta, smem: _Smem, i, carry) -> tuple:
    """Block i's softmax and P @ V, with block i+1's scores in flight.

    carry: (m, l [64] f32 base 2, O_0 wg0_chunks x [64, R] f32, block i's S [64, block_t]
    f32); returns it for block i + 1. Publishes P and alpha for warpgroup 1 and releases
    block i's stage."""
    m_i, l_i, o, sc = carry
    bt, stages = cta.block_t, cta.stages
    slot = lax.rem(i, stages)
    t0 = cta.lo + i * bt
    nslot = lax.rem(i + 1, stages)

    with jax.named_scope("wg0_wait_kv"):
        @pl.when(i + 1 < cta.n_blocks)
        def _():
            plgpu.barrier_wait(smem.kv_full.at[nslot])

    def step(acc_next):
        with jax.named_scope("wg0_issue_s"):
            @pl.when(i + 1 < cta.n_blocks)
            def _():
                _issue_scores(cta, smem, nslot, acc_next)  # asynchronous: overlaps the softmax
        with jax.named_scope("wg0_softmax"):
            m_new, l_new, alpha, p16 = _online_softmax(cta, sc, t0, m_i, l_i)
        o_new = _publish_and_pv0(cta, smem, i, alpha, p16, o)
        with jax.named_scope("wg0_read_s"):
            s_next = acc_next[...]
        return m_new, l_new, o_new, s_next

    out = pl.run_scoped(step, plgpu.ACC((HEADS_PER_CTA, bt), jnp.float32))
    plgpu.barrier_arrive(smem.kv_consumed.at[slot])
    return out


def _wg0_start(cta: _Cta) -> tuple:
    """Warpgroup 0's carry before the first block: m = -inf, l = 0 ([64] f32) and O_0 = 0
    (wg0_chunks x [64, R] f32)."""
    m_rows = HEADS_PER_CTA
    m0 = plgpu.layout_cast(jnp.full((m_rows,), -jnp.inf, jnp.float32), _ROW_LAYOUT)
    l0 = plgpu.layout_cast(jnp.zeros((m_rows,), jnp.float32), _ROW_LAYOUT)
    return m0, l0, _zero_outputs(cta, 0, cta.wg0_chunks)


def _publish_and_pv0(cta: _Cta, smem: _Smem, i, alpha: jax.Array, p16: jax.Array,
                     o: tuple) -> tuple:
    """Warpgroup 0 after block i's softmax: publishes P ([64, block_t], KV dtype) and alpha
    ([64] f32) for warpgroup 1 once it released the previous ones, then returns ``alpha * O_0 +
    P @ V_c`` over the first wg0_chunks value chunks of the block's stage."""
    with jax.named_scope("wg0_wait_p_free"):
        @pl.when(i >= 1)
        def _():  # warpgroup 1 is done with the previous P and alpha
            plgpu.barrier_wait(smem.p_free)

    with jax.named_scope("wg0_publish"):
        smem.p[...] = p16
        smem.alpha[...] = alpha
        plgpu.commit_smem()
        plgpu.barrier_arrive(smem.p_full)
    with jax.named_scope("wg0_pv"):
        v_refs = smem.value_refs(lax.rem(i, cta.stages), 0, cta.wg0_chunks)
        _zero_tail_rows(v_refs, cta.hi - (cta.lo + i * cta.block_t), cta.block_t)
        o = tuple(oc * lax.broadcast_in_dim(alpha, oc.shape, [0]) for oc in o)
        return _pv_accumulate(o, None if cta.interpret else p16, smem.p, v_refs, cta.interpret)


def _online_softmax(cta: _Cta, sc: jax.Array, t0: jax.Array, m_i: jax.Array,
                    l_i: jax.Array) -> tuple:
    """One block's online-softmax step in base 2.

    sc: [64, block_t] f32 raw scores of tokens t0.. (scaled, soft-capped and masked here:
    tokens >= hi and, with a window, < lo_all get -inf); m_i / l_i: [64] f32 running max
    (base-2 units) and sum. Returns (m_new, l_new, alpha [64] f32 = 2^(m_i - m_new), the
    rescale of O and l, P [64, block_t] in the KV dtype)."""
    if cta.soft_cap is None:  # base-2 logits in one multiply
        x2 = sc * (cta.scale * LOG2E)
    else:
        x2 = (cta.soft_cap * LOG2E) * jnp.tanh(sc * (cta.scale / cta.soft_cap))
    tok = t0 + plgpu.broadcasted_iota(jnp.int32, (HEADS_PER_CTA, cta.block_t), 1,
                                      layout=plgpu.Layout.WGMMA)
    valid = tok < cta.hi
    if cta.window is not None:
        valid = valid & (tok >= cta.lo_all)
    s2 = jnp.where(valid, x2, -jnp.inf)
    m_new = jnp.maximum(m_i, s2.max(axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m_i - m_safe)
    p = jnp.exp2(s2 - lax.broadcast_in_dim(m_safe, s2.shape, [0]))
    l_new = l_i * alpha + p.sum(axis=1)
    return m_new, l_new, alpha, p.astype(cta.dtype)


def _values_warpgroup(cta: _Cta, smem: _Smem) -> None:
    """Warpgroup 1: per block, O_1 = alpha * O_1 + P @ V_c over the value chunks
    [wg0_chunks, latent_chunks) (P and alpha from warpgroup 0), releasing P and the stage;
    then the epilogue of O_1."""
    plgpu.set_max_registers(SCORE_REGISTERS, action="increase")

    def body(i, o):
        slot = lax.rem(i, cta.stages)
        with jax.named_scope("wg1_wait_kv"):
            plgpu.barrier_wait(smem.kv_full.at[slot])
        with jax.named_scope("wg1_wait_p"):
            plgpu.barrier_wait(smem.p_full)
        with jax.named_scope("wg1_pv"):
            alpha = plgpu.layout_cast(smem.alpha[...], _ROW_LAYOUT)
            v_refs = smem.value_refs(slot, cta.wg0_chunks, cta.latent_chunks - cta.wg0_chunks)
            _zero_tail_rows(v_refs, cta.hi - (cta.lo + i * cta.block_t), cta.block_t)
            o = tuple(oc * lax.broadcast_in_dim(alpha, oc.shape, [0]) for oc in o)
            o = _pv_accumulate(o, None, smem.p, v_refs, cta.interpret)
        plgpu.barrier_arrive(smem.p_free)
        plgpu.barrier_arrive(smem.kv_consumed.at[slot])
        return o

    o0 = _zero_outputs(cta, cta.wg0_chunks, cta.latent_chunks - cta.wg0_chunks)
    _write_partial(cta, lax.fori_loop(0, cta.n_blocks, body, o0), cta.wg0_chunks)


def _write_partial(cta: _Cta, o: tuple, first_chunk: int, m_base2: jax.Array | None = None,
                   l_sum: jax.Array | None = None) -> None:
    """Epilogue: a compute warpgroup's unnormalised O (its `_value_pieces`, [64, w] f32 each,
    from latent chunk ``first_chunk`` on) into ``o_ref[item, c]``, one R-wide chunk c at a time;
    with the running max ``m_base2`` (base-2 units) and sum ``l_sum`` ([64] f32, warpgroup 0),
    also ``m_ref[item]`` (natural-log units) and ``l_ref[item]``."""
    r, c = cta.row_elems, first_chunk
    for piece in o:
        for j in range(piece.shape[1] // r):
            cta.o_ref[cta.item, c] = piece[:, j * r:(j + 1) * r] if piece.shape[1] > r else piece
            c += 1
    if m_base2 is not None:
        cta.m_ref[cta.item] = m_base2 * LN2
        cta.l_ref[cta.item] = l_sum


def _write_empty_partial(cta: _Cta) -> None:
    """Epilogue of warpgroup 0 for a split without tokens: O_0 = 0, m = -inf, l = 0 (warpgroup 1
    writes its zero O_1 after its empty loop)."""
    m_rows = HEADS_PER_CTA
    _write_partial(cta, _zero_outputs(cta, 0, cta.wg0_chunks), 0)
    cta.m_ref[cta.item] = plgpu.layout_cast(jnp.full((m_rows,), -jnp.inf, jnp.float32),
                                            _ROW_LAYOUT)
    cta.l_ref[cta.item] = plgpu.layout_cast(jnp.zeros((m_rows,), jnp.float32), _ROW_LAYOUT)


@functools.partial(jax.jit, static_argnames=("geom", "cfg", "scale", "soft_cap", "window",
                                             "backend", "return_lse", "profile_dir"))
def _mla_decode_mgpu(q_latent, q_rope, arena, page_table, lengths, *, geom: PageGeometry,
                     cfg: Config, scale: float, soft_cap: float | None, window: int | None,
                     backend: str, return_lse: bool, profile_dir: str | None = None):
    """`paged_mla_decode_attention_mgpu` after its checks: packs the query into [B, HB, chunks,
    64, R] tiles (heads padded to HB * 64, each part padded to whole R chunks), computes the
    split size (tokens per split, a multiple of block_t, from the longest attended range),
    launches the kernel over the grid (HB, splits, B) and combines the splits."""
    b, h, c = q_latent.shape
    r = geom.row_elems
    dt = arena.dtype
    hb = -(-h // HEADS_PER_CTA)
    hp = hb * HEADS_PER_CTA
    n_chunks = len(geom.score_chunk_rows)
    parts = [q_latent.astype(dt)]
    if geom.spec.rope_dim:
        parts.append(q_rope.astype(dt))
    packed = []
    for part in parts:  # each part padded to whole R chunks (as the arena pads its rows)
        w = part.shape[-1]
        packed.append(jnp.pad(part, ((0, 0), (0, hp - h), (0, -w % r))))
    q = jnp.concatenate(packed, axis=-1).reshape(b, hb, HEADS_PER_CTA, n_chunks, r)
    q = q.transpose(0, 1, 3, 2, 4)  # [B, HB, chunks, 64, R]: chunk c is one TMA box
    lengths = lengths.astype(jnp.int32)
    bt, ns = cfg.block_t, cfg.num_splits
    if window is not None:
        start = jnp.maximum(lengths - window, 0) // bt * bt
    else:
        start = jnp.zeros_like(lengths)
    longest = jnp.max(lengths - start)
    split = (longest + ns - 1) // ns
    split = ((split + bt - 1) // bt * bt).astype(jnp.int32).reshape(1)
    items = b * ns * hb
    n_lat = geom.head_chunks
    interpret = backend == "interpret"
    params = None
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        params = InterpretGPUParams()
    kernel = functools.partial(_kernel, geom=geom, cfg=cfg, scale=scale, soft_cap=soft_cap,
                               window=window, num_pages=arena.shape[0], head_blocks=hb,
                               interpret=interpret)
    o, m, den = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((items, n_lat, HEADS_PER_CTA, r), jnp.float32),
                  jax.ShapeDtypeStruct((items, HEADS_PER_CTA), jnp.float32),
                  jax.ShapeDtypeStruct((items, HEADS_PER_CTA), jnp.float32)),
        grid=(hb, ns, b),
        grid_names=("hb", "split", "b"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
            reduction_scratch_bytes=0,  # row max / sum of WGMMA tiles: warp shuffles only
            profile_space=profile_ranges(geom, cfg, jnp.dtype(dt).itemsize) if profile_dir else 0,
            profile_dir=profile_dir or "",
            profile_bounds_check=bool(profile_dir)),
        interpret=params,
        kernel_name="mla_decode_mgpu",
    )(lengths, split, page_table.astype(jnp.int32), q,
      arena.reshape(arena.shape[0] * arena.shape[1], r))
    o = o.reshape(b, ns, hb, n_lat, HEADS_PER_CTA, r).transpose(0, 1, 2, 4, 3, 5)
    o = o.reshape(b, ns, hp, n_lat * r)
    res = split_softmax_combine(o, m.reshape(b, ns, hp), den.reshape(b, ns, hp), axis=1,
                                return_lse=return_lse)
    out, lse = res if return_lse else (res, None)
    out = out[:, :h, :c].astype(q_latent.dtype)
    return (out, lse[:, :h]) if return_lse else out


def paged_mla_decode_attention_mgpu(
    q_latent: jax.Array,
    q_rope: jax.Array,
    arena: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    geom: PageGeometry,
    *,
    scale: float,
    soft_cap: float | None = None,
    window: int | None = None,
    backend: str = "gpu",
    num_splits: int | None = None,
    block_t: int | None = None,
    stages: int | None = None,
    wg0_chunks: int | None = None,
    lookahead: bool | None = None,
    wide_values: bool = False,
    return_lse: bool = False,
    profile_dir: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """DeepSeek MLA decode attention in absorbed form on Hopper tensor cores (module doc).

    q_latent: [B, H, kv_lora_rank]; q_rope: [B, H, rope_dim] (cast to the arena's dtype).
    arena: [num_pages, rows_per_page, R] bf16/f16; page_table: [B, max_pages] int32 (entries
    past a sequence's pages: any value); lengths: [B] int32 (0: output 0, lse -inf).
    geom: an MLA `PageGeometry`; scale: softmax scale; soft_cap: logits -> cap * tanh(logits /
    cap) after scaling; window: attend only to the last ``window`` tokens.
    backend: "gpu" (Mosaic GPU) or "interpret" (Mosaic GPU's interpreter on CPU).
    num_splits / block_t / stages / wg0_chunks / lookahead / wide_values: tuning
      (`default_config`).
    profile_dir: GPU only, for timing work: each call writes a Mosaic GPU profiler trace there
      (Perfetto JSON: the named ranges of each warpgroup of each CTA, the first
      `profile_ranges`: as many as the shared memory left beside the launch holds; ValueError
      where none fits).
    Returns [B, H, kv_lora_rank] in q_latent's dtype; with ``return_lse`` also lse [B, H] f32.
    Raises ValueError for what the kernel does not support (`check_supported`).
    """
    if backend not in ("gpu", "interpret"):
        raise ValueError(f"backend {backend!r}: expected 'gpu' or 'interpret'")
    if geom.spec.kind != KVKind.MLA:
        raise ValueError("paged_mla_decode_attention_mgpu needs an MLA geometry")
    if arena.ndim != 3 or arena.shape[1:] != (geom.rows_per_page, geom.row_elems):
        raise ValueError(f"arena {arena.shape} does not match geometry "
                         f"[*, {geom.rows_per_page}, {geom.row_elems}]")
    b, h = q_latent.shape[:2]
    if (page_table.ndim != 2 or page_table.shape[0] != b or not page_table.shape[1]
            or lengths.shape != (b,)):
        raise ValueError(f"page_table {page_table.shape} / lengths {lengths.shape} do not fit "
                         f"{b} sequences")
    if (q_latent.shape != (b, h, geom.spec.kv_lora_rank)
            or q_rope.shape != (b, h, geom.spec.rope_dim)):
        raise ValueError(f"q_latent {q_latent.shape} / q_rope {q_rope.shape} do not fit "
                         f"{geom.spec}")
    if window is not None and window < 1:
        raise ValueError(f"window={window} must be >= 1")
    max_tokens = page_table.shape[1] * geom.tokens_per_page
    if window is not None:
        max_tokens = min(max_tokens, window + geom.tokens_per_page)
    cfg = default_config(geom, b, h, max_tokens, jnp.dtype(arena.dtype).itemsize,
                         block_t=block_t, stages=stages, num_splits=num_splits,
                         wg0_chunks=wg0_chunks, lookahead=lookahead, wide_values=wide_values)
    check_supported(geom, arena, cfg)
    if profile_dir and not profile_ranges(geom, cfg, jnp.dtype(arena.dtype).itemsize):
        raise ValueError(f"no shared memory is left for the profiler beside {cfg}: pass fewer "
                         "stages or a smaller block_t")
    if b == 0:
        out = jnp.zeros(q_latent.shape, q_latent.dtype)
        return (out, jnp.zeros((0, h), jnp.float32)) if return_lse else out
    return _mla_decode_mgpu(q_latent, q_rope, arena, page_table, lengths, geom=geom, cfg=cfg,
                            scale=float(scale),
                            soft_cap=None if soft_cap is None else float(soft_cap),
                            window=window, backend=backend, return_lse=return_lse,
                            profile_dir=profile_dir)


__all__ = ["Config", "check_supported", "default_config", "default_num_splits",
           "default_wg0_chunks", "max_stages", "paged_mla_decode_attention_mgpu", "rope_cols",
           "smem_plan"]
