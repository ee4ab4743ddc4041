"""Multi-host CrossPool on CPU: `crosspool serve` as a group of 2 processes x 4 CPU devices on
loopback (jax.distributed, gloo collectives), `--pools 4+4`, so the KV pool is process 0's devices
and the weights pool process 1's. Greedy tokens over gRPC equal the reference path for three model
families; a cancel frees the request's pages; killing the follower fails the live request with a
clear status, health NOT_SERVING and new calls UNAVAILABLE, never a hang; a restarted group
serves again and stops its follower when the leader stops. Plus the step channel's own pieces.

Measured on 2 shared cores: the two group tests take 76-96 s together at load average 2-3, up to
130 s when other work loads the machine (the step programs' compiles dominate)."""

from __future__ import annotations

import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import env_without_device_count
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crosspool_jax.demo import demo_models
from crosspool_jax.distributed import channel as ch
from crosspool_jax.distributed.cluster import ClusterError, cluster_spec
from crosspool_jax.models.reference import ReferenceGenerator
from serving.client import CrossPoolClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = {"demo-mixtral": [5, 9, 33, 7], "demo-qwen3-moe": [6, 10, 33, 7, 2, 100],
           "demo-deepseek-v3": [7, 9, 3]}
START_TIMEOUT = 180.0


def _reference(name: str, prompt: list[int], n: int) -> list[int]:
    m = demo_models()[name]
    w = jax.tree.map(lambda a: a.astype(jnp.float32), m.weights)
    return list(ReferenceGenerator(m.config, w).generate(prompt, n).token_ids)


def _free_port_pair() -> int:
    """A port P with P and P + 1 free (the coordinator and the step channel)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


class Group:
    """A 2-process serve group; logs in `tmp`. The processes get no XLA_FLAGS device count (the
    group gives each process its 4 devices) and compile no warm-up programs in the background
    (on 2 cores they would double the compile time: the requests compile what they use). The
    step channel's silence limit is 10 s: CI's 2 cores, shared with another test worker, can
    starve a heartbeat thread for seconds (a killed follower is seen at once: its socket closes)."""

    def __init__(self, tmp: pathlib.Path, cache: pathlib.Path, *extra: str):
        port = _free_port_pair()
        env = env_without_device_count(
            JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), CROSSPOOL_COMPILATION_CACHE=str(cache),
            PYTHONFAULTHANDLER="1")  # a process that has to be aborted prints its threads
        self.logs = [tmp / f"process{i}.log" for i in range(2)]
        self.procs = []
        for i in range(2):
            argv = [sys.executable, "-m", "serving.cli", "serve", "--coordinator", f"127.0.0.1:{port}",
                    "--num-processes", "2", "--process-id", str(i), "--pools", "4+4", "--port", "0",
                    "--no-warmup", "--warm-programs", "0", "--step-timeout", "10", *extra]
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                   cwd=ROOT))
        self.address = self._wait_serving()

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def _wait_serving(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            m = re.search(r"serving on (\S+) ", self.log(0))
            if m:
                return m.group(1)
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise AssertionError(f"process {i} exited ({p.returncode}) while starting:\n"
                                         f"{self.log(i)}")
            time.sleep(0.2)
        raise AssertionError(f"the group did not start in {START_TIMEOUT} s:\n{self.log(0)}\n{self.log(1)}")

    def wait_exit(self, i: int, timeout: float = 60.0) -> int:
        """Process i's exit status; one that does not exit in `timeout` s is aborted (its threads'
        stacks go to its log) and the test fails with the log."""
        try:
            return self.procs[i].wait(timeout)
        except subprocess.TimeoutExpired:
            self.procs[i].send_signal(signal.SIGABRT)
            self.procs[i].wait(30)
            tail = self.log(i)[-20000:]
            raise AssertionError(f"process {i} did not exit in {timeout} s:\n{tail}") from None

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)


@pytest.fixture
def cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One compilation cache for the group tests: a restarted group reads its programs back."""
    return tmp_path_factory.getbasetemp() / "multihost-jax-cache"


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as c:
        stub = health_pb2_grpc.HealthStub(c)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def _http_health(url: str) -> tuple[int, str]:
    """GET URL/health of the OpenAI-compatible API: (HTTP status, "status" of the body)."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            return r.status, json.loads(r.read())["status"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["status"]


def _first_then_rest(stream: Iterator) -> tuple[object, threading.Thread, dict]:
    """Reads a stream's first response here and the rest in a thread; `out` gets "error" or "done"."""
    first = next(stream)
    out: dict = {}

    def rest() -> None:
        try:
            for _ in stream:
                pass
            out["done"] = True
        except grpc.RpcError as e:
            out["error"] = e

    t = threading.Thread(target=rest, daemon=True)
    t.start()
    return first, t, out


