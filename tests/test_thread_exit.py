"""`execution.thread_exit.before_thread_join`: a callback runs once at interpreter exit, before the
interpreter joins non-daemon threads and before `atexit` handlers."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

_SCRIPT = """
import atexit, threading
from crosspool_jax.execution.thread_exit import before_thread_join
stop = threading.Event()
worker = threading.Thread(target=stop.wait)  # non-daemon: the interpreter joins it at exit
worker.start()
def hook():
    print("hook, worker alive:", worker.is_alive(), flush=True)
    stop.set()
assert before_thread_join(hook) and before_thread_join(hook)  # asked twice, registered once
atexit.register(lambda: print("atexit, worker alive:", worker.is_alive(), flush=True))
"""


def test_runs_once_before_threads_are_joined_and_before_atexit() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    # the hook ends the worker the interpreter would otherwise wait for forever
    assert p.stdout.splitlines() == ["hook, worker alive: True", "atexit, worker alive: False"]
