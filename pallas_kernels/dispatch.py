"""Which kernel family runs an attention call: the Triton kernels, or on Hopper the Mosaic GPU
(wgmma + TMA) kernels where they are measured faster.

`ATTENTION_KERNELS` (the engine's ``attention_kernels``, `StepSpec.attention_kernels`; default
`DEFAULT_ATTENTION_KERNELS`):

* "auto" (the default): on a Hopper GPU (compute capability 9.x) under the "gpu" backend, the
  Mosaic GPU kernel for the calls `auto_uses_mosaic` names (the rule measured on an H100,
  2026-12-05, docs/kernels.md "Mosaic GPU kernels in the engine"); the Triton kernels everywhere
  else (other GPUs, other backends, CPU). Inside the engine's step programs the Mosaic GQA
  prefill ran whole 4K prompts 1.08x (OLMoE-1B-7B) and 1.12x (Qwen3-30B-A3B) faster than Triton
  on one H100 (2026-12-06, `benchmarks/prefill.py --variants triton,auto`; 1.06-1.47x on one
  H200, 2026-12-05) and the OLMoE smoke replay prefilled 1.32x faster per busy second (its
  grid's precompile 1.26x longer). The MLA kernels need pages of a multiple of 16 tokens: since
  2026-12-06 (night) the engine's GPU layout (256-KiB pages of 128-element rows) holds 192 MLA
  tokens a page (`page_layout.default_token_align`; 200 before, where each Mosaic MLA kernel
  refused while tracing and MLA ran Triton). "auto" takes them only for MLA calls of 64 query
  heads or more (`MLA_AUTO_MIN_HEADS`): with 16 heads (DeepSeek-V2-Lite) they ran slower than
  Triton inside the engine.
* "triton": always the Triton kernels (off GPU: the same kernels interpreted, or the jnp
  reference).
* "mosaic": the Mosaic GPU kernel wherever one exists for the call, on the backends the Mosaic
  kernels have: "gpu" on a Hopper GPU (wgmma and TMA are sm_90 instructions: another GPU runs the
  Triton kernels) and "interpret" (Mosaic GPU's interpreter on CPU, for tests).

Under "auto" and "mosaic" a call the Mosaic kernel cannot take (an f32 arena, a row width other
than 64 / 128, a GQA group over 64, ...: each kernel's ValueError, raised while tracing) runs the
Triton kernel instead; nothing else changes. (The engine also compiles a step program with the
Triton kernels when its Mosaic build fails later, in XLA's compile: `GroupRunner._compile_aot`.)
GQA / MQA decode has no Mosaic kernel: it always runs `decode.paged_decode_attention`.

Each function takes and returns what the Triton kernel it stands for does (`prefill.
paged_prefill_attention`, `prefill.paged_mla_prefill_attention`, `decode.paged_mla_decode_attention`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from pallas_kernels._common import resolve_backend
from pallas_kernels.decode import paged_mla_decode_attention
from pallas_kernels.page_layout import PageGeometry
from pallas_kernels.prefill import paged_mla_prefill_attention, paged_prefill_attention

ATTENTION_KERNELS = ("auto", "triton", "mosaic")
DEFAULT_ATTENTION_KERNELS = "auto"
MOSAIC_BACKENDS = ("gpu", "interpret")
CALLS = ("gqa_prefill", "mla_prefill", "mla_decode")
# "auto": MLA prefill on the Mosaic decode kernel's rows. On: 1.88-2.09x the Triton kernel on one
# H200, 2026-12-05 (DeepSeek-V3, a 512-token chunk after 0 / 8K / 32K tokens and a ragged batch of
# four; docs/benchmarks.md "One H200, 2026-12-05 (noon)").
MLA_PREFILL_MOSAIC = True
# "auto": the Mosaic MLA kernels only for calls of at least this many query heads. The kernel's
# wgmma takes 64 heads as its rows and pads fewer: DeepSeek-V2-Lite's 16 heads ran slower than
# the Triton kernels inside the engine (one H100, 2026-12-06 night: decode 0.86x, whole 4K prompts
# 0.96x; docs/benchmarks.md); the 1.81-2.09x wins were DeepSeek-V3's 128 heads.
MLA_AUTO_MIN_HEADS = 64


def check_kernels(kernels: str) -> str:
    """`kernels` if it is one of `ATTENTION_KERNELS`; ValueError otherwise."""
    if kernels not in ATTENTION_KERNELS:
        raise ValueError(f"attention_kernels {kernels!r}: expected one of {ATTENTION_KERNELS}")
    return kernels


@functools.cache
def is_hopper() -> bool:
    """True when the default device is an NVIDIA GPU of compute capability 9.x (H100 / H200)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover - no backend at all
        return False
    cc = str(getattr(dev, "compute_capability", "") or "")
    return dev.platform in ("gpu", "cuda") and cc.split(".")[0] == "9"


