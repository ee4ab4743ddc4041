"""When each dispatched program call's device work ended, seen from a watcher thread.

The stepping thread reads a call's tokens a step late (overlap) or after other calls, so the moment
its read returns says little about when the device finished; a call already done when read has no
measurable end at all. `CallClock` waits on every call's outputs in dispatch order on its own
thread (the wait releases the GIL) and stamps `time.perf_counter()` as each becomes ready: the
device seconds of a call are then its end minus the later of its dispatch and the previous call's
end (`GroupRunner._collect`), whatever the host was doing.

A daemon thread still waiting inside XLA when the interpreter finalizes aborts the process
("terminate called after throwing an instance of ''"; most likely what aborted a CI run of
tests/test_error_exits.py once, 2026-12-07). So at interpreter exit, before daemon threads are
frozen, every clock is closed and its watcher joined for up to `EXIT_JOIN_S` seconds: it ends once
the calls it already watches are done. The watcher stays a daemon, so a call that never ends (a
dead peer of a multi-process group) delays the exit by that much instead of hanging it.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from typing import Any

import jax

from crosspool_jax.execution.thread_exit import before_thread_join

EXIT_JOIN_S = 60.0  # how long interpreter exit waits for each open clock's watched calls
_OPEN: weakref.WeakSet[CallClock] = weakref.WeakSet()  # clocks whose thread may run


def _close_open_clocks() -> None:
    """Closes every open clock and joins its watcher (up to `EXIT_JOIN_S` each): run at
    interpreter exit (`thread_exit.before_thread_join`)."""
    clocks = list(_OPEN)
    for clock in clocks:
        clock.close()
    for clock in clocks:
        if clock._thread is not None:
            clock._thread.join(EXIT_JOIN_S)


class CallEnd:
    """One call's end: `time.perf_counter()` when its outputs were ready (None: they failed)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._at: float | None = None

    def set(self, at: float | None) -> None:
        self._at = at
        self._done.set()

    def get(self, timeout: float | None = None) -> float | None:
        """The end, waiting up to `timeout` seconds for the watcher (None if it did not come)."""
        return self._at if self._done.wait(timeout) else None


class CallClock:
    """A daemon thread stamping the end of each watched call (started on first use; ended by
    `close`, and closed and joined at interpreter exit: module docstring)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[list[jax.Array], CallEnd] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def watch(self, outs: Any) -> CallEnd:
        """A `CallEnd` for a call whose outputs are `outs` (a pytree). Outputs already on the host
        (numpy: a host-scheduled call, which waited for its device work) end now."""
        end = CallEnd()
        arrays = [o for o in jax.tree.leaves(outs) if isinstance(o, jax.Array)]
        if not arrays:
            end.set(time.perf_counter())
            return end
        if self._thread is None:
            before_thread_join(_close_open_clocks)  # (not registered when already shutting down)
            self._thread = threading.Thread(target=self._run, name="crosspool-call-clock", daemon=True)
            _OPEN.add(self)
            self._thread.start()
        self._queue.put((arrays, end))
        return end

    def close(self) -> None:
        """Ends the thread after the calls already watched (idempotent)."""
        if self._thread is not None and self in _OPEN:
            _OPEN.discard(self)
            self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            arrays, end = item
            try:
                jax.block_until_ready(arrays)
            except Exception:  # the call failed: the stepping thread's read raises it
                end.set(None)
                continue
            end.set(time.perf_counter())
