"""Which models are resident in the arena, which sleep in host memory and which are on disk
(issue 20).

Plain host bookkeeping, no JAX: the engine asks it which resident model to put to sleep when a
model being added or woken does not fit (the least recently used one with no live request), which
sleeping model to drop to disk when host memory is over its budget (the least recently used one
the caller can re-read), and which resident models have been idle longer than `idle_sleep_s`.
Times are seconds of `time.monotonic()` unless the caller passes its own clock.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable


class ModelState(enum.Enum):
    """RESIDENT: weights in the arena, requests run. SLEEPING: weights in host memory (pinned on
    GPUs), no arena rows, no KV registration; a request wakes it. ON_DISK: no copy of its weights
    in memory at all; a request re-reads its checkpoint. WAKING: being copied back (or read)."""

    RESIDENT = "resident"
    SLEEPING = "sleeping"
    ON_DISK = "on_disk"
    WAKING = "waking"


@dataclasses.dataclass(frozen=True)
class ModelStateInfo:
    """One model's state as GetStats shows it. idle_s: seconds since its last request ended or
    started (0 while it has live requests); sleeps / wakes: transitions since it was added."""

    name: str
    state: ModelState
    live_requests: int
    idle_s: float
    sleeps: int
    wakes: int


@dataclasses.dataclass
class _Entry:
    state: ModelState
    last_used: float
    live: int = 0
    sleeps: int = 0
    wakes: int = 0


class ModelStates:
    """State, live-request count and last use of every registered model. Not thread-safe: the
    engine calls it under its own lock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._e: dict[str, _Entry] = {}

    def add(self, name: str, state: ModelState = ModelState.RESIDENT) -> None:
        """A model registered (placed in the arena, or `ON_DISK`: not read yet), just used."""
        self._e[name] = _Entry(state, self._clock())

    def remove(self, name: str) -> None:
        self._e.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self._e

    def state(self, name: str) -> ModelState:
        return self._e[name].state

    def set_state(self, name: str, state: ModelState) -> None:
        e = self._e[name]
        if state == ModelState.SLEEPING and e.state == ModelState.RESIDENT:
            e.sleeps += 1
        if state == ModelState.RESIDENT and e.state == ModelState.WAKING:
            e.wakes += 1
        e.state = state
        e.last_used = self._clock()

    def live(self, name: str) -> int:
        return self._e[name].live

    def request_started(self, name: str) -> None:
        e = self._e[name]
        e.live += 1
        e.last_used = self._clock()

    def request_ended(self, name: str) -> None:
        e = self._e.get(name)
        if e is not None:
            e.live = max(0, e.live - 1)
            e.last_used = self._clock()

    def lru_idle(self, exclude: frozenset[str] = frozenset()) -> str | None:
        """The resident model with no live request used longest ago (None if there is none)."""
        idle = [(e.last_used, n) for n, e in self._e.items()
                if e.state == ModelState.RESIDENT and e.live == 0 and n not in exclude]
        return min(idle)[1] if idle else None

    def lru_sleeping(self, among: frozenset[str] | set[str]) -> str | None:
        """The sleeping model of `among` used longest ago (None if there is none): the one to drop
        from host memory to disk first."""
        asleep = [(e.last_used, n) for n, e in self._e.items()
                  if e.state == ModelState.SLEEPING and n in among]
        return min(asleep)[1] if asleep else None

    def idle_longer_than(self, seconds: float) -> list[str]:
        """Resident models with no live request, unused for more than `seconds`, oldest first."""
        now = self._clock()
        idle = sorted((e.last_used, n) for n, e in self._e.items()
                      if e.state == ModelState.RESIDENT and e.live == 0 and now - e.last_used > seconds)
        return [n for _, n in idle]

    def snapshot(self) -> tuple[ModelStateInfo, ...]:
        now = self._clock()
        return tuple(ModelStateInfo(n, e.state, e.live, 0.0 if e.live else max(0.0, now - e.last_used),
                                    e.sleeps, e.wakes) for n, e in sorted(self._e.items()))


__all__ = ["ModelState", "ModelStateInfo", "ModelStates"]
