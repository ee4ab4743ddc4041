"""Tests of the background compile queue: priority order, cancellation, shutdown, errors."""

from __future__ import annotations

import threading

import pytest

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
    queue._thread.join(timeout=10)
    assert not queue._thread.is_alive()
