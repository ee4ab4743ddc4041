"""A compile queue with priorities, for step programs compiled off the serving path.

`GroupRunner` queues two kinds of background compiles: the programs a new model's lane will need
(warm-up at load) and the program a live request grows into next (a wider page table). The second
is urgent (a request will reach it within seconds) and must not wait behind a new model's warm-up,
so the queue runs the lowest `priority` first, then in submission order. One thread by default:
compiles are CPU-heavy and the serving thread needs the rest of the machine; a host with cores to
spare runs `threads` compiles at once (the runner's `compile_workers`, meant with `compile_process`,
where each thread only waits on its own worker process).

XLA's compile releases the GIL; tracing and lowering a step program do not, and with CPython's
5 ms switch interval they kept the serving thread off the interpreter for most of that phase
(benchmarks/compile_gil.py, docs/benchmarks.md). The first queue lowers the process's switch
interval to `COMPILE_SWITCH_INTERVAL_S` (never raises it), so the stepping thread gets the GIL back
within about that while a program is being lowered. Process-wide: a library user who set a lower
interval keeps theirs.

The threads are not daemons (an interpreter exiting while a daemon thread is inside XLA aborts
the process); at interpreter exit they skip what is still queued and end after their current
compiles.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import sys
import threading
from collections.abc import Callable
from typing import Any

from crosspool_jax.execution.thread_exit import before_thread_join

_EXITING = threading.Event()  # the interpreter is shutting down: queued compiles are skipped

URGENT = 0  # a live request's next program
WARM = 1  # a newly loaded model's programs
COMPILE_SWITCH_INTERVAL_S = 0.0005  # the interpreter's switch interval once a queue exists


def exiting() -> bool:
    """True once the interpreter has started shutting down."""
    return _EXITING.is_set()


def _hook_exit() -> None:
    """Sets `_EXITING` at interpreter shutdown, before non-daemon threads are joined (at once if
    it is already shutting down)."""
    if not before_thread_join(_EXITING.set):
        _EXITING.set()


class CompileQueue:
    """Runs submitted calls on `threads` threads, lowest priority first (ties: first submitted
    first). `submit` returns a `concurrent.futures.Future`; a future cancelled before its call
    starts is skipped. `shutdown` cancels what is queued and lets the threads end."""

    def __init__(self, name: str = "step-compile", threads: int = 1):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        _hook_exit()
        if sys.getswitchinterval() > COMPILE_SWITCH_INTERVAL_S:
            sys.setswitchinterval(COMPILE_SWITCH_INTERVAL_S)
        self._heap: list[tuple[int, int, concurrent.futures.Future, Callable[[], Any]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=False)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], Any], priority: int = WARM) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("compile queue is shut down")
            heapq.heappush(self._heap, (priority, next(self._seq), fut, fn))
            self._cv.notify()
        return fut

    def shutdown(self) -> None:
        """Cancels every queued call; each thread ends after the one it is running (not joined)."""
        with self._cv:
            self._closed = True
            for _, _, fut, _ in self._heap:
                fut.cancel()
            self._heap.clear()
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed and not _EXITING.is_set():
                    self._cv.wait(0.5)
                if self._closed or _EXITING.is_set():
                    for _, _, fut, _ in self._heap:
                        fut.cancel()
                    self._heap.clear()
                    return
                _, _, fut, fn = heapq.heappop(self._heap)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to whoever waits on the future
                fut.set_exception(e)
