"""The server's life cycle as a new user meets it: the port is bound (or refused, in one line) before
any model loads; health says NOT_SERVING while starting and while draining; SIGTERM is logged and
drains; a second signal exits at once; clients cut off by the shutdown are told so; max_new_tokens is
checked the same way locally and through the server.

Subprocess servers (`crosspool serve --mode reference --no-warmup`) are started once per module, side
by side, and never asked to generate to the end (the reference engine would compile for seconds);
what needs tokens runs in-process on an engine that streams without running the model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import HF_FIXTURES, ROOT
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crosspool_jax.engine_api import FINISH_LENGTH, Event
from crosspool_jax.errors import InvalidRequestError
from serving.client import CrossPoolClient, server_unavailable
from serving.server import (
    CUT_OFF_MESSAGE,
    REFUSED_MESSAGE,
    SERVICE_NAME,
    STARTING_MESSAGE,
    ServeInterrupted,
    ServingEngine,
    ShutdownSignals,
    start_server,
)

NAME = "demo-mixtral"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HINT = "(is the server up"


# ---- helpers ---------------------------------------------------------------------------------------


class ServeProc:
    """`crosspool serve ARGS` in a subprocess; its stdout / stderr lines are collected as they come."""

    def __init__(self, *args: str):
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        cmd = [sys.executable, "-m", "serving.cli", "serve", *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(f, key), daemon=True)
            for f, key in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))
        ]
        for t in self._readers:
            t.start()

    def _read(self, f, key: str) -> None:
        for line in f:
            with self._cond:
                self.lines[key].append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines[key].append(None)  # end of stream
            self._cond.notify_all()

    def wait_line(self, key: str, part: str, timeout: float = 120.0) -> str:
        """The first line of `key` ("out" / "err") containing `part`."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[key]:
                    if line is None:
                        raise AssertionError(f"no {part!r} before the end of std{key}:\n{self.text('err')}")
                    if part in line:
                        return line
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {part!r} in std{key} within {timeout} s:\n{self.text('err')}")
                self._cond.wait(left)

    def text(self, key: str) -> str:
        with self._cond:
            return "\n".join(x for x in self.lines[key] if x is not None)

    def address(self) -> str:
        line = self.wait_line("out", "serving on ")
        return line.split("serving on ")[1].split()[0]

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def procs():
    """Two servers started side by side: "a" (grace 1 s) and "b" (grace 60 s)."""
    common = ["--port", "0", "--mode", "reference", "--no-warmup", "--max-live-requests", "4"]
    started = {"a": ServeProc(*common, "--grace", "1"), "b": ServeProc(*common, "--grace", "60")}
    try:
        yield started
    finally:
        for p in started.values():
            p.kill()


class FakeEngine(ServingEngine):
    """A ServingEngine whose worker streams token 1 until max_new_tokens without running the model (no
    XLA compile), once `gate` is set (set at first)."""

    def __init__(self, *a, **kw):
        self.gate = threading.Event()
        self.gate.set()
        super().__init__(*a, **kw)

    def _generate(self, lv):
        self.gate.wait(timeout=60)
        req = lv.request
        for i in range(req.max_new_tokens):
            if lv.done:  # cancelled, or failed by the shutdown
                return
            if i == req.max_new_tokens - 1:
                self._finish(lv, FINISH_LENGTH, last=(i, 1, ""), completion_tokens=i + 1)
                return
            self._put_token(lv, Event(req.request_id, i, 1, "", time.time()))


def _demo():
    from crosspool_jax.demo import demo_models

    return demo_models()[NAME]


def _fake_engine(max_live_requests: int = 4) -> FakeEngine:
    m = _demo()
    engine = FakeEngine(max_live_requests=max_live_requests)
    engine.add_model(NAME, m.config, m.weights, m.tokenizer)
    return engine


def _health(channel) -> list[int]:
    stub = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest
    return [stub.Check(check(service=s), timeout=10).status for s in ("", SERVICE_NAME)]


def _rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        call()
    return ei.value


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from serving.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- subprocess servers (first, so they start while nothing else runs) ------------------------------


def test_port_in_use_is_refused_before_any_model_loads(procs):
    """A second `crosspool serve` on a port a crosspool server already listens on (gRPC's
    SO_REUSEPORT used to let it share the port): one line, exit 2, before any model is loaded."""
    a = procs["a"]
    line = a.wait_line("err", "serve: listening on ")
    port = int(line.split("listening on ")[1].split(";")[0].rsplit(":", 1)[1])
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), "--mode", "reference",
           "--no-warmup"]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == f"crosspool: error: cannot listen on 127.0.0.1:{port}: address already in use"
    assert "serving on" not in p.stdout
    assert time.monotonic() - t0 < 60


