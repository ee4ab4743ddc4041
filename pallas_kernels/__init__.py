"""Pallas attention kernels over the shared paged KV arena (see docs/kernels.md).

Public API:

* geometry: `page_layout` (`KVSpec`, `PoolLayout`, `PageGeometry`, `page_geometry`,
  `tokens_per_page`, `choose_row_elems`) -- pure Python, for the KV pool and virtualizer;
* `paged_decode_attention`, `paged_mla_decode_attention` (decode, ragged, split-KV or persistent);
* `paged_prefill_attention`, `paged_mla_prefill_attention` (chunked prefill, ragged);
* `kv_append`, `mla_kv_append` (in-place page writes);
* the ``*_reference`` plain-jnp versions of each, and `paged_reference` (dense readers).

The names are imported lazily: ``import pallas_kernels.page_layout`` (what the KV pool's
bookkeeping needs) does not import JAX.
"""

import importlib

_EXPORTS = {
    "append": ("kv_append", "kv_append_reference", "mla_kv_append", "mla_kv_append_reference"),
    "decode": ("paged_decode_attention", "paged_decode_attention_reference",
               "paged_mla_decode_attention", "paged_mla_decode_attention_reference"),
    "page_layout": ("KVKind", "KVSpec", "PageGeometry", "PoolLayout", "choose_row_elems",
                    "page_geometry", "pages_needed", "tokens_per_page"),
    "paged_reference": ("read_features", "slots_from_positions"),
    "prefill": ("paged_mla_prefill_attention", "paged_mla_prefill_attention_reference",
                "paged_prefill_attention", "paged_prefill_attention_reference"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"pallas_kernels.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")
