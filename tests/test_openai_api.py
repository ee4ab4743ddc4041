"""The OpenAI-compatible HTTP API (serving/openai_api.py), driven with the official `openai` client
against live servers on 127.0.0.1: one `PooledEngine` (mode crosspool 4+4 over the 8 virtual CPU
devices, one demo model) serving gRPC and HTTP at once, and engine-less servers (starting) for the
401 / 503 cases. The engine is held after a set number of steps where a test needs "a request is
live and holds KV pages" as a state rather than a race (as in tests/test_serving_pooled.py).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from crosspool_jax.demo import demo_models
from crosspool_jax.engine import EngineConfig, PooledEngine
from serving.client import CrossPoolClient
from serving.metrics import ServerMetrics
from serving.openai_api import StopText, render_chat
from serving.server import start_server

MODEL = "demo-mixtral"


class HeldEngine(PooledEngine):
    """`budget`: steps the worker may still run (None: no limit); at 0 it holds (cancels still run)."""

    budget: int | None = None

    def _step_groups(self) -> bool:
        if self.budget is not None and self.budget <= 0:
            return False
        busy = super()._step_groups()
        if busy and self.budget is not None:
            self.budget -= 1
        return busy


@pytest.fixture(scope="module")
def served():
    engine = HeldEngine(mode="crosspool", max_live_requests=2,
                        config=EngineConfig(arena_bytes=8 << 20, attention_backend="reference"))
    m = demo_models()[MODEL]
    engine.add_model(MODEL, m.config, m.weights, m.tokenizer, source="builtin-demo")
    metrics = ServerMetrics(engine)
    s = start_server(engine, port=0, metrics=metrics, http_port=0)
    client = openai.OpenAI(base_url=s.http.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with CrossPoolClient(s.address) as grpc_client:
        yield s, engine, client, grpc_client
    engine.budget = None
    s.stop(grace=0)


def _pages_used(engine) -> int:
    return sum(used for _dev, used, _total in engine.stats().kv_pages)


def _wait(pred, timeout=10.0) -> bool:
    end = time.time() + timeout
    while not pred() and time.time() < end:
        time.sleep(0.01)
    return pred()


def _grpc_text(grpc_client, **kw) -> tuple[str, list[int]]:
    rs = list(grpc_client.generate_stream(MODEL, timeout=60, **kw))
    return "".join(r.text for r in rs), [r.token_id for r in rs if r.token_id >= 0]


def test_models_and_health(served):
    s, _engine, client, _g = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(s.http.url + "/health", timeout=10) as r:
        assert r.status == 200 and json.load(r) == {"status": "ok"}


def test_completions_greedy_equal_grpc_streaming_and_not(served):
    _s, _engine, client, g = served
    want, ids = _grpc_text(g, prompt="hello", max_new_tokens=8)
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == len(ids)
    chunks = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    # prompt as token ids: the same request
    r2 = client.completions.create(model=MODEL, prompt=list(b"hello"), max_tokens=8, temperature=0)
    assert r2.choices[0].text == want


def test_chat_streaming_equals_non_streaming_and_grpc(served):
    _s, engine, client, g = served
    messages = [{"role": "user", "content": "hi"}]
    prompt = render_chat(engine.tokenizer(MODEL), MODEL, messages)
    assert prompt == "<|user|>\nhi\n<|assistant|>\n"
    want, _ids = _grpc_text(g, prompt=prompt, max_new_tokens=6)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings_and_stop_token_ids(served):
    _s, _engine, client, g = served
    text, ids = _grpc_text(g, prompt="abc", max_new_tokens=12, ignore_eos=True)
    # stop token ids (extension field stop_token_ids): ends on the first occurrence, that token counted
    stop_id = ids[3]
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0,
                                  extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == ids.index(stop_id) + 1
    # a stop string: the text before its first occurrence, finish_reason stop, streamed the same
    stop = text[4:6]
    if stop and "\ufffd" not in stop:
        r = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
        chunks = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0,
                                                stop=stop, stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_stop_text_holds_back_prefixes():
    st = StopText(("END",))
    assert st.push("abE") == ("ab", False)
    assert st.push("N") == ("", False)
    assert st.push("x") == ("ENx", False)
    assert st.push("yEN") == ("y", False)
    assert st.push("Dzz") == ("", True)


def test_errors_404_400(served):
    _s, _engine, client, _g = served
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "nope" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, n=2)
    assert "n=2" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="", max_tokens=2)


def test_disconnect_mid_stream_frees_pages_and_429(served):
    s, engine, client, _g = served
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=300, temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(4):
        next(it)
    engine.budget = 0  # hold the engine: from here only the disconnect can free the pages
    try:
        assert _wait(lambda: _pages_used(engine) > 0)
        assert len(engine.stats().live_request_ids) == 1
        # the engine takes 2 live requests: a second is accepted, a third is 429
        second = client.completions.create(model=MODEL, prompt="x", max_tokens=300, stream=True)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="y", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_exceeded"
        stream.close()  # the client goes away mid-stream
        second.close()
        assert _wait(lambda: not engine.stats().live_request_ids), engine.stats()
        assert _wait(lambda: _pages_used(engine) == 0), engine.stats()  # freed while the engine is held
    finally:
        engine.budget = None
    metrics = s.metrics.registry
    assert _wait(lambda: metrics.get_sample_value("crosspool_requests_cancelled_total",
                                                  {"model": MODEL}) >= 2)
    assert metrics.get_sample_value("crosspool_http_requests_total",
                                    {"path": "/v1/completions", "status": "429"}) == 1


def _status(url: str, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps({"model": MODEL, "prompt": "x"}).encode(),
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_sleep_and_wake_endpoints(served):
    s, engine, _client, _g = served
    for op, state in (("sleep", "sleeping"), ("wake", "resident")):
        req = urllib.request.Request(f"{s.http.url}/v1/models/{MODEL}/{op}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and json.load(r) == {"id": MODEL, "object": "model", "state": state}
        assert dict(engine.stats().model_states)[MODEL] == state
    req = urllib.request.Request(f"{s.http.url}/v1/models/{MODEL}/sleep?to_disk=true", data=b"",
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as ei:  # added from memory: no checkpoint to re-read
        urllib.request.urlopen(req, timeout=10)
    assert ei.value.code == 400 and "checkpoint" in json.load(ei.value)["error"]["message"]
    req = urllib.request.Request(f"{s.http.url}/v1/models/nope/sleep", data=b"", method="POST")
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=10)
    assert ei.value.code == 404


def test_401_and_503_while_starting_and_draining():
    s = start_server(None, port=0, auth_token="secret", http_port=0)
    try:
        bad = openai.OpenAI(base_url=s.http.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.body["message"] == "missing or wrong bearer token"
        good = openai.OpenAI(base_url=s.http.url + "/v1", api_key="secret", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:  # 503: the server is starting
            good.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 503 and "starting" in e.value.body["message"]
        with pytest.raises(urllib.error.HTTPError) as h:
            urllib.request.urlopen(s.http.url + "/health", timeout=10)
        assert h.value.code == 503
        s.refuse_new_calls()  # the drain
        code, body = _status(s.http.url + "/v1/completions", "secret")
        assert code == 503 and "shutting down" in body["error"]["message"]
    finally:
        s.stop(0)
    assert not s.http._thread.is_alive()


def test_http_port_in_use_is_refused_before_loading():
    s = start_server(None, port=0, http_port=0)
    try:
        with pytest.raises(OSError, match=r"--http-port: cannot listen on 127\.0\.0\.1:.*in use"):
            start_server(None, port=0, http_port=s.http.port)
    finally:
        s.stop(0)


def test_bench_replay_over_http(served):
    """`crosspool bench --api openai`'s replay path: the same records over the HTTP API finish with
    every token, as over gRPC."""
    from benchmarks.runner import Record, replay

    s, engine, _client, _g = served
    recs = {api: [Record(i, f"{api}-{i}", MODEL, 4, 3, 0.0) for i in range(2)] for api in ("grpc", "openai")}
    for api, rs in recs.items():
        out = replay(engine, s.address, rs, {MODEL: 258}, 0, api, 60, print, progress=False,
                     http_url=s.http.url if api == "openai" else None)
        assert out["live_after"] == 0
        assert [(r.outcome, len(r.token_s)) for r in rs] == [("finished", 3)] * 2, rs


def test_http_config_table(tmp_path):
    from serving.settings import SettingsError, build_settings, load_config

    cfg = tmp_path / "serve.toml"
    cfg.write_text('[http]\nport = 8000\nhost = "0.0.0.0"\n')
    s = build_settings(load_config(str(cfg)))
    assert (s.http_port, s.http_host) == (8000, "0.0.0.0")
    cfg.write_text("[http]\nprot = 1\n")
    with pytest.raises(SettingsError, match=r"unknown key 'http\.prot'"):
        load_config(str(cfg))


def test_request_limits_apply_over_http(served):
    """The gRPC server's request limits (serving/limits.py) refuse over HTTP too: 400 naming the
    limit, nothing queued."""
    import dataclasses as dc

    s, engine, client, _g = served
    before = s.servicer.limits
    s.servicer.limits = dc.replace(before, max_prompt_tokens=4, max_stop_string_bytes=3)
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="a prompt of more than four tokens",
                                      max_tokens=2)
        assert "max_prompt_tokens" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stop=["long stop"])
        assert "max_stop_string_bytes" in e.value.body["message"]
    finally:
        s.servicer.limits = before
    assert _pages_used(engine) == 0
