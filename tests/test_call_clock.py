"""`execution.call_clock.CallClock`: a call's end is stamped when its outputs are ready, in dispatch
order, whatever the reading thread does; host outputs end at once; a failed call ends with None; a
process exits cleanly with watched calls in flight."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from conftest import ROOT

from crosspool_jax.execution.call_clock import CallClock, CallEnd


def test_ends_are_stamped_when_outputs_are_ready() -> None:
    clock = CallClock()
    f = jax.jit(lambda x: (x @ x).sum())
    x = jnp.ones((256, 256), jnp.float32)
    t0 = time.perf_counter()
    ends = [clock.watch((f(x + i),)) for i in range(3)]
    got = [e.get(timeout=30.0) for e in ends]
    assert all(g is not None and g >= t0 for g in got)
    assert got == sorted(got)  # stamped in dispatch order
    time.sleep(0.05)  # read late: the stamps do not move
    assert [e.get(timeout=0) for e in ends] == got
    host = clock.watch((np.zeros(3),))  # already on the host: ends now
    assert host.get(timeout=0) is not None and host.get(timeout=0) >= got[-1]
    clock.close()
    clock._thread.join(timeout=5.0)
    assert not clock._thread.is_alive()


def test_a_failed_call_ends_with_none() -> None:
    clock = CallClock()

    class Broken:  # an output whose wait raises, as a failed device computation's would
        def block_until_ready(self) -> None:
            raise RuntimeError("device error")

    arr = jnp.ones(2)
    end = clock.watch((arr,))
    assert end.get(timeout=30.0) is not None
    # a failing wait (fed the way `watch` queues a call): None, and the watcher goes on
    failing = CallEnd()
    clock._queue.put(([Broken()], failing))  # type: ignore[list-item]
    assert failing.get(timeout=30.0) is None
    after = clock.watch((jnp.ones(2) * 2,))
    assert after.get(timeout=30.0) is not None
    clock.close()


_EXIT_SCRIPT = """
import jax, jax.numpy as jnp
from crosspool_jax.execution.call_clock import CallClock
clock = CallClock()
f = jax.jit(lambda x: jnp.linalg.matrix_power(x, 64).sum())
ends = [clock.watch((f(jnp.full((512, 512), 1e-3 * i, jnp.float32)),)) for i in range(8)]
print("exiting with calls in flight", flush=True)
"""


def test_the_process_exits_cleanly_with_calls_in_flight() -> None:
    """A process that ends with watched calls still running and the clock never closed: the
    watcher is closed and joined at exit (so it is not frozen inside XLA at finalization) and ends
    after those calls; the process exits 0, without an abort or a hang."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "exiting with calls in flight" in p.stdout
    assert "terminate called" not in p.stderr and "FATAL" not in p.stderr
