"""Model constants for the cost model by trace model name (a demo model or `<shape>-NN`)."""

from __future__ import annotations

import functools

from crosspool_jax.models.costs import ModelCosts, model_costs


@functools.lru_cache(maxsize=64)
def costs_for(model: str, dtype: str, page_bytes: int, platform: str) -> ModelCosts:
    """`ModelCosts` of trace model `model` (benchmarks.runner.model_config) in an arena of `dtype`
    with pages of `page_bytes` bytes on `platform` ("gpu": rows of 128 elements, "cpu": 64)."""
    from benchmarks.runner import model_config
    from crosspool_jax.execution.pooled_step import model_geometry
    from pallas_kernels.page_layout import PoolLayout

    cfg = model_config(model)
    layout = PoolLayout(page_bytes, dtype, 128 if platform == "gpu" else 64, 1)
    return model_costs(cfg, dtype, model_geometry(cfg, layout, platform).bytes_per_token_used)
