"""Work to do at interpreter exit while the process's threads still run.

`threading`'s own exit hooks run when the main thread ends, before the interpreter joins the
non-daemon threads and long before it freezes the daemon ones (a daemon thread frozen inside XLA
aborts the process); `atexit` handlers run only after that join. The compile queue
(`compile_queue`: skip what is queued) and the call clock (`call_clock`: end the watcher once its
calls are done) both hook there, each once per process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_HOOKED: set[Callable[[], None]] = set()
_LOCK = threading.Lock()


def before_thread_join(fn: Callable[[], None]) -> bool:
    """Runs `fn` at interpreter exit before threads are joined; registered once however often it
    is asked for. False when the interpreter is already shutting down (`fn` not registered)."""
    with _LOCK:
        if fn in _HOOKED:
            return True
        try:
            threading._register_atexit(fn)  # type: ignore[attr-defined]
        except RuntimeError:  # already shutting down
            return False
        _HOOKED.add(fn)
        return True
