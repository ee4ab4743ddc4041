"""A real crosspool.v1 server on 127.0.0.1 (free port), called through the client and raw stubs."""

from __future__ import annotations

import filecmp
import os
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client import CrossPoolClient
from serving.server import ServingEngine, demo_engine, start_server

NAME = "demo-mixtral"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server():
    s = start_server(demo_engine(max_live_requests=2, names=[NAME]), port=0)
    yield s
    s.stop(grace=0)


class GatedEngine(ServingEngine):
    """A ServingEngine whose worker waits on `gate` before each request: no timing races in tests."""

    def __init__(self, *a, **kw):
        import threading

        self.gate = threading.Event()
        super().__init__(*a, **kw)

    def _generate(self, lv):
        self.gate.wait(timeout=60)
        return super()._generate(lv)


@pytest.fixture
def gated():
    from crosspool_jax.demo import demo_models

    m = demo_models()[NAME]
    engine = GatedEngine(max_live_requests=2)
    engine.add_model(NAME, m.config, m.weights, m.tokenizer)
    s = start_server(engine, port=0)
    with CrossPoolClient(s.address) as c:
        yield engine, c
    engine.gate.set()
    s.stop(grace=0)


def _wait_live(client, n, timeout=10.0):
    end = time.time() + timeout
    while len(client.stats().live_request_ids) < n and time.time() < end:
        time.sleep(0.01)
    return list(client.stats().live_request_ids)


@pytest.fixture
def client(server):
    with CrossPoolClient(server.address) as c:
        yield c


def _wait_idle(client, timeout=30.0):
    end = time.time() + timeout
    while client.stats().live_request_ids and time.time() < end:
        time.sleep(0.02)
    return list(client.stats().live_request_ids)


def test_health_and_list(server, client):
    stub = health_pb2_grpc.HealthStub(client.channel)
    for svc in ("", "crosspool.v1.CrossPool"):
        assert (
            stub.Check(health_pb2.HealthCheckRequest(service=svc)).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    (m,) = client.list_models()
    assert m.name == NAME and m.family == "mixtral" and m.vocab_size == 258


def test_generate_stream_order(client):
    out = client.generate(NAME, prompt="hello", max_new_tokens=10, ignore_eos=True)
    assert len(out["token_ids"]) == 10 and out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}
    assert out["timestamps_ns"] == sorted(out["timestamps_ns"])
    resps = list(client.generate_stream(NAME, prompt_ids=[104, 105], max_new_tokens=6, ignore_eos=True))
    assert [r.index for r in resps] == list(range(6))
    assert all(r.finish_reason == 0 for r in resps[:-1]) and resps[-1].finish_reason != 0
    # stop tokens end the stream with STOP
    stop = out["token_ids"][3]
    out2 = client.generate(NAME, prompt="hello", max_new_tokens=10, stop_token_ids=[stop])
    assert out2["finish_reason"] == "stop" and out2["token_ids"][-1] == stop
    assert out2["token_ids"] == out["token_ids"][: len(out2["token_ids"])]


@pytest.mark.parametrize(
    "kw",
    [
        dict(prompt_ids=[]),
        dict(prompt_ids=[1] * 600),
        dict(prompt_ids=[1, 2], temperature=-1.0),
        dict(prompt_ids=[1, 2], top_p=1.5),
        dict(prompt_ids=[1, 2], top_k=-3),
        dict(prompt_ids=[1, 2], max_new_tokens=-1),
        dict(prompt_ids=[9999]),
    ],
)
def test_invalid_argument(client, kw):
    with pytest.raises(grpc.RpcError) as ei:
        client.generate(NAME, **kw)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_not_found(client):
    with pytest.raises(grpc.RpcError) as ei:
        client.generate("no-such-model", prompt_ids=[1])
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as ei:
        client.unload_model("no-such-model")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_resource_exhausted_and_cancel_frees(gated):
    engine, client = gated  # the worker is held: a is taken, b waits
    a = client.generate_stream(NAME, prompt_ids=[1, 2], max_new_tokens=400, ignore_eos=True)
    b = client.generate_stream(NAME, prompt_ids=[3, 4], max_new_tokens=400, ignore_eos=True)
    assert len(_wait_live(client, 2)) == 2
    with pytest.raises(grpc.RpcError) as ei:
        client.generate(NAME, prompt_ids=[5], max_new_tokens=2)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    a.cancel()
    b.cancel()
    assert _wait_idle(client, 5.0) == []  # both freed at once, while the worker is still held
    assert client.stats().cancelled == 2
    engine.gate.set()
    out = client.generate(NAME, prompt_ids=[5], max_new_tokens=3, ignore_eos=True)  # room again
    assert len(out["token_ids"]) == 3


