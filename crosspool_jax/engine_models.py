"""Models of `PooledEngine`: placing a model into the least loaded device group that fits it
(from weights in memory, a checkpoint, random weights, or registered on disk), its gate
programs, the grid's precompile, mode static's KV reservations and unloading.

`EngineModels` is a mixin of `PooledEngine`; it uses the engine's `_lock` (books), `_gws` (the
group workers, `engine._GroupWorker`), `groups`, `mode`, `config`, `max_live_requests`,
`_model_group` (model -> its group's worker), `_model_bytes` (arena bytes of each model's
weights: group balancing), `_unloading`, `_states`, `_checkpoints`, `_waiting`, `_host`,
`_transition`, `_programs_compiled`, `_sleep_lru` (`engine_sleep.SleepingModels`) and the
bookkeeping of `engine_api.EngineCore` (`_begin_add`, `_end_add`, `_abort_add`,
`_check_free_name`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.engine_api import ModelInfo, ModelNotFoundError, ModelRecord
from crosspool_jax.errors import CapacityError, InvalidRequestError
from crosspool_jax.execution.pool_runner import GroupRunner
from crosspool_jax.memory.arena import placed_weight_bytes
from crosspool_jax.memory.model_states import ModelState
from crosspool_jax.memory.planner import ModelLimits
from crosspool_jax.memory.topology import Role
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.params import ModelWeights

if TYPE_CHECKING:  # the engine's group worker
    from crosspool_jax.engine import _GroupWorker


class EngineModels:
    """Placing, loading and unloading models (module docstring); a base class of `PooledEngine`,
    not used alone."""

    def add_model(self, name: str, config: ModelConfig, weights: ModelWeights, tokenizer: Any = None,
                  source: str = "") -> ModelInfo:
        """Places a model (cast to the arena dtype) into its group; refused (CapacityError) if it
        does not fit, with nothing already placed disturbed. The engine keeps no copy of `weights`:
        once placed, the arena is the only one."""
        self._check_eos(name, config)
        config, info = self._begin_add(name, config, source)
        try:
            cast = self._arena_cast(weights)
            gw = self._place(name, config, lambda g, lock: g.add_model(name, config, cast, guard=lock))
        except BaseException:
            self._abort_add(name)
            raise
        return self._register(gw, ModelRecord(info, config, tokenizer))

    def _arena_cast(self, weights: ModelWeights) -> ModelWeights:
        """`weights` in the arena dtype (router biases stay f32: stored bit for bit)."""
        dtype = jnp.dtype(self.groups[0].store.layout.dtype)

        def cast(path: Any, a: Any) -> Any:
            if str(getattr(path[-1], "key", "")) == "router_bias":
                return a
            return a.astype(dtype, copy=False) if isinstance(a, np.ndarray) else a.astype(dtype)

        return jax.tree_util.tree_map_with_path(cast, weights)

    def _check_eos(self, name: str, config: ModelConfig) -> None:
        """A model's eos ids are the default stop ids of its requests: at most `max_stop_ids`."""
        n, limit = len(config.eos_token_ids), self.config.max_stop_ids
        if n > limit:
            raise InvalidRequestError(f"model {name!r} has {n} eos token ids; the step programs take at "
                                      f"most {limit} stop ids per request (max_stop_ids)")

    def load_model(self, name: str, path: str, on_disk: bool = False) -> ModelInfo:
        """Loads an HF directory or crosspool checkpoint into host memory (never onto one
        accelerator), then places each device's piece into the arenas (`add_model`). The path is
        kept: asleep, the model may be dropped to disk (`host_weights_bytes`) and re-read from it.
        `on_disk`: registers the model without reading its weights (its config and tokenizer are
        read, its state is on_disk): its first request (or `wake`) loads it."""
        with self._lock:
            self._check_free_name(name)
        if on_disk:
            return self._register_on_disk(name, str(path))
        m = self._read_checkpoint(str(path))
        info = self.add_model(name, m.config, m.weights, m.tokenizer, source=str(path))
        with self._lock:
            if name in self._states:
                self._checkpoints[name] = str(path)
        return info

    @staticmethod
    def _read_checkpoint(path: str) -> Any:
        """`checkpoints.load_model` into this process's host memory as numpy arrays (no copy into
        a CPU device's buffers: `add_model` slices each device's piece from them)."""
        from checkpoints import load_model  # local import: checkpoints pulls in orbax

        return load_model(path, numpy=True)

    def _register_on_disk(self, name: str, path: str) -> ModelInfo:
        """`load_model(on_disk=True)`: registers `name` in state on_disk with the least loaded group
        (weight bytes; it wakes into that group) and its checkpoint's config and tokenizer."""
        from checkpoints import load_tokenizer, read_config

        config = read_config(path)
        self._check_eos(name, config)
        config, info = self._begin_add(name, config, path)
        try:
            tokenizer = load_tokenizer(path)
        except BaseException:
            self._abort_add(name)
            raise
        nbytes = estimated_weight_bytes(config, self.groups[0].store.layout.dtype)
        with self._lock:
            load = [sum(b for n, b in self._model_bytes.items() if self._model_group[n] is gw)
                    for gw in self._gws]
            gw = self._gws[placement_order(load)[0]]
            self._model_group[name] = gw
            self._model_bytes[name] = nbytes
            self._checkpoints[name] = path
            self._states.add(name, ModelState.ON_DISK)
        return self._end_add(ModelRecord(info, config, tokenizer))

    def add_random_model(self, name: str, config: ModelConfig, seed: int = 0, tokenizer: Any = None
                         ) -> ModelInfo:
        """A model with random weights generated on its devices (benchmarks at real sizes: no host
        copy of the weights is ever built)."""
        self._check_eos(name, config)
        config, info = self._begin_add(name, config, f"random(seed={seed})")
        try:
            gw = self._place(name, config, lambda g, lock: g.add_random_model(name, config, seed, guard=lock))
        except BaseException:
            self._abort_add(name)
            raise
        return self._register(gw, ModelRecord(info, config, tokenizer))

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Waits until the gate programs of every placed model (its first programs, queued for the
        background compiler at load: docs/engine.md "Compiles off the serving path") are
        compiled, so a first request of any model compiles nothing on the serving path; True if
        they were within `timeout` seconds. `crosspool bench` starts a replay after it (the
        wait is its `ready_s`)."""
        import concurrent.futures

        futs = []
        for gw in self._gws:
            with gw.lock:
                futs += gw.group.gate_compiles()
        _, pending = concurrent.futures.wait(futs, timeout=timeout)
        return not pending

    def _place(self, name: str, config: ModelConfig,
               place: Callable[[GroupRunner, threading.Lock], None]) -> _GroupWorker:
        """Places a model into the least loaded group (weight bytes) it fits. `place` takes the
        group's lock as the guard of its arena updates (`GroupRunner.add_model`): the group's steps
        wait only for those dispatches, not for the copy; the other groups' never wait. When it
        fits no group, the least recently used idle resident model is put to sleep and the
        placement tried again."""
        while True:
            try:
                return self._place_once(name, config, place)
            except CapacityError:
                if not self._sleep_lru(exclude=frozenset({name})):
                    raise

    def _place_once(self, name: str, config: ModelConfig,
                    place: Callable[[GroupRunner, threading.Lock], None]) -> _GroupWorker:
        self._wait_unloaded(name)
        with self._lock:
            load = {id(gw): sum(b for n, b in self._model_bytes.items() if self._model_group[n] is gw)
                    for gw in self._gws}
        order = [self._gws[i] for i in placement_order([load[id(gw)] for gw in self._gws])]
        for gw in order:
            try:
                place(gw.group, gw.lock)
            except CapacityError:
                if len(order) == 1:
                    raise
                continue
            self._refresh_static_limits(gw)
            return gw
        raise CapacityError(f"model {config.family} does not fit any device of mode {self.mode}")

    def _register(self, gw: _GroupWorker, record: ModelRecord) -> ModelInfo:
        name = record.info.name
        nbytes = placed_weight_bytes(gw.group.store, name)
        with self._lock:
            self._model_group[name] = gw
            self._model_bytes[name] = nbytes
            self._states.add(name)
        return self._end_add(record)

    def _wait_unloaded(self, name: str) -> None:
        """Waits until an unload of `name` has freed its group's copy (at most that group's step)."""
        with self._lock:
            entry = self._unloading.get(name)
        if entry is not None:
            gw, done = entry
            while not done.wait(0.05) and gw.thread.is_alive() and not gw.stopping:
                pass

    def _unloaded(self, name: str) -> None:
        with self._lock:
            entry = self._unloading.pop(name, None)
        if entry is not None:
            entry[1].set()

    def precompile(self, max_context: int, max_slots: int | None = None, threads: int = 8,
                   log: Callable[[str], None] | None = None) -> int:
        """Compiles every one-lane step program of each group's shape-bucket grid ahead of time
        (`GroupRunner.bucket_specs` / `precompile`: requests up to `max_context` tokens, up to
        `max_slots` (default `max_live_requests`) per KV device), so requests inside it never wait
        for a compile; programs that mix model classes still compile when first met. Groups of
        identical devices and models compile the same programs: with JAX's persistent compilation
        cache on, every group after the first loads them. Returns the programs compiled."""
        slots = max_slots or self.max_live_requests
        total = 0
        for gw in self._gws:
            with gw.lock:
                t0 = time.perf_counter()
                group = gw.group
                n = group.precompile(group.bucket_specs(max_context, slots), threads=threads, log=log)
            total += n
            with self._lock:
                self._programs_compiled += n
            if log is not None:
                log(f"group {gw.index}: {n} step programs precompiled in {time.perf_counter() - t0:.1f} s")
        return total

    def _refresh_static_limits(self, gw: _GroupWorker) -> None:
        """Mode static: `_set_static_limits` of `gw`'s group under its lock, after its set of models
        changed (a placement, a sleep, a wake); other modes: nothing."""
        if self.mode == "static":
            with gw.lock:
                self._set_static_limits(gw.group)

    def _set_static_limits(self, group: GroupRunner) -> None:
        """Mode static: every model of the group gets an equal share of its KV pages as floor and cap
        (also while requests run: `GroupRunner.set_limits` says what happens to them)."""
        group.set_limits(static_limits(list(group.geoms), group.kv.config.total_pages))

    def _on_unload(self, name: str) -> None:
        with self._transition:  # not while it is being put to sleep or woken
            self._unload_now(name)

    def _unload_now(self, name: str) -> None:
        with self._lock:
            gw = self._model_group.pop(name, None)
            self._model_bytes.pop(name, None)
            self._states.remove(name)
            self._waiting.pop(name, None)  # their final events are sent (unload_model)
            self._host.pop(name, None)
            self._checkpoints.pop(name, None)
            # under `_transition`: a sleep or wake has either placed the model or not
            in_arena = gw is not None and name in gw.group.store.models
            if in_arena:
                self._unloading[name] = (gw, threading.Event())
        if in_arena:
            # its requests' pages are free now (as a cancel's); the worker removes the weights
            gw.group.fail_model(name, "model unloaded")
            gw.inbox.put(("unload", name))

    def weights_bytes(self, name: str) -> int:
        return sum(self.weights_bytes_by_side(name))

    def weights_bytes_by_side(self, name: str) -> tuple[int, int]:
        """Arena bytes of a model's weights over all its devices: (attention side, on the KV
        devices or the colocated device; FFN side, on the weights devices or the colocated device)."""
        with self._lock:
            gw = self._model_group.get(name)
        ma = None if gw is None else gw.group.store.models.get(name)
        if ma is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        st = gw.group.store
        rb = st.row_bytes()
        return ma.rows(Role.KV) * st.num_kv * rb, ma.rows(Role.WEIGHTS) * st.num_weights * rb


def placement_order(loads: list[int]) -> list[int]:
    """Groups in the order a new model tries them: least loaded (weight bytes placed) first, ties
    in group order."""
    return sorted(range(len(loads)), key=lambda i: loads[i])


def static_limits(models: list[str], total_pages: int) -> dict[str, ModelLimits]:
    """Mode static's KV reservations in one group: each model an equal share of the group's KV
    pages (`total_pages`) as floor and cap."""
    share = total_pages // max(1, len(models))
    return {n: ModelLimits(floor_pages=share, cap_pages=share) for n in models}


def estimated_weight_bytes(config: ModelConfig, dtype: str) -> int:
    """Bytes of a model's weights in the arena dtype (router biases f32), before it is placed: the
    group balancing weight of a model registered on disk."""
    from crosspool_jax.models.params import weight_specs

    item = jnp.dtype(dtype).itemsize
    return sum(int(np.prod(x.shape)) * (4 if x.dtype == jnp.float32 else item)
               for x in jax.tree.leaves(weight_specs(config)))