def auto_uses_mosaic(call: str, heads: int | None = None) -> bool:
    """The "auto" rule on Hopper: does `call` (one of `CALLS`) of `heads` query heads (None: any)
    run the Mosaic GPU kernel? MLA calls: only with `MLA_AUTO_MIN_HEADS` heads or more.

    Measured on one H100, 2026-12-05, the kernels alone (docs/benchmarks.md "One H100,
    2026-12-05 (morning)"): MLA decode 1.81x the Triton kernel (DeepSeek-V3, batch 32 ragged);
    GQA prefill of a 512-token chunk after 8K-32K tokens 1.25-2.1x the Triton defaults (OLMoE's
    MHA and Qwen3-30B-A3B's group of 8, two calls); on a ragged 4-request chunk 0.78x and 1.43x
    at the default splits in the two calls, 1.7x at 4-8 splits (`prefill_mgpu.default_num_splits`
    now gives 5 there); on a first chunk (no context, 0.06-0.34 ms, noisy between calls) 0.5-1.6x.
    MLA prefill: see `MLA_PREFILL_MOSAIC`.
    """
    if call in ("mla_decode", "mla_prefill"):
        enough = heads is None or heads >= MLA_AUTO_MIN_HEADS
        return enough and (call == "mla_decode" or MLA_PREFILL_MOSAIC)
    if call == "gqa_prefill":
        return True
    raise ValueError(f"call {call!r}: expected one of {CALLS}")


def wants_mosaic(kernels: str, backend: str, call: str, hopper: bool | None = None,
                 heads: int | None = None) -> bool:
    """Whether a call tries the Mosaic GPU kernel first (it may still refuse the shapes).

    kernels: one of `ATTENTION_KERNELS`; backend: the resolved kernel backend ("gpu",
    "interpret", "reference", "tpu"); hopper: whether the device is Hopper (default `is_hopper()`);
    heads: the call's query heads (`auto_uses_mosaic`).
    """
    check_kernels(kernels)
    if kernels == "triton" or backend not in MOSAIC_BACKENDS:
        return False
    if backend == "interpret":
        return kernels == "mosaic"
    if not (is_hopper() if hopper is None else hopper):
        return False
    return kernels == "mosaic" or auto_uses_mosaic(call, heads)


def _mosaic_or_none(fn, *args: Any, **kw: Any) -> Any:
    """fn(*args, **kw), or None when the kernel refuses the call's shapes (its ValueError)."""
    try:
        return fn(*args, **kw)
    except ValueError:
        return None


