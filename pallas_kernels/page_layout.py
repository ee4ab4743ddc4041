"""Geometry of the shared KV arena: fixed-byte pages, each model's view of them.

Pure Python (no JAX): the KV pool, the virtualizer and the kernels all call this module, so the
bytes the pool allocates and the rows the kernels read can never disagree. `docs/kernels.md`
explains the layout and why; in short:

* A KV device owns ONE arena, a JAX array of shape ``[num_pages, rows_per_page, row_elems]`` and
  the pool's KV dtype. ``row_elems`` (R) is the pool's *row unit*: every feature vector stored in
  the pool (a K head, a V head, an MLA latent, an MLA rope key) is cut into chunks of R elements
  (padded up to a multiple of R with zeros if it is not one). ``page_bytes = rows_per_page * R *
  itemsize``.
* A page holds ONE layer's KV of ``tokens_per_page`` (T) consecutive tokens of one sequence. Inside
  a page the rows are laid out as a stack of [T, R] *chunks*; chunk ``c`` of token ``t`` is row
  ``c * T + t``:

  - GQA/MQA/MHA: ``[kv_heads, 2 (K, V), head_chunks, T, R]``: kv head h's K then V, so one
    program that owns head h reads one contiguous run of rows per page;
  - MLA: ``[latent_chunks + rope_chunks, T, R]``: the compressed latent then the rope key.

  Rows past ``used_rows`` at the end of a page are padding that no kernel reads or writes.
* Every model's kernels take the SAME arena array and compute ``page * rows_per_page + row``
  themselves, so no model needs a view that would be a slice (a copy) of the arena. On GPU/CPU
  the kernels see ``arena.reshape(num_pages * rows_per_page, R)`` (a row-major bitcast); on TPU the
  3-D arena itself (its minor dims stay ``[rows, R]`` with R = 128 lanes, so nothing is relaid).
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np

LANES_TPU = 128
"""Row unit on TPU: one vreg lane row, so an arena page tiles exactly into (sublane, 128) tiles."""


class KVKind(enum.StrEnum):
    """What one token of one layer stores in the pool."""

    GQA = "gqa"  # K and V per kv head (MHA, GQA and MQA are all this with different kv_heads)
    MLA = "mla"  # DeepSeek: one compressed latent (kv_lora_rank) + one shared rope key (rope_dim)


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """A model's per-token, per-layer KV geometry (independent of any pool).

    GQA: ``kv_heads`` heads of ``head_dim`` for K and again for V.
    MLA: ``kv_lora_rank`` latent elements + ``rope_dim`` rope-key elements (K and V share them).
    """

    kind: KVKind
    kv_heads: int = 0
    head_dim: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0

    @staticmethod
    def gqa(kv_heads: int, head_dim: int) -> KVSpec:
        return KVSpec(KVKind.GQA, kv_heads=kv_heads, head_dim=head_dim)

    @staticmethod
    def mla(kv_lora_rank: int, rope_dim: int) -> KVSpec:
        return KVSpec(KVKind.MLA, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)

    def __post_init__(self) -> None:
        if self.kind == KVKind.GQA:
            if self.kv_heads < 1 or self.head_dim < 1:
                raise ValueError(f"GQA needs kv_heads >= 1 and head_dim >= 1, got {self}")
        elif self.kv_lora_rank < 1 or self.rope_dim < 0:
            raise ValueError(f"MLA needs kv_lora_rank >= 1 and rope_dim >= 0, got {self}")

    @property
    def feature_widths(self) -> tuple[int, ...]:
        """The widths (elements) of the vectors one token stores, before padding to the row unit."""
        if self.kind == KVKind.GQA:
            return (self.head_dim,) * (2 * self.kv_heads)
        return (self.kv_lora_rank, self.rope_dim) if self.rope_dim else (self.kv_lora_rank,)

    @property
    def elems_per_token(self) -> int:
        """Unpadded elements per token per layer (what the model needs, not what the page spends)."""
        return sum(self.feature_widths)


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """One KV device's arena: ``num_pages`` pages of ``page_bytes`` bytes, rows of ``row_elems``.

    dtype: the KV element dtype of the arena (e.g. "bfloat16", "float32").
    row_elems: elements per arena row (R). 128 on TPU; on GPU/CPU the largest power of two that
      divides every hosted model's feature widths, capped at 128 (see `choose_row_elems`).
    """

    page_bytes: int
    dtype: str
    row_elems: int
    num_pages: int = 0

    def __post_init__(self) -> None:
        row_bytes = self.row_elems * self.itemsize
        if self.row_elems < 1 or self.page_bytes < row_bytes or self.page_bytes % row_bytes:
            raise ValueError(
                f"page_bytes={self.page_bytes} must be a positive multiple of one row "
                f"({self.row_elems} x {self.dtype} = {row_bytes} bytes)"
            )

    @property
    def itemsize(self) -> int:
        return np.dtype(_np_dtype(self.dtype)).itemsize

    @property
    def rows_per_page(self) -> int:
        return self.page_bytes // (self.row_elems * self.itemsize)

    def arena_shape(self, num_pages: int | None = None) -> tuple[int, int, int]:
        """``[num_pages, rows_per_page, row_elems]``: the arena array's shape."""
        n = self.num_pages if num_pages is None else num_pages
        return (n, self.rows_per_page, self.row_elems)

    def flat_rows_shape(self, num_pages: int | None = None) -> tuple[int, int]:
        """``[num_pages * rows_per_page, row_elems]``: the GPU/CPU kernels' (bitcast) view."""
        n, rows, r = self.arena_shape(num_pages)
        return (n * rows, r)


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # jax's own dependency; numpy has no bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def choose_row_elems(specs: list[KVSpec] | tuple[KVSpec, ...], platform: str) -> int:
    """The row unit R for a pool hosting ``specs`` on ``platform`` ("gpu", "tpu" or "cpu").

    TPU: always 128 (vreg lanes; widths that are not a multiple get padded). GPU/CPU: the largest
    power of two dividing every feature width, clamped to [16, 128], so no model pays padding
    when its widths are multiples of 16 (all supported models: 64, 128, 256, 512).
    """
    if platform == "tpu":
        return LANES_TPU
    g = 0
    for s in specs:
        for w in s.feature_widths:
            g = math.gcd(g, w)
    if g == 0:
        return 128
    r = g & -g  # largest power of two dividing g
    return max(16, min(128, r))


