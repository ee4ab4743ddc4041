"""CrossPool-JAX: a serving engine for many Mixture-of-Experts models over a KV pool and a weights pool.

The public API, for research code that embeds the engine (docs/engine.md has a runnable example)::

    import crosspool_jax as cp
    engine = cp.Engine(mode="crosspool", pools="4+4", config=cp.EngineConfig())
    engine.add_model("m", config, weights, tokenizer)       # or engine.load_model("m", hf_dir)
    for ev in engine.submit(cp.make_request("m", [1, 2, 3], max_new_tokens=8)):
        print(ev.token_id, ev.text, ev.finish_reason)

`Engine` is the pooled engine (`crosspool_jax.engine.PooledEngine`: modes crosspool / shared /
static); `ReferenceEngine` runs each model alone, one request at a time (the correctness
reference). Names are imported on first use, so `import crosspool_jax` stays cheap for tools that
only need a submodule (e.g. `crosspool_jax.models.config`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "Engine": ("crosspool_jax.engine", "PooledEngine"),
    "EngineConfig": ("crosspool_jax.engine", "EngineConfig"),
    "MODES": ("crosspool_jax.engine", "MODES"),
    "EXECUTIONS": ("crosspool_jax.execution.host_step", "EXECUTIONS"),
    "ReferenceEngine": ("crosspool_jax.engine_api", "ReferenceEngine"),
    "EngineInterface": ("crosspool_jax.engine_api", "EngineInterface"),
    "Request": ("crosspool_jax.engine_api", "Request"),
    "RequestHandle": ("crosspool_jax.engine_api", "RequestHandle"),
    "Event": ("crosspool_jax.engine_api", "Event"),
    "Usage": ("crosspool_jax.engine_api", "Usage"),
    "ModelInfo": ("crosspool_jax.engine_api", "ModelInfo"),
    "EngineStats": ("crosspool_jax.engine_api", "EngineStats"),
    "make_request": ("crosspool_jax.engine_api", "make_request"),
    "ModelNotFoundError": ("crosspool_jax.engine_api", "ModelNotFoundError"),
    "QueueFullError": ("crosspool_jax.engine_api", "QueueFullError"),
    "EngineClosedError": ("crosspool_jax.engine_api", "EngineClosedError"),
    "SamplingParams": ("crosspool_jax.execution.sampling", "SamplingParams"),
    "ModelConfig": ("crosspool_jax.models.config", "ModelConfig"),
    "Family": ("crosspool_jax.models.config", "Family"),
    "load_hf_config": ("crosspool_jax.models.config", "load_hf_config"),
    "ModelWeights": ("crosspool_jax.models.params", "ModelWeights"),
    "init_random_weights": ("crosspool_jax.models.params", "init_random_weights"),
    "demo_models": ("crosspool_jax.demo", "demo_models"),
    "CrossPoolError": ("crosspool_jax.errors", "CrossPoolError"),
    "CapacityError": ("crosspool_jax.errors", "CapacityError"),
    "InvalidRequestError": ("crosspool_jax.errors", "InvalidRequestError"),
    "ModelState": ("crosspool_jax.memory.model_states", "ModelState"),
    "ModelStateInfo": ("crosspool_jax.memory.model_states", "ModelStateInfo"),
}

__all__ = [  # the keys of _EXPORTS (a literal, so linters see the re-exports)
    "EXECUTIONS",
    "MODES",
    "CapacityError",
    "CrossPoolError",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineInterface",
    "EngineStats",
    "Event",
    "Family",
    "InvalidRequestError",
    "ModelConfig",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelState",
    "ModelStateInfo",
    "ModelWeights",
    "QueueFullError",
    "ReferenceEngine",
    "Request",
    "RequestHandle",
    "SamplingParams",
    "Usage",
    "demo_models",
    "init_random_weights",
    "load_hf_config",
    "make_request",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'crosspool_jax' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from crosspool_jax.demo import demo_models
    from crosspool_jax.engine import MODES, EngineConfig
    from crosspool_jax.engine import PooledEngine as Engine
    from crosspool_jax.engine_api import (
        EngineClosedError,
        EngineInterface,
        EngineStats,
        Event,
        ModelInfo,
        ModelNotFoundError,
        QueueFullError,
        ReferenceEngine,
        Request,
        RequestHandle,
        Usage,
        make_request,
    )
    from crosspool_jax.errors import CapacityError, CrossPoolError, InvalidRequestError
    from crosspool_jax.execution.host_step import EXECUTIONS
    from crosspool_jax.memory.model_states import ModelState, ModelStateInfo
    from crosspool_jax.models.config import Family, ModelConfig, load_hf_config
    from crosspool_jax.models.params import ModelWeights, init_random_weights
