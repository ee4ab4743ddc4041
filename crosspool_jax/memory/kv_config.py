"""The KV pool's shape and each model's KV geometry, resolved to tokens per page.

`KVPoolConfig` is the pool (devices, pages per device, bytes per page, host swap slots).
`KVGeometry` is a model's KV (layers, bytes per token per layer); against the pool's page size it
fixes how many tokens one page holds (`tokens_per_page`), so models of different KV widths share one
arena. `ModelKVLayout` is the result, with the page arithmetic: rows (pages per layer) and pages for
a number of tokens. `resolve_layout` makes the layout of a model that registers with the pool.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from crosspool_jax.memory.kv_types import KVConfigError, ModelId


@dataclasses.dataclass(frozen=True)
class KVPoolConfig:
    """Shape of the KV pool.

    num_devices: KV devices in the pool.
    pages_per_device: pages in each device's arena (same on every device).
    page_bytes: bytes of one page.
    host_swap_pages: host-memory slots of `page_bytes` each for swapped-out pages (0: no swap).
    """

    num_devices: int
    pages_per_device: int
    page_bytes: int
    host_swap_pages: int = 0

    def __post_init__(self) -> None:
        for name in ("num_devices", "pages_per_device", "page_bytes"):
            if getattr(self, name) < 1:
                raise KVConfigError(f"KVPoolConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.host_swap_pages < 0:
            raise KVConfigError(f"KVPoolConfig.host_swap_pages must be >= 0, got {self.host_swap_pages}")

    @property
    def total_pages(self) -> int:
        """Pages in the whole pool (all devices)."""
        return self.num_devices * self.pages_per_device

class _HasKVShape(Protocol):
    """What `KVGeometry.from_model_config` reads from a `crosspool_jax.models.config.ModelConfig`."""

    @property
    def num_layers(self) -> int: ...

    @property
    def kv_width(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class KVGeometry:
    """A model's KV shape as the pool sees it.

    num_layers: attention layers, each with its own KV.
    bytes_per_token_per_layer: KV bytes one token occupies in one layer (K and V together, including
        any row padding the kernels' page layout adds; `pallas_kernels.page_layout.PageGeometry.
        bytes_per_token_used`).
    token_align: tokens per page are rounded down to a multiple of this when at least this many fit
        (the same rule as `pallas_kernels.page_layout.tokens_per_page`).
    tokens_per_page_override: use exactly this many tokens per page (e.g. the kernels' own
        `PageGeometry.tokens_per_page`); must fit in the page.
    """

    num_layers: int
    bytes_per_token_per_layer: int
    token_align: int = 1
    tokens_per_page_override: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "bytes_per_token_per_layer", "token_align"):
            if getattr(self, name) < 1:
                raise KVConfigError(f"KVGeometry.{name} must be >= 1, got {getattr(self, name)}")
        if self.tokens_per_page_override is not None and self.tokens_per_page_override < 1:
            raise KVConfigError(
                f"KVGeometry.tokens_per_page_override must be >= 1, got {self.tokens_per_page_override}"
            )

    @classmethod
    def from_model_config(cls, config: _HasKVShape, dtype_bytes: int = 2, token_align: int = 1) -> KVGeometry:
        """Geometry of a `ModelConfig` whose KV cache is stored with `dtype_bytes` bytes per element."""
        return cls(config.num_layers, config.kv_width * dtype_bytes, token_align)

    def tokens_per_page(self, page_bytes: int) -> int:
        """Tokens of one layer that one page of `page_bytes` bytes holds."""
        fit = page_bytes // self.bytes_per_token_per_layer
        if self.tokens_per_page_override is not None:
            if self.tokens_per_page_override > fit:
                raise KVConfigError(
                    f"tokens_per_page_override={self.tokens_per_page_override} tokens of "
                    f"{self.bytes_per_token_per_layer} bytes do not fit a page of {page_bytes} bytes"
                )
            return self.tokens_per_page_override
        if fit < 1:
            raise KVConfigError(
                f"a page of {page_bytes} bytes is smaller than one token of {self.bytes_per_token_per_layer} "
                "bytes/token/layer: no token fits"
            )
        if fit >= self.token_align:
            fit -= fit % self.token_align
        return fit


@dataclasses.dataclass(frozen=True)
class ModelKVLayout:
    """A model's geometry resolved against the pool's page size."""

    model: ModelId
    geometry: KVGeometry
    page_bytes: int
    tokens_per_page: int

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    def rows_for(self, num_tokens: int) -> int:
        """Pages per layer (= rows) that `num_tokens` tokens need."""
        return -(-num_tokens // self.tokens_per_page)

    def pages_for(self, num_tokens: int) -> int:
        """Pages over all layers that `num_tokens` tokens need."""
        return self.rows_for(num_tokens) * self.num_layers

    @property
    def used_bytes_per_page(self) -> int:
        """Bytes of a full page that hold KV; the rest of the page (page_bytes minus this) is unused."""
        return self.tokens_per_page * self.geometry.bytes_per_token_per_layer



def resolve_layout(config: KVPoolConfig, model: ModelId, geometry: KVGeometry) -> ModelKVLayout:
    """`model`'s layout in the pool of `config`.

    Raises KVConfigError if not one token fits a page or not one row (`num_layers` pages) fits a
    device.
    """
    tokens_per_page = geometry.tokens_per_page(config.page_bytes)
    if geometry.num_layers > config.pages_per_device:
        raise KVConfigError(
            f"model {model!r} has {geometry.num_layers} layers but a device holds only "
            f"{config.pages_per_device} pages: not one row of pages fits"
        )
    return ModelKVLayout(model, geometry, config.page_bytes, tokens_per_page)
