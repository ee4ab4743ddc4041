"""Sleeping models (docs/engine.md "Sleeping models"): the part of `PooledEngine` that puts
models to sleep (weights to host memory, arena rows and KV registration freed), drops sleeping
models loaded from a checkpoint to disk when host memory is over its budget, wakes them (on
request, explicitly, or to make room: from host memory, or by re-reading the checkpoint) and
sleeps idle ones.

`SleepingModels` is a mixin of `PooledEngine`; it uses the engine's `_lock` (books), `_transition`
(one sleep or wake placement at a time), `_states` (`ModelStates`), `_host` (host copies of
sleeping models), `_checkpoints` (model -> checkpoint path), `_host_budget` (bytes),
`_waiting` (requests waiting for a wake), `_model_group` (model -> its group's worker),
`_model_bytes`, `_disk_reads` (one checkpoint read at a time: bounds the host memory of wakes
from disk), `_wakes` (model -> event set when its wake ends), `_model`, `_finish`, `_arena_cast`,
`_read_checkpoint`, `_refresh_static_limits` and `_closed`; it appends to the engine's `wake_log`.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import TYPE_CHECKING, Any

from crosspool_jax.engine_api import FINISH_ERROR, ModelNotFoundError
from crosspool_jax.errors import CapacityError, InvalidRequestError
from crosspool_jax.memory.arena import placed_weight_bytes
from crosspool_jax.memory.model_states import ModelState, ModelStateInfo

if TYPE_CHECKING:  # attributes the engine provides

    from crosspool_jax.memory.arena import HostModel
    from crosspool_jax.memory.model_states import ModelStates


@dataclasses.dataclass(frozen=True)
class WakeRecord:
    """One finished wake: from "host" memory or "disk" (its checkpoint re-read); read_s: seconds
    reading the checkpoint into host memory (0 from host); place_s: seconds from then until it was
    placed, waits for room included; nbytes: arena bytes of its weights."""

    model: str
    source: str
    read_s: float
    place_s: float
    nbytes: int


class SleepingModels:
    """`sleep` / `wake` / `model_states` and the wake-on-request and idle-sleep machinery."""

    _lock: threading.Lock
    _transition: threading.Lock
    _states: ModelStates
    _host: dict[str, HostModel]
    _checkpoints: dict[str, str]
    _host_budget: int
    _model_bytes: dict[str, int]
    _disk_reads: threading.Semaphore
    _wakes: dict[str, threading.Event]
    _waiting: dict[str, list[Any]]
    wake_log: collections.deque[WakeRecord]  # the last wakes, oldest first
    _model_group: dict[str, Any]
    _closed: bool

    def sleep(self, name: str, to_disk: bool = False) -> None:
        """Puts a resident model to sleep: its weights are copied to host memory (pinned on GPUs,
        numpy on CPU), its arena rows and its KV registration are freed (its KV pages are free
        already: it has no request). Refused (InvalidRequestError) while it has live requests;
        a no-op when it sleeps already. Its next request wakes it (`wake`). `to_disk`: then drops
        the host copy too (state on_disk; the next request re-reads its checkpoint); refused for a
        model added from memory (nothing to re-read)."""
        with self._transition:
            with self._lock:
                if name not in self._states:
                    raise ModelNotFoundError(f"model {name!r} is not loaded")
                state, live = self._states.state(name), self._states.live(name)
                if to_disk and name not in self._checkpoints:
                    raise InvalidRequestError(f"model {name!r} was not loaded from a checkpoint: it "
                                              "can sleep in host memory only (to_disk refused)")
            if state == ModelState.ON_DISK or (state == ModelState.SLEEPING and not to_disk):
                return
            if live:
                raise InvalidRequestError(f"model {name!r} has {live} live requests; sleep is refused "
                                          "until they end (cancel them or wait)")
            if state == ModelState.RESIDENT and not self._sleep_now(name):
                raise InvalidRequestError(f"model {name!r} is still ending a request; retry")
            if to_disk:
                with self._lock:
                    if self._states.state(name) == ModelState.SLEEPING:
                        self._to_disk(name)

    def wake(self, name: str) -> None:
        """Places a sleeping model back into the arena (no-op when resident), putting the least
        recently used idle resident models to sleep while it does not fit. From host memory it
        compiles nothing; a model on disk is read from its checkpoint first (and placed as
        `load_model` places it)."""
        with self._lock:
            if name not in self._states:
                raise ModelNotFoundError(f"model {name!r} is not loaded")
            state = self._states.state(name)
            if state in (ModelState.SLEEPING, ModelState.ON_DISK):
                self._start_waking(name)
                under_way = None
            else:
                under_way = self._wakes.get(name)  # set while a request's wake is under way
        if under_way is not None:
            under_way.wait()
        elif state in (ModelState.SLEEPING, ModelState.ON_DISK):
            self._wake_and_admit(name, raise_errors=True)

    def model_states(self) -> tuple[ModelStateInfo, ...]:
        """Each registered model's state (resident / sleeping / on_disk / waking), live requests,
        idle time."""
        with self._lock:
            return self._states.snapshot()

    def _sleep_now(self, name: str) -> bool:
        """Sleeps `name` if it is resident with no live request (call under `_transition`)."""
        with self._lock:
            gw = self._model_group.get(name)
            if (gw is None or self._states.state(name) != ModelState.RESIDENT
                    or self._states.live(name)):
                return False
            self._states.set_state(name, ModelState.SLEEPING)  # new requests wait for a wake
        try:
            host = gw.group.sleep_model(name, guard=gw.lock)
            self._refresh_static_limits(gw)
        except RuntimeError:  # the group still ends one of its requests: stays resident
            with self._lock:
                self._states.set_state(name, ModelState.RESIDENT)
            return False
        with self._lock:
            self._host[name] = host
        self._drop_to_disk()
        return True

    def _to_disk(self, name: str) -> None:
        """Drops a sleeping model's host copy (call under `_lock`; it has a checkpoint)."""
        self._host.pop(name, None)
        self._states.set_state(name, ModelState.ON_DISK)

    def _drop_to_disk(self) -> None:
        """While sleeping models hold more host memory than `_host_budget`, drops the least
        recently used one that has a checkpoint to re-read to disk."""
        with self._lock:
            held = sum(h.nbytes for h in self._host.values())
            while held > self._host_budget:
                victim = self._states.lru_sleeping(self._checkpoints.keys() & self._host.keys())
                if victim is None:
                    return
                held -= self._host[victim].nbytes
                self._to_disk(victim)

    def _sleep_lru(self, exclude: frozenset[str]) -> bool:
        """Puts the least recently used idle resident model to sleep; False if there is none."""
        with self._transition:
            tried: set[str] = set(exclude)
            while True:
                with self._lock:
                    victim = self._states.lru_idle(frozenset(tried))
                if victim is None:
                    return False
                if self._sleep_now(victim):
                    return True
                tried.add(victim)

    def _start_waking(self, name: str) -> None:
        """Marks `name` WAKING, with the event `wake` callers wait on (call under `_lock`)."""
        self._states.set_state(name, ModelState.WAKING)
        self._wakes[name] = threading.Event()

    def _wake_and_admit(self, name: str, raise_errors: bool = False) -> None:
        """Wakes `name` (state WAKING), then admits the requests that waited for it; if the wake
        fails they end with an error and the model stays asleep. Either way its event is set."""
        try:
            self._wake_and_admit_once(name, raise_errors)
        finally:
            with self._lock:
                done = self._wakes.pop(name, None)
            if done is not None:
                done.set()

    def _wake_and_admit_once(self, name: str, raise_errors: bool) -> None:
        try:
            self._wake_now(name)
        except Exception as e:
            with self._lock:
                waiting = self._waiting.pop(name, [])
                if name in self._states:
                    self._states.set_state(name, ModelState.SLEEPING if name in self._host
                                           else ModelState.ON_DISK)
            for lv in waiting:
                self._finish(lv, FINISH_ERROR, error=f"waking model {name!r} failed: {e}")
            if raise_errors:
                raise
            return
        with self._lock:
            waiting = self._waiting.pop(name, [])
            gw = self._model_group.get(name)
            if name in self._states:
                self._states.set_state(name, ModelState.RESIDENT)
        for lv in waiting:
            if gw is not None:
                gw.inbox.put(("admit", lv))

    def _wake_now(self, name: str) -> None:
        """Copies a sleeping model's weights back into its group (`GroupRunner.wake_model`: chunk by
        chunk, the group's lock held only around each chunk's write, so the group's other models
        step meanwhile), or, on disk, reads its checkpoint (outside `_transition`: other sleeps and
        wakes go on) and places it (`GroupRunner.add_model`); sleeps the group's LRU idle models
        while it does not fit; while every other resident model of the group has live requests it
        waits for one to go idle."""
        with self._lock:
            host, path = self._host.get(name), self._checkpoints.get(name)
        weights, t0 = None, time.perf_counter()
        if host is None and path is not None:
            with self._disk_reads:  # one checkpoint in host memory at a time
                t0 = time.perf_counter()
                weights = self._arena_cast(self._read_checkpoint(path).weights)
        read_s, t1 = time.perf_counter() - t0, time.perf_counter()
        while True:
            with self._transition:
                with self._lock:
                    gw = self._model_group.get(name)
                    host = self._host.get(name)
                if gw is None or (host is None and weights is None):
                    raise ModelNotFoundError(f"model {name!r} is not loaded")
                record = self._model(name)
                try:
                    if host is not None:
                        gw.group.wake_model(name, record.config, host, guard=gw.lock)
                    else:
                        gw.group.add_model(name, record.config, weights, guard=gw.lock)
                except CapacityError:
                    pass
                else:
                    nbytes = placed_weight_bytes(gw.group.store, name)
                    with self._lock:
                        self._host.pop(name, None)
                        self._model_bytes[name] = nbytes
                        self.wake_log.append(WakeRecord(name, "host" if weights is None else "disk",
                                                        read_s if weights is not None else 0.0,
                                                        time.perf_counter() - t1, nbytes))
                    self._refresh_static_limits(gw)
                    return
            with self._lock:  # it wakes into its own group: only that group's models make room
                others = frozenset(n for n, g in self._model_group.items() if g is not gw)
            if self._sleep_lru(exclude=others | {name}):
                continue
            # what holds the group's rows now: models with live requests, or one just placed by
            # another wake (still "waking" until its requests are admitted); wait until one is idle
            with gw.lock:
                busy = any(n != name for n in gw.group.store.models)
            if not busy or self._closed:
                raise CapacityError(f"model {name!r} does not fit the arena even with every other "
                                    "model asleep")
            time.sleep(0.005)

    def _idle_sleeper(self, idle_s: float) -> None:
        """Puts models idle for more than `idle_s` seconds to sleep until the engine closes."""
        period = min(1.0, max(0.01, idle_s / 4))
        while not self._closed:
            time.sleep(period)
            with self._lock:
                idle = self._states.idle_longer_than(idle_s)
            for name in idle:
                with self._transition:
                    self._sleep_now(name)
