"""The models half of `GroupRunner` (a base class): placing a model's weights in the group's arena
and registering it, sleeping it to host memory and waking it back, removing it, and the page limits
per model. The attributes it reads are the runner's (`store`, `kv`, `planner`, `geoms`, `reqs`,
`platform`, `_state_lock`, `_planner_config`) and `warm_up` is `StepPrograms`'."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from crosspool_jax.execution.pooled_step import model_geometry
from crosspool_jax.memory.arena import NO_GUARD, HostModel
from crosspool_jax.memory.kv_virtualizer import KVGeometry
from crosspool_jax.memory.planner import ModelLimits
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.params import ModelWeights


class RunnerModels:
    """Model placement and removal for `GroupRunner` (module docstring)."""

    def add_model(self, name: str, cfg: ModelConfig, weights: ModelWeights,
                  guard: contextlib.AbstractContextManager = NO_GUARD) -> None:
        """Places a model's weights (`ArenaStore.write_model`) and registers it with the store, the
        KV planner and the background compiler at one moment. `guard`: the lock the stepping
        thread holds around its steps; held only around the arena updates and the registration,
        so the weights' encoding, host-to-device copy and writer compiles do not pause the steps."""
        geom = model_geometry(cfg, self.store.layout, self.platform)
        ma = self.store.write_model(name, cfg, weights, guard)
        self._register_model(name, cfg, geom, ma, guard)

    def add_random_model(self, name: str, cfg: ModelConfig, seed: int = 0,
                         guard: contextlib.AbstractContextManager = NO_GUARD) -> None:
        """A model with random weights generated on the devices (benchmarks at real sizes)."""
        geom = model_geometry(cfg, self.store.layout, self.platform)
        ma = self.store.write_model_random(name, cfg, seed, guard=guard)
        self._register_model(name, cfg, geom, ma, guard)

    def _register_model(self, name: str, cfg: ModelConfig, geom: Any, ma: Any,
                        guard: contextlib.AbstractContextManager, warm: bool = True) -> None:
        """Registers a placed model with the store, the KV planner and (`warm`: queues its lane's
        warm programs) the background compiler, under `guard`."""
        with guard, self._state_lock:
            self.store.models[name] = ma
            self.kv.register_model(name, KVGeometry(cfg.num_layers, geom.bytes_per_token_used,
                                                    tokens_per_page_override=geom.tokens_per_page))
            self.geoms[name] = geom
        if warm:
            with guard:
                self.warm_up(name)

    def sleep_model(self, name: str, guard: contextlib.AbstractContextManager = NO_GUARD) -> HostModel:
        """Copies a model with no live request to host memory (`ArenaStore.copy_out`) and frees its
        arena rows and its KV registration (its pages are free already: no request holds any). Its
        class's programs stay compiled. `guard` (the stepping thread's lock) is held around the
        reads' dispatch and the release, not during the copy. RuntimeError while it has live
        requests (nothing changed)."""
        with guard, self._state_lock:
            self._check_no_live(name)
        host = self.store.copy_out(name, guard)
        with guard, self._state_lock:
            self.store.remove_model(name)
            self.kv.unregister_model(name)
            del self.geoms[name]
        return host

    def wake_model(self, name: str, cfg: ModelConfig, host: HostModel,
                   guard: contextlib.AbstractContextManager = NO_GUARD) -> None:
        """Places a model slept by `sleep_model` back (`ArenaStore.copy_in`: `guard` held around the
        allocation and each chunk's write, not the copies) and registers it; compiles nothing (its
        class's programs and the chunk writers are compiled already). CapacityError (nothing
        changed) when its rows do not fit."""
        geom = model_geometry(cfg, self.store.layout, self.platform)
        ma = self.store.copy_in(name, host, guard)
        self._register_model(name, cfg, geom, ma, guard, warm=False)

    def remove_model(self, name: str) -> None:
        with self._state_lock:
            self._check_no_live(name)
            self.store.remove_model(name)
            self.kv.unregister_model(name)
            del self.geoms[name]

    def _check_no_live(self, name: str) -> None:
        """RuntimeError if `name` has live requests (before its weights leave the arena)."""
        live = [r for r in self.reqs.values() if r.model == name and not r.done]
        if live:
            raise RuntimeError(f"model {name!r} has {len(live)} live requests; end them first")

    def set_limits(self, limits: dict[str, ModelLimits]) -> None:
        """Per-model page floors/caps (the `static` mode's fixed reservations). May change while
        requests run (a model added or removed next to live requests): nothing is preempted, a
        request live at the change keeps the larger of its old and new cap, later ones are held to
        the new cap (`KVPlanner.set_model_limits`). The planner keeps its requests and measured costs."""
        with self._state_lock:
            self.planner.set_model_limits(limits)
        self._planner_config = dataclasses.replace(self._planner_config, model_limits=dict(limits))