@pytest.mark.slow
def test_group_serves_reference_tokens_and_fails_cleanly_when_the_follower_dies(
        tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    g = Group(tmp_path, cache, "--http-port", "0")
    try:
        http = re.search(r"OpenAI-compatible HTTP API on (\S+)/v1", g.log(0))
        assert http, g.log(0)
        assert _http_health(http.group(1)) == (200, "ok")
        assert "process 0 of 2" in g.log(0) and "4 of the group's 8 cpu devices" in g.log(0)
        assert "4+4 (kv: 0,1,2,3; weights: " in g.log(0)
        assert "connected to the leader's step channel" in g.log(1)
        assert "listening on" not in g.log(1) and "serving on" not in g.log(1)  # the leader alone listens
        with CrossPoolClient(g.address) as client:
            for name, prompt in PROMPTS.items():
                got = client.generate(name, prompt_ids=prompt, max_new_tokens=8)["token_ids"]
                assert got == _reference(name, prompt, 8), name
            # a cancel frees the request's pages
            stream = client.generate_stream("demo-mixtral", prompt_ids=[1, 2, 3], max_new_tokens=400)
            next(stream)
            assert sum(p.pages_used for p in client.stats().kv_pages) > 0
            stream.cancel()
            deadline = time.monotonic() + 30
            while sum(p.pages_used for p in client.stats().kv_pages) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sum(p.pages_used for p in client.stats().kv_pages) == 0
            # the follower dies under a live request
            stream = client.generate_stream("demo-qwen3-moe", prompt_ids=[4, 5], max_new_tokens=400)
            _, reader, out = _first_then_rest(stream)
            t_kill = time.monotonic()
            g.procs[1].kill()
            reader.join(30)
            assert not reader.is_alive(), "the live request hangs after the follower died"
            assert time.monotonic() - t_kill < 15
            err = out["error"]
            assert err.code() == grpc.StatusCode.ABORTED, err
            assert "lost a process" in err.details() and "process 1" in err.details()
            assert _health(g.address) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert _http_health(http.group(1)) == (503, "unavailable")
            with pytest.raises(grpc.RpcError) as e:
                client.generate("demo-mixtral", prompt_ids=[1, 2], max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "lost a process" in e.value.details()
            # models are fixed at start-up: a LoadModel on the leader alone would diverge
            with pytest.raises(grpc.RpcError) as e:
                client.unload_model("demo-mixtral")
            assert "loads its models at start-up" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                client.sleep_model("demo-mixtral")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "multi-host" in e.value.details()
        g.procs[0].send_signal(signal.SIGINT)
        assert g.wait_exit(0) == 1, g.log(0)  # a group that lost a process exits 1
        assert "health NOT_SERVING" in g.log(0)
    finally:
        g.stop()


@pytest.mark.slow
def test_restarted_group_serves_and_the_leader_stops_its_follower(
        tmp_path: pathlib.Path, cache: pathlib.Path) -> None:
    g = Group(tmp_path, cache)
    try:
        with CrossPoolClient(g.address) as client:
            prompt = PROMPTS["demo-deepseek-v3"]
            got = client.generate("demo-deepseek-v3", prompt_ids=prompt, max_new_tokens=8)["token_ids"]
            assert got == _reference("demo-deepseek-v3", prompt, 8)
        assert _health(g.address) == health_pb2.HealthCheckResponse.SERVING
        g.procs[0].send_signal(signal.SIGINT)
        assert g.wait_exit(0) == 0, g.log(0)
        assert g.wait_exit(1) == 0, g.log(1)
        stopped = re.search(r"the leader stopped the group after (\d+) calls \((\d+) programs queued ahead",
                            g.log(1))
        assert stopped, g.log(1)
        # the calls of the request; the leader's next-page-bucket decode program queued here too
        assert int(stopped.group(1)) >= 2 and int(stopped.group(2)) >= 1
    finally:
        g.stop()


# ---- the step channel and the flags -------------------------------------------------------------


def test_codec_round_trip() -> None:
    msg = {"op": "step", "seq": 3, "inputs": [{"tokens": np.arange(6, dtype=np.int32).reshape(2, 3),
                                               "seed": np.ones((2, 1, 2), np.uint32),
                                               "empty": np.zeros((0, 4), np.float32)}],
           "feeds": [[[1, [2, 0], 5]]], "flag": True, "x": None}
    got = ch.decode(ch.encode(msg))
    assert got["feeds"] == [[[1, [2, 0], 5]]] and got["flag"] is True and got["x"] is None
    for k, a in msg["inputs"][0].items():
        b = got["inputs"][0][k]
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
        assert b.flags.writeable


def _leader_with(followers: int, timeout: float) -> tuple[threading.Thread, int, list]:
    port = _free_port_pair()
    box: list = []

    def accept() -> None:
        box.append(ch.LeaderChannel.open("127.0.0.1", port, followers, timeout=timeout, accept_timeout=20))

    t = threading.Thread(target=accept)
    t.start()
    return t, port, box


def test_channel_reports_a_silent_or_closed_follower_and_keeps_a_beating_one() -> None:
    t, port, box = _leader_with(2, timeout=1.0)
    live = ch.FollowerChannel.connect("127.0.0.1", port, 1, timeout=20)
    raw = socket.create_connection(("127.0.0.1", port))  # says hello, then nothing
    ch._send_frame(raw, ch.encode({"op": "hello", "process_id": 2}))
    t.join(20)
    leader = box[0]
    lost: list = []
    leader.on_lost = lambda pid, why: lost.append((pid, why))
    try:
        leader.send({"op": "step", "a": np.arange(3)})
        assert live.recv()["a"].tolist() == [0, 1, 2]
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost == [(2, "process 2 sent no heartbeat for 1.0 s")]
        with pytest.raises(ch.ChannelError, match="process 2 sent no heartbeat"):
            leader.send({"op": "step"})
    finally:
        leader.close()
        live.close()
        raw.close()
    t, port, box = _leader_with(1, timeout=5.0)
    follower = ch.FollowerChannel.connect("127.0.0.1", port, 1, timeout=20)
    t.join(20)
    leader = box[0]
    lost = []
    leader.on_lost = lambda pid, why: lost.append((pid, why))
    follower.close()
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and lost[0][0] == 1 and "closed the step channel" in lost[0][1]
    leader.close()


def test_cluster_flags() -> None:
    assert cluster_spec(None, None, None) is None
    assert cluster_spec(None, 1, 0) is None
    spec = cluster_spec("10.0.0.1:8476", 4, 2)
    assert spec is not None and not spec.is_leader and spec.step_address() == ("10.0.0.1", 8477)
    assert cluster_spec("h:1", 2, 0, step_port=9000).step_address() == ("h", 9000)
    auto = cluster_spec("auto", None, None)
    assert auto is not None and auto.coordinator is None
    detected = cluster_spec("h:1", None, None)  # count and id left to JAX's cluster detection
    assert detected is not None and detected.num_processes is None and detected.process_id is None
    for bad in [("h:1", 2, 2), ("h:1", 0, None), ("nohost", 2, 0), (None, 2, 0), (None, None, 1)]:
        with pytest.raises(ClusterError):
            cluster_spec(*bad)


@pytest.mark.parametrize(("argv", "message"), [
    (["--num-processes", "2"], "--num-processes > 1 needs --coordinator HOST:PORT"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "must be in [0, "),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0", "--mode", "shared"],
     "a multi-host group runs mode crosspool, not shared"),
])
def test_serve_refuses_bad_group_flags(argv: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Refused in one line (exit 2) before jax.distributed is joined or a port is bound."""
    from serving.cli import main

    assert main(["serve", "--no-warmup", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("crosspool: error: ")


def test_group_fingerprint_names_what_differs() -> None:
    """Processes started alike agree; one with another model set is refused, naming the models."""
    from crosspool_jax.distributed.engine import (
        DistributedEngine,
        GroupMismatchError,
        check_fingerprint,
        group_fingerprint,
    )
    from crosspool_jax.engine import EngineConfig

    models = demo_models()
    cfg = EngineConfig(arena_bytes=8 << 20, attention_backend="reference")

    def fingerprint(names: list[str]) -> str:
        eng = DistributedEngine(pools="1+1", config=cfg, warm_programs=0)
        try:
            for n in names:
                eng.add_model(n, models[n].config, models[n].weights)
            return group_fingerprint(eng)
        finally:
            eng.shutdown(timeout=0)

    a = fingerprint(["demo-mixtral", "demo-deepseek-v3"])
    check_fingerprint(a, fingerprint(["demo-mixtral", "demo-deepseek-v3"]))
    with pytest.raises(GroupMismatchError, match=r"models \(demo-deepseek-v3, demo-qwen3-moe\)"):
        check_fingerprint(a, fingerprint(["demo-mixtral", "demo-qwen3-moe"]))