GPU_ALIGN_16_MAX_LOSS = 1 / 16  # most of a page's tokens the GPU's default 16-token rounding drops


def default_token_align(platform: str, dtype: str) -> int:
    """Tokens per page are rounded down to a multiple of this (when at least this many fit).

    TPU: a [T, 128] chunk must start on a sublane tile: 8 rows of 32-bit, 16 of 16-bit. GPU: 16
    for a 16-bit arena, so the Mosaic GPU MLA kernels (`mla_decode_mgpu`, `mla_prefill_mgpu`:
    token blocks of 16-64 that divide T) can take the engine's pages; 8 otherwise
    (`tokens_per_page` keeps 8 where rounding to 16 would cost more than `GPU_ALIGN_16_MAX_LOSS`
    of the tokens). The engine's 256-KiB pages of 128-element rows then hold 192 MLA tokens
    instead of 200 (4% less KV); GQA models there have a power of two of at least 16 tokens a page
    either way. CPU: 8 (any T works; 8 keeps chunk starts 8-row aligned and costs little waste).
    """
    itemsize = np.dtype(_np_dtype(dtype)).itemsize
    if platform == "tpu":
        return 8 * max(1, 4 // itemsize)
    if platform == "gpu" and itemsize == 2:
        return 16
    return 8


@dataclasses.dataclass(frozen=True)
class PageGeometry:
    """A model's view of one pool's pages: everything a kernel needs to find a token's KV rows.

    All row offsets are relative to the start of a page (``page_id * rows_per_page`` in the flat
    row view). Chunk ``c`` of token slot ``t`` of a page is row ``c * tokens_per_page + t``.
    """

    spec: KVSpec
    rows_per_page: int
    row_elems: int
    tokens_per_page: int
    itemsize: int = 2  # bytes per arena element (only for byte accounting)

    # ---- chunks ---------------------------------------------------------------------------------
    @property
    def head_chunks(self) -> int:
        """GQA: chunks per K (or V) head vector; MLA: chunks of the latent."""
        width = self.spec.head_dim if self.spec.kind == KVKind.GQA else self.spec.kv_lora_rank
        return -(-width // self.row_elems)

    @property
    def rope_chunks(self) -> int:
        """MLA: chunks of the rope key (0 for GQA or rope_dim == 0)."""
        if self.spec.kind == KVKind.GQA:
            return 0
        return -(-self.spec.rope_dim // self.row_elems)

    @property
    def chunks_per_token(self) -> int:
        if self.spec.kind == KVKind.GQA:
            return 2 * self.spec.kv_heads * self.head_chunks
        return self.head_chunks + self.rope_chunks

    @property
    def used_rows(self) -> int:
        """Rows of a page that hold data; the rest (``rows_per_page - used_rows``) is padding."""
        return self.chunks_per_token * self.tokens_per_page

    @property
    def num_kv_heads(self) -> int:
        """Kernel-side KV heads: GQA kv_heads; MLA 1 (all query heads share the latent)."""
        return self.spec.kv_heads if self.spec.kind == KVKind.GQA else 1

    @property
    def head_stride_rows(self) -> int:
        """Rows between the first rows of kv head h and h+1 (GQA); 0 for MLA."""
        if self.spec.kind == KVKind.GQA:
            return 2 * self.head_chunks * self.tokens_per_page
        return 0

    # ---- what kernels iterate over -------------------------------------------------------------
    @property
    def score_chunk_rows(self) -> tuple[int, ...]:
        """Row offsets (relative to the kv head's base) of the chunks that q is dotted with.

        GQA: the K head's chunks. MLA: the latent's chunks then the rope key's chunks. The query is
        packed in the same order, chunk ``i`` of q being elements ``[i*R, (i+1)*R)``.
        """
        t = self.tokens_per_page
        if self.spec.kind == KVKind.GQA:
            return tuple(c * t for c in range(self.head_chunks))
        return tuple(c * t for c in range(self.head_chunks + self.rope_chunks))

    @property
    def value_chunk_rows(self) -> tuple[int, ...]:
        """Row offsets (relative to the kv head's base) of the chunks that form the output.

        GQA: the V head's chunks. MLA: the latent's chunks (the same rows as its score chunks, so
        a kernel loads them once).
        """
        t = self.tokens_per_page
        if self.spec.kind == KVKind.GQA:
            c0 = self.head_chunks
            return tuple((c0 + c) * t for c in range(self.head_chunks))
        return tuple(c * t for c in range(self.head_chunks))

    @property
    def q_width(self) -> int:
        """Padded width of the packed query (score chunks x R)."""
        return len(self.score_chunk_rows) * self.row_elems

    @property
    def out_width(self) -> int:
        """Padded width of the kernel's output (value chunks x R)."""
        return len(self.value_chunk_rows) * self.row_elems

    @property
    def bytes_per_token_used(self) -> int:
        """Bytes one token occupies in a page including row padding, excluding page-tail waste."""
        return self.chunks_per_token * self.row_elems * self.itemsize

    def page_view_shape(self) -> tuple[int, ...]:
        """Shape of one page's used rows as a dense array (for docs/tests; kernels never build it).

        GQA ``[kv_heads, 2, head_chunks, T, R]``; MLA ``[latent_chunks + rope_chunks, T, R]``.
        """
        t, r = self.tokens_per_page, self.row_elems
        if self.spec.kind == KVKind.GQA:
            return (self.spec.kv_heads, 2, self.head_chunks, t, r)
        return (self.head_chunks + self.rope_chunks, t, r)

    def waste_fraction(self) -> float:
        """Fraction of the page's bytes that hold no model data (row padding + page tail)."""
        useful = self.spec.elems_per_token * self.tokens_per_page
        return 1.0 - useful / (self.rows_per_page * self.row_elems)


def tokens_per_page(
    spec: KVSpec, pool: PoolLayout, token_align: int | None = None, platform: str = "gpu"
) -> int:
    """How many tokens of one layer of a model with ``spec`` fit in one page of ``pool``.

    ``floor(rows_per_page / chunks_per_token)``, then rounded down to a multiple of
    ``token_align`` (default `default_token_align`) when at least that many fit. Raises
    ValueError if not one token fits.
    """
    geom_probe = PageGeometry(spec, pool.rows_per_page, pool.row_elems, 1)
    fit = pool.rows_per_page // geom_probe.chunks_per_token
    if fit < 1:
        raise ValueError(
            f"one token of {spec} needs {geom_probe.chunks_per_token} rows of {pool.row_elems}; "
            f"a page has {pool.rows_per_page}"
        )
    align = token_align
    if align is None:
        align = default_token_align(platform, pool.dtype)
        if platform == "gpu" and fit % align > fit * GPU_ALIGN_16_MAX_LOSS:
            align = 8  # the Mosaic MLA kernels' 16 would waste too much of a small page
    if align > 1 and fit >= align:
        fit -= fit % align
    return fit


def page_geometry(
    spec: KVSpec, pool: PoolLayout, token_align: int | None = None, platform: str = "gpu"
) -> PageGeometry:
    """The `PageGeometry` of a model with ``spec`` in ``pool`` (tokens per page included)."""
    t = tokens_per_page(spec, pool, token_align, platform)
    return PageGeometry(spec, pool.rows_per_page, pool.row_elems, t, itemsize=pool.itemsize)


def pages_needed(num_tokens: int, geom: PageGeometry) -> int:
    """Pages (per layer) that ``num_tokens`` tokens of one sequence occupy."""
    return -(-num_tokens // geom.tokens_per_page)