def prefill_attention(q: jax.Array, arena: jax.Array, page_table: jax.Array, kv_lens: jax.Array,
                      cu_q_lens: jax.Array, geom: PageGeometry, *,
                      kernels: str = DEFAULT_ATTENTION_KERNELS,
                      scale: float | None = None, soft_cap: float | None = None,
                      window: int | None = None, backend: str | None = None,
                      return_lse: bool = False, one_row_decode: bool = False) -> Any:
    """`prefill.paged_prefill_attention` (GQA / MQA / MHA chunked prefill) by the kernel
    `kernels` picks; same arguments and result (`one_row_decode`: the Triton kernels only; the
    Mosaic GPU kernel runs every sequence as a prefill)."""
    be = resolve_backend(backend)
    if wants_mosaic(kernels, be, "gqa_prefill"):
        from pallas_kernels.prefill_mgpu import paged_prefill_attention_mgpu

        out = _mosaic_or_none(paged_prefill_attention_mgpu, q, arena, page_table, kv_lens,
                              cu_q_lens, geom, scale=scale, soft_cap=soft_cap, window=window,
                              backend=be, return_lse=return_lse)
        if out is not None:
            return out
    return paged_prefill_attention(q, arena, page_table, kv_lens, cu_q_lens, geom, scale=scale,
                                   soft_cap=soft_cap, window=window, backend=be,
                                   return_lse=return_lse, one_row_decode=one_row_decode)


def mla_prefill_attention(q_latent: jax.Array, q_rope: jax.Array, arena: jax.Array,
                          page_table: jax.Array, kv_lens: jax.Array, cu_q_lens: jax.Array,
                          geom: PageGeometry, *, scale: float,
                          kernels: str = DEFAULT_ATTENTION_KERNELS,
                          soft_cap: float | None = None, window: int | None = None,
                          backend: str | None = None, return_lse: bool = False) -> Any:
    """`prefill.paged_mla_prefill_attention` (MLA chunked prefill, absorbed form) by the kernel
    `kernels` picks; same arguments and result."""
    be = resolve_backend(backend)
    if wants_mosaic(kernels, be, "mla_prefill", heads=q_latent.shape[-2]):
        from pallas_kernels.mla_prefill_mgpu import paged_mla_prefill_attention_mgpu

        out = _mosaic_or_none(paged_mla_prefill_attention_mgpu, q_latent, q_rope, arena,
                              page_table, kv_lens, cu_q_lens, geom, scale=scale,
                              soft_cap=soft_cap, window=window, backend=be,
                              return_lse=return_lse)
        if out is not None:
            return out
    return paged_mla_prefill_attention(q_latent, q_rope, arena, page_table, kv_lens, cu_q_lens,
                                       geom, scale=scale, soft_cap=soft_cap, window=window,
                                       backend=be, return_lse=return_lse)


def mla_decode_attention(q_latent: jax.Array, q_rope: jax.Array, arena: jax.Array,
                         page_table: jax.Array, lengths: jax.Array, geom: PageGeometry, *,
                         scale: float, kernels: str = DEFAULT_ATTENTION_KERNELS,
                         soft_cap: float | None = None,
                         window: int | None = None, backend: str | None = None,
                         schedule: str = "split", return_lse: bool = False) -> Any:
    """`decode.paged_mla_decode_attention` by the kernel `kernels` picks; same arguments and
    result (`schedule` applies to the Triton kernel; the Mosaic one splits each sequence's KV
    by its own rule)."""
    be = resolve_backend(backend)
    if wants_mosaic(kernels, be, "mla_decode", heads=q_latent.shape[-2]):
        from pallas_kernels.mla_decode_mgpu import paged_mla_decode_attention_mgpu

        out = _mosaic_or_none(paged_mla_decode_attention_mgpu, q_latent, q_rope, arena,
                              page_table, lengths, geom, scale=scale, soft_cap=soft_cap,
                              window=window, backend=be, return_lse=return_lse)
        if out is not None:
            return out
    return paged_mla_decode_attention(q_latent, q_rope, arena, page_table, lengths, geom,
                                      scale=scale, soft_cap=soft_cap, window=window, backend=be,
                                      schedule=schedule, return_lse=return_lse)


__all__ = ["ATTENTION_KERNELS", "CALLS", "DEFAULT_ATTENTION_KERNELS", "MLA_AUTO_MIN_HEADS",
           "auto_uses_mosaic", "check_kernels", "is_hopper", "mla_decode_attention", "mla_prefill_attention",
           "prefill_attention", "wants_mosaic"]