def test_second_sigterm_during_drain_exits_at_once(procs, capsys):
    b = procs["b"]
    addr = b.address()
    with CrossPoolClient(addr) as c:
        assert _health(c.channel) == [SERVING, SERVING]
        # four live requests (the engine's maximum): the first compiles (seconds), the others wait
        streams = [c.generate_stream(NAME, prompt_ids=[1, 2 + i], max_new_tokens=480, ignore_eos=True)
                   for i in range(4)]
        try:
            end = time.monotonic() + 30
            while len(c.stats().live_request_ids) < 4 and time.monotonic() < end:
                time.sleep(0.02)
            assert len(c.stats().live_request_ids) == 4
            b.proc.send_signal(signal.SIGTERM)
            line = b.wait_line("err", "serve: shutting down")
            assert line == (
                "crosspool: serve: shutting down (signal SIGTERM), draining 4 live requests for up to 60 s"
            )
            # while it drains: health NOT_SERVING, a new request refused with a message that says so
            assert _health(c.channel) == [NOT_SERVING, NOT_SERVING]
            e = _rpc_error(lambda: c.generate(NAME, prompt_ids=[1], max_new_tokens=2))
            assert e.code() == grpc.StatusCode.UNAVAILABLE and e.details() == REFUSED_MESSAGE
            rc, err = _cli(capsys, "generate", "--server", addr, "--model", NAME, "--prompt-ids", "1")
            assert rc == 2 and err == f"crosspool: error: {addr}: UNAVAILABLE: {REFUSED_MESSAGE}"
            t0 = time.monotonic()
            b.proc.send_signal(signal.SIGTERM)
            assert b.finish(timeout=30) == 128 + signal.SIGTERM
            assert time.monotonic() - t0 < 5
        finally:
            for s in streams:
                s.cancel()
    err = b.text("err")
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == (
        "crosspool: serve: second signal (SIGTERM) during the shutdown: exiting now, without finishing "
        "the drain"
    )


def test_sigterm_is_logged_drains_and_exits_0(procs):
    a = procs["a"]
    with CrossPoolClient(a.address()) as c:
        assert _health(c.channel) == [SERVING, SERVING]
    a.proc.send_signal(signal.SIGTERM)
    assert a.finish(timeout=60) == 0
    err = a.text("err").splitlines()
    assert "crosspool: serve: shutting down (signal SIGTERM), draining 0 live requests for up to 1 s" in err
    assert err[-1] == "crosspool: serve: stopped"
    assert not any("Traceback" in x for x in err)


# ---- in-process ------------------------------------------------------------------------------------


def test_port_in_use_in_process(capsys):
    with socket.socket() as holder:  # any listener, not only a gRPC server
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError, match=f"^cannot listen on 127.0.0.1:{port}: address already in use$"):
            start_server(None, port=port)
        rc, err = _cli(capsys, "serve", "--port", str(port), "--mode", "reference", "--no-warmup")
        assert rc == 2
        assert err == f"crosspool: error: cannot listen on 127.0.0.1:{port}: address already in use"
    first = start_server(None, port=0)
    try:
        with pytest.raises(OSError, match="address already in use"):
            start_server(None, port=first.port)
    finally:
        first.stop(0)


def test_not_serving_while_starting_then_serving(capsys):
    s = start_server(None, port=0)
    try:
        with CrossPoolClient(s.address) as c:
            assert _health(c.channel) == [NOT_SERVING, NOT_SERVING]
            for call in (
                c.list_models,
                c.stats,
                lambda: c.generate(NAME, prompt_ids=[1]),
                lambda: c.load_model("x", "/nonexistent"),
                lambda: c.unload_model(NAME),
            ):
                e = _rpc_error(call)
                assert e.code() == grpc.StatusCode.UNAVAILABLE and e.details() == STARTING_MESSAGE
                assert server_unavailable(e)
            # the CLI: the server's own words, without the "is the server up?" hint
            rc, err = _cli(capsys, "generate", "--server", s.address, "--model", NAME, "--prompt-ids", "1")
            assert rc == 2 and err == f"crosspool: error: {s.address}: UNAVAILABLE: {STARTING_MESSAGE}"
            s.set_ready(_fake_engine())
            assert _health(c.channel) == [SERVING, SERVING]
            assert [m.name for m in c.list_models()] == [NAME]
            assert len(c.generate(NAME, prompt_ids=[1, 2], max_new_tokens=3)["token_ids"]) == 3
    finally:
        s.stop(0)
    # a connection failure still gets the hint
    dead = f"127.0.0.1:{_free_port()}"
    rc, err = _cli(capsys, "generate", "--server", dead, "--model", NAME, "--prompt-ids", "1")
    assert rc == 2 and f"{dead}: UNAVAILABLE: " in err and HINT in err and len(err.splitlines()) == 1


