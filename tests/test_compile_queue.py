"""Tests of the background compile queue: priority order, cancellation, shutdown, errors, the
interpreter's switch interval (and the benchmark that measured why)."""

from __future__ import annotations

import json
import sys
import threading

import jax
import pytest

from crosspool_jax.execution import compile_queue
from crosspool_jax.execution.compile_queue import URGENT, WARM, CompileQueue


def test_urgent_jobs_run_before_queued_warm_ups_then_in_submission_order() -> None:
    queue = CompileQueue()
    gate = threading.Event()
    order: list[str] = []
    first = queue.submit(lambda: gate.wait(10))  # holds the thread while the rest is queued
    futs = [queue.submit(lambda n=n: order.append(n), p)
            for n, p in (("w1", WARM), ("u1", URGENT), ("w2", WARM), ("u2", URGENT))]
    gate.set()
    for f in (first, *futs):
        f.result(timeout=10)
    assert order == ["u1", "u2", "w1", "w2"]
    queue.shutdown()


def test_cancelled_job_is_skipped_and_errors_reach_the_waiter() -> None:
    queue = CompileQueue()
    gate = threading.Event()
    ran: list[str] = []
    queue.submit(lambda: gate.wait(10))
    skipped = queue.submit(lambda: ran.append("skipped"))
    failing = queue.submit(lambda: 1 // 0)
    after = queue.submit(lambda: ran.append("after"))
    assert skipped.cancel()
    gate.set()
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    after.result(timeout=10)
    assert ran == ["after"]  # the thread survived the error; the cancelled job never ran
    queue.shutdown()


def test_shutdown_cancels_queued_jobs_and_refuses_new_ones() -> None:
    queue = CompileQueue()
    gate, started = threading.Event(), threading.Event()
    running = queue.submit(lambda: (started.set(), gate.wait(10))[1])
    queued = queue.submit(lambda: "never")
    assert started.wait(10)
    queue.shutdown()
    gate.set()
    assert running.result(timeout=10) is True
    assert queued.cancelled()
    with pytest.raises(RuntimeError, match="shut down"):
        queue.submit(lambda: None)
    for t in queue._threads:
        t.join(timeout=10)
        assert not t.is_alive()


def test_threads_run_jobs_at_once_lowest_priority_first() -> None:
    """Two threads: two blocking jobs run together; queued jobs then go urgent first."""
    queue = CompileQueue(threads=2)
    both = threading.Barrier(3)
    gate = threading.Event()
    order: list[str] = []
    held = [queue.submit(lambda: (both.wait(10), gate.wait(10))) for _ in range(2)]
    both.wait(10)  # only reached if the two jobs run at the same time
    futs = [queue.submit(lambda n=n: order.append(n), p)
            for n, p in (("w1", WARM), ("u1", URGENT), ("w2", WARM), ("u2", URGENT))]
    gate.set()
    for f in (*held, *futs):
        f.result(timeout=10)
    assert order[:2] == ["u1", "u2"] and sorted(order[2:]) == ["w1", "w2"]
    queue.shutdown()
    with pytest.raises(ValueError, match="threads"):
        CompileQueue(threads=0)


def test_a_queue_lowers_the_switch_interval_and_never_raises_it() -> None:
    """Tracing and lowering on the compile thread hold the GIL; a queue lowers the interpreter's
    switch interval so the stepping thread gets it back within about COMPILE_SWITCH_INTERVAL_S
    (benchmarks/compile_gil.py); a lower interval set by the user stays."""
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        q = compile_queue.CompileQueue()
        assert sys.getswitchinterval() == pytest.approx(compile_queue.COMPILE_SWITCH_INTERVAL_S)
        q.shutdown()
        sys.setswitchinterval(0.0001)
        q = compile_queue.CompileQueue()
        assert sys.getswitchinterval() == pytest.approx(0.0001)
        q.shutdown()
    finally:
        sys.setswitchinterval(before)


def test_compile_gil_benchmark_runs_on_cpu(tmp_path) -> None:
    """benchmarks/compile_gil.py: both switch intervals, both phases, the compile-process variant,
    the interval restored."""
    from benchmarks import compile_gil

    before, cache_before = sys.getswitchinterval(), jax.config.jax_enable_compilation_cache
    out = tmp_path / "gil.json"
    assert compile_gil.main(["--programs", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["switch_interval_s"], r["phase"]) for r in rows} == {
        (i, p) for i in (compile_gil.DEFAULT_SWITCH_S, compile_queue.COMPILE_SWITCH_INTERVAL_S)
        for p in ("trace+lower", "compile")} | {(before, "worker + load")}
    assert all(r["wakeups"] > 0 and r["seconds"] > 0 and r["max_ms"] >= r["p99_ms"] >= 0 for r in rows)
    assert sys.getswitchinterval() == before
    assert jax.config.jax_enable_compilation_cache == cache_before
