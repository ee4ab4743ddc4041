"""The KV planner's policy knobs: per-model page limits and `PlannerConfig` (plain data, no JAX).

The policy these knobs steer is described in `crosspool_jax.memory.planner` and docs/planner.md.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping

from crosspool_jax.memory.kv_virtualizer import ModelId


class PreemptionChoice(enum.StrEnum):
    """How the planner picks swap or recompute for a preempted request."""

    AUTO = "auto"  # the cheaper by the cost model, swap only if host slots allow
    PREFER_SWAP = "prefer_swap"  # swap whenever host slots allow, else recompute
    ALWAYS_RECOMPUTE = "always_recompute"  # never use host memory


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """Per-model page limits (device pages, all layers).

    floor_pages: reserved for the model while it has live requests (0: none).
    cap_pages: most device pages the model may hold at once (None: no cap).
    """

    floor_pages: int = 0
    cap_pages: int | None = None

    def __post_init__(self) -> None:
        if self.floor_pages < 0:
            raise ValueError(f"ModelLimits.floor_pages must be >= 0, got {self.floor_pages}")
        if self.cap_pages is not None and self.cap_pages < self.floor_pages:
            raise ValueError(f"ModelLimits.cap_pages {self.cap_pages} < floor_pages {self.floor_pages}")


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    """Planner policy knobs.

    admission_headroom_tokens: decode tokens beyond the prefill a request must fit to be admitted.
    preemption: swap/recompute choice (see PreemptionChoice).
    host_link_bytes_per_s: host<->device copy bandwidth for the swap cost (bytes/s; placeholder
        until the engine measures it).
    prefill_tokens_per_s: re-prefill throughput for the recompute cost (tokens/s; placeholder),
        overridable per model in `model_prefill_tokens_per_s`.
    allow_split_kv: let a request span several KV devices when one device cannot hold it.
    model_limits: floors and caps per model (models not named: no floor, no cap).
    admission_backfill: when a model's first waiting request does not fit the pool, a later one
        of that model that fits may start (beside the pages held for a starving request).
    starving_after_steps: admission rounds (steps) a waiting request may fail to fit the pool
        before its pages are held back from other admissions (`crosspool_jax.memory.planner`'s
        docstring); None: never. A request held back by its model's cap or by the prefill budget is
        not counted.
    """

    admission_headroom_tokens: int = 0
    preemption: PreemptionChoice = PreemptionChoice.AUTO
    host_link_bytes_per_s: float = 25e9
    prefill_tokens_per_s: float = 10_000.0
    model_prefill_tokens_per_s: Mapping[ModelId, float] = dataclasses.field(default_factory=dict)
    allow_split_kv: bool = True
    model_limits: Mapping[ModelId, ModelLimits] = dataclasses.field(default_factory=dict)
    admission_backfill: bool = True
    starving_after_steps: int | None = 20

    def __post_init__(self) -> None:
        if self.admission_headroom_tokens < 0:
            raise ValueError(f"admission_headroom_tokens must be >= 0, got {self.admission_headroom_tokens}")
        if self.host_link_bytes_per_s <= 0 or self.prefill_tokens_per_s <= 0:
            raise ValueError("host_link_bytes_per_s and prefill_tokens_per_s must be > 0")
        if any(v <= 0 for v in self.model_prefill_tokens_per_s.values()):
            raise ValueError("model_prefill_tokens_per_s values must be > 0")
        if self.starving_after_steps is not None and self.starving_after_steps < 1:
            raise ValueError(f"starving_after_steps must be >= 1 or None, got {self.starving_after_steps}")

    def limits(self, model: ModelId) -> ModelLimits:
        return self.model_limits.get(model, _NO_LIMITS)


_NO_LIMITS = ModelLimits()


def check_floors_fit(config: PlannerConfig, total_pages: int) -> None:
    """Raises ValueError if `config`'s floors add up to more than the pool's `total_pages` pages."""
    total_floor = sum(lim.floor_pages for lim in config.model_limits.values())
    if total_floor > total_pages:
        raise ValueError(f"floors add up to {total_floor} pages, more than the pool's {total_pages}")


def reserved_for_others(
    config: PlannerConfig, model: ModelId, live_per_model: Mapping[ModelId, int],
    held_pages: Callable[[ModelId], int],
) -> int:
    """Pages `model` may not use: the unused floor pages of the other models with live requests.

    live_per_model: live requests per model. held_pages: the pages a model holds (plus any promised
    to it, for an admission forecast)."""
    total = 0
    for other, live in live_per_model.items():
        if other == model or not live:
            continue
        total += max(0, config.limits(other).floor_pages - held_pages(other))
    return total