def test_every_live_request_reaches_the_engine():
    """More live streams than gRPC's old fixed 32 handler threads: each one reaches the engine (none
    waits unseen inside gRPC) and the one past max_live_requests is refused at once."""
    from crosspool_jax.demo import demo_models

    m = demo_models()[NAME]
    engine = GatedEngine(max_live_requests=40)
    engine.add_model(NAME, m.config, m.weights, m.tokenizer)
    s = start_server(engine, port=0)
    try:
        with CrossPoolClient(s.address) as c:
            streams = [c.generate_stream(NAME, prompt_ids=[1, i + 2], max_new_tokens=50, ignore_eos=True)
                       for i in range(40)]
            assert len(_wait_live(c, 40)) == 40
            with pytest.raises(grpc.RpcError) as ei:
                c.generate(NAME, prompt_ids=[5], max_new_tokens=2, timeout=10)
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for st in streams:
                st.cancel()
            assert _wait_idle(c, 10.0) == []
    finally:
        engine.gate.set()
        s.stop(grace=0)


def test_deadline_stops_generation(gated):
    _engine, client = gated
    with pytest.raises(grpc.RpcError) as ei:
        client.generate(NAME, prompt_ids=[1, 2], max_new_tokens=400, ignore_eos=True, timeout=0.5)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_idle(client, 5.0) == []
    assert client.stats().cancelled == 1 and client.stats().completed == 0


def test_unload_with_live_stream_aborts_it(gated):
    _engine, client = gated
    s = client.generate_stream(NAME, prompt_ids=[1, 2], max_new_tokens=400, ignore_eos=True)
    assert len(_wait_live(client, 1)) == 1
    assert client.unload_model(NAME) == 1
    with pytest.raises(grpc.RpcError) as ei:
        list(s)
    assert ei.value.code() == grpc.StatusCode.ABORTED and "unloaded" in ei.value.details()
    assert client.list_models() == [] and client.stats().live_request_ids == []
    with pytest.raises(grpc.RpcError) as ei:
        client.load_model("x", "/nonexistent/dir")
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_auth_and_graceful_drain():
    s = start_server(demo_engine(max_live_requests=4, names=[NAME]), port=0, auth_token="s3cret")
    try:
        with CrossPoolClient(s.address) as anon:
            with pytest.raises(grpc.RpcError) as ei:
                anon.list_models()
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as ei:
                anon.generate(NAME, prompt_ids=[1])
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            hs = health_pb2_grpc.HealthStub(anon.channel)
            assert hs.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        with CrossPoolClient(s.address, auth_token="s3cret") as c:
            assert [m.name for m in c.list_models()] == [NAME]
            stream = c.generate_stream(NAME, prompt_ids=[1, 2], max_new_tokens=40, ignore_eos=True)
            got = [next(stream)]
            import threading

            t = threading.Thread(target=s.stop, args=(30.0,))
            t.start()
            got += list(stream)  # the live stream drains to its end
            t.join()
            assert len(got) == 40 and got[-1].finish_reason != 0
    finally:
        s.stop(grace=0)


def test_generated_code_is_fresh(tmp_path):
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "gen_protos.sh"), str(tmp_path)], check=True)
    for f in ("crosspool_pb2.py", "crosspool_pb2.pyi", "crosspool_pb2_grpc.py"):
        assert filecmp.cmp(
            tmp_path / "crosspool" / "v1" / f,
            os.path.join(ROOT, "serving", "crosspool", "v1", f),
            shallow=False,
        ), f"{f} differs: run scripts/gen_protos.sh"


def test_cli_generate_via_server(server, capsys):
    import json

    from serving.cli import main

    assert (
        main(
            [
                "generate",
                "--server",
                server.address,
                "--model",
                NAME,
                "--prompt",
                "hi",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(line["token_ids"]) <= 4 and line["finish_reason"] in ("stop", "length")
    assert main(["generate", "--server", server.address, "--model", "nope", "--prompt-ids", "1"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