def test_drain_health_refusal_and_cut_off():
    engine = _fake_engine()
    engine.gate.clear()  # both requests stay live: the first held in the worker, the second queued
    s = start_server(engine, port=0)
    stopper = threading.Thread(target=s.stop, args=(1.5,))
    try:
        with CrossPoolClient(s.address) as c:
            streams = [c.generate_stream(NAME, prompt_ids=[1, 2 + i], max_new_tokens=50) for i in range(2)]
            end = time.monotonic() + 10
            while len(c.stats().live_request_ids) < 2 and time.monotonic() < end:
                time.sleep(0.01)
            assert len(c.stats().live_request_ids) == 2
            stopper.start()
            end = time.monotonic() + 10
            while _health(c.channel) != [NOT_SERVING, NOT_SERVING] and time.monotonic() < end:
                time.sleep(0.01)
            assert _health(c.channel) == [NOT_SERVING, NOT_SERVING]
            e = _rpc_error(lambda: c.generate(NAME, prompt_ids=[1], max_new_tokens=2))
            assert e.code() == grpc.StatusCode.UNAVAILABLE and e.details() == REFUSED_MESSAGE
            e = _rpc_error(c.list_models)  # every call but the health check
            assert e.code() == grpc.StatusCode.UNAVAILABLE and e.details() == REFUSED_MESSAGE
            for st in streams:  # grace runs out: both are told the server shut down under them
                e = _rpc_error(lambda st=st: list(st))
                assert e.code() == grpc.StatusCode.UNAVAILABLE and e.details() == CUT_OFF_MESSAGE
                assert server_unavailable(e)
    finally:
        engine.gate.set()
        if stopper.is_alive():
            stopper.join(timeout=15)
        assert not stopper.is_alive()
        s.stop(0)
    assert engine.stats().failed == 2


def test_max_new_tokens_same_check_locally_and_through_the_server(capsys):
    from crosspool_jax.models.reference import validate_request

    def local_message(n: int) -> str:
        with pytest.raises(InvalidRequestError) as ei:
            validate_request(_demo().config, [1, 2], n)
        return str(ei.value)

    s = start_server(_fake_engine(), port=0)
    try:
        with CrossPoolClient(s.address) as c:
            for n in (0, -3):
                e = _rpc_error(lambda n=n: c.generate(NAME, prompt_ids=[1, 2], max_new_tokens=n))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details() == local_message(n)
            assert local_message(0) == "max_new_tokens must be >= 1, got 0"
            assert len(c.generate(NAME, prompt_ids=[1, 2], max_new_tokens=None)["token_ids"]) == 32  # absent
            assert len(c.generate(NAME, prompt_ids=[1, 2], max_new_tokens=5)["token_ids"]) == 5
        rc, err = _cli(capsys, "generate", "--server", s.address, "--model", NAME, "--prompt-ids", "1,2",
                       "--max-new-tokens", "0")
        assert rc == 2 and err == f"crosspool: error: {s.address}: INVALID_ARGUMENT: {local_message(0)}"
    finally:
        s.stop(0)
    case = HF_FIXTURES / "mixtral_gqa4x2_top2"
    if case.is_dir():  # the local CLI says the same
        rc, err = _cli(capsys, "generate", "--model", str(case), "--prompt-ids", "1,2",
                       "--max-new-tokens", "0")
        assert rc == 2 and err == f"crosspool: error: {local_message(0)}"


def test_first_signal_while_starting_interrupts_the_start_up():
    logs: list[str] = []
    before = signal.getsignal(signal.SIGINT)
    signals = ShutdownSignals(log=logs.append).install()
    try:
        signals.interrupt = True
        with pytest.raises(ServeInterrupted) as ei:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the handler raises here
        assert str(ei.value) == "SIGINT" and signals.event.is_set() and not signals.interrupt
        assert signals.name == "SIGINT" and logs == []
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is before
