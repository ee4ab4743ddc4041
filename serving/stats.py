"""One snapshot of what an engine reports, shared by GetStats (serving/server.py) and the Prometheus
metrics (serving/metrics.py), so the two always say the same thing.

Works with any engine of the `crosspool_jax.engine_api.EngineInterface` protocol; the optional reports are
read where the engine has them: `mode` and `describe()` (the mode and its devices),
`weights_bytes_by_side(name)` or `weights_bytes(name)` (weights per model), `programs_compiled`
(step programs compiled). `EngineStats.kv_pages` / `.preemptions` come with `stats()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from crosspool_jax.engine_api import EngineStats


@dataclasses.dataclass(frozen=True)
class ModelWeights:
    """Bytes of one model's weights over all its devices (attention side + FFN side)."""

    model: str
    attention_bytes: int
    ffn_bytes: int

    @property
    def bytes(self) -> int:
        return self.attention_bytes + self.ffn_bytes


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    stats: EngineStats
    mode: str
    topology: str
    weights: tuple[ModelWeights, ...]
    programs_compiled: int

    @property
    def kv_pages_used(self) -> int:
        """KV pages in use over all KV devices (0 when the engine has no KV pool)."""
        return sum(used for _, used, _ in self.stats.kv_pages)


def model_weights(engine: Any, name: str) -> ModelWeights | None:
    """`name`'s weight bytes as the engine reports them; None when the engine reports none or the
    model was unloaded meanwhile. An engine with only `weights_bytes` counts them as FFN side."""
    try:
        by_side = getattr(engine, "weights_bytes_by_side", None)
        if by_side is not None:
            attn, ffn = by_side(name)
            return ModelWeights(name, int(attn), int(ffn))
        wb = getattr(engine, "weights_bytes", None)
        if wb is not None:
            return ModelWeights(name, 0, int(wb(name)))
    except LookupError:  # ModelNotFoundError is a KeyError: unloaded since stats()
        return None
    return None


def snapshot(engine: Any) -> EngineSnapshot:
    st = engine.stats()
    describe = getattr(engine, "describe", None)
    weights = tuple(w for w in (model_weights(engine, n) for n in st.models) if w is not None)
    return EngineSnapshot(
        stats=st,
        mode=str(getattr(engine, "mode", "") or ""),
        topology=str(describe()) if callable(describe) else "",
        weights=weights,
        programs_compiled=int(getattr(engine, "programs_compiled", 0) or 0),
    )
