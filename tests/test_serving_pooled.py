"""The behaviours of issue 6 item 4 on the pooled engine: a real server on 127.0.0.1 over
`PooledEngine` in mode crosspool on the 8 virtual CPU devices (4 KV + 4 weights), two demo models.

The engine is a `HeldEngine`: the test can let its worker run a given number of steps and then hold
it (it keeps handling cancels and unloads, it only stops stepping), so "a request is live and holds
KV pages" is a state the test sets up, not a race. One module-scoped server: the tests run in file
order and the last one drains and stops it. Shapes stay in the same few buckets (short prompts,
few tokens) so only a handful of step programs are compiled.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import jax
import jax.numpy as jnp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crosspool_jax.demo import demo_models
from crosspool_jax.engine import EngineConfig, PooledEngine
from crosspool_jax.models.reference import ReferenceGenerator
from serving.client import CrossPoolClient
from serving.metrics import ServerMetrics, start_metrics_http
from serving.server import start_server

A, B = "demo-mixtral", "demo-qwen3-moe"
MODELS = demo_models()


class HeldEngine(PooledEngine):
    """`budget`: steps the worker may still run (None: no limit). At 0 it holds: no step runs, but
    the inbox (cancels, unloads) is still drained, so their pages are freed."""

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
    engine = HeldEngine(
        mode="crosspool",
        max_live_requests=2,
        config=EngineConfig(arena_bytes=8 << 20, attention_backend="reference"),
    )
    for name in (A, B):
        m = MODELS[name]
        engine.add_model(name, m.config, m.weights, m.tokenizer, source="builtin-demo")
    metrics = ServerMetrics(engine)
    s = start_server(engine, port=0, metrics=metrics)
    httpd, maddr = start_metrics_http(metrics, 0)
    with CrossPoolClient(s.address) as c:
        yield s, engine, c, f"http://{maddr}/metrics"
    engine.budget = None
    httpd.shutdown()
    s.stop(grace=0)


def _pages_used(client) -> int:
    return sum(k.pages_used for k in client.stats().kv_pages)


def _wait(pred, timeout=10.0) -> bool:
    end = time.time() + timeout
    while not pred() and time.time() < end:
        time.sleep(0.01)
    return pred()


def _reference(name: str, prompt: list[int], n: int) -> list[int]:
    m = MODELS[name]
    w = jax.tree.map(lambda a: a.astype(jnp.float32), m.weights)  # the engine's CPU arena is f32
    return list(ReferenceGenerator(m.config, w).generate(prompt, n).token_ids)


# steps until a request's first token streams: the prefill's step dispatches it, the next step reads
# it (the engine reads a step's tokens after dispatching the next: host work overlaps device work)
FIRST_TOKEN_STEPS = 2


def _held_after_first_token(engine, stream):
    """With `engine.budget = FIRST_TOKEN_STEPS`: the first token streams (a decode call is then in
    flight), then the engine holds."""
    first = next(stream)
    assert _wait(lambda: engine.budget == 0)
    return first


def test_stats_describe_the_pooled_engine(served):
    _s, engine, client, _url = served
    st = client.stats()
    assert st.mode == "crosspool"
    assert st.topology.startswith("mode crosspool: 4+4 (kv: 0,1,2,3; weights: 4,5,6,7)")
    assert [k.device for k in st.kv_pages] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert all(k.pages_used == 0 and k.pages_free == k.pages_total > 0 for k in st.kv_pages)
    assert st.preemptions == 0 and list(st.models) == [A, B]
    assert [w.model for w in st.weights] == [A, B]
    for w in st.weights:
        assert w.bytes == w.attention_bytes + w.ffn_bytes == engine.weights_bytes(w.model) > 0


def test_generate_equals_reference_and_frees_pages(served):
    _s, _engine, client, _url = served
    resps = list(client.generate_stream(A, prompt_ids=[5, 9, 33, 7], max_new_tokens=8, ignore_eos=True,
                                        timeout=120))
    assert [r.index for r in resps] == list(range(8)) and resps[-1].finish_reason != 0
    assert [r.token_id for r in resps] == _reference(A, [5, 9, 33, 7], 8)
    assert resps[-1].usage.completion_tokens == 8
    assert _wait(lambda: _pages_used(client) == 0) and client.stats().live_request_ids == []


def test_metrics_agree_with_getstats(served):
    _s, _engine, client, url = served
    st = client.stats()
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    m = {}
    for fam in text_string_to_metric_families(body):
        for sm in fam.samples:
            m[(sm.name, tuple(sorted(sm.labels.items())))] = sm.value
    for k in st.kv_pages:
        assert m[("crosspool_kv_pages_used", (("device", k.device),))] == k.pages_used
        assert m[("crosspool_kv_pages_free", (("device", k.device),))] == k.pages_free
    for w in st.weights:
        assert m[("crosspool_weights_bytes", (("model", w.model),))] == w.bytes
    assert m[("crosspool_preemptions_total", ())] == st.preemptions
    assert m[("crosspool_step_programs_compiled_total", ())] == st.programs_compiled
    assert m[("crosspool_engine_info", (("mode", "crosspool"), ("topology", st.topology)))] == 1
    assert m[("crosspool_queue_depth", ())] == st.queue_depth + st.running == 0


@pytest.mark.parametrize(
    "kw",
    [
        dict(prompt_ids=[]),
        dict(prompt_ids=[1] * 600),
        dict(prompt_ids=[1, 2], temperature=-1.0),
        dict(prompt_ids=[1, 2], top_p=1.5),
        dict(prompt_ids=[1, 2], max_new_tokens=-1),
        dict(prompt_ids=[9999]),
    ],
)
def test_invalid_argument(served, kw):
    _s, _engine, client, _url = served
    with pytest.raises(grpc.RpcError) as ei:
        client.generate(A, **kw)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_not_found(served):
    _s, _engine, client, _url = served
    with pytest.raises(grpc.RpcError) as ei:
        client.generate("no-such-model", prompt_ids=[1])
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as ei:
        client.unload_model("no-such-model")
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_resource_exhausted_then_cancel(served):
    _s, engine, client, _url = served
    engine.budget = 0  # held: the two requests stay live, neither starts
    a = client.generate_stream(A, prompt_ids=[1, 2], max_new_tokens=200, ignore_eos=True)
    b = client.generate_stream(A, prompt_ids=[3, 4], max_new_tokens=200, ignore_eos=True)
    assert _wait(lambda: len(client.stats().live_request_ids) == 2)
    st = client.stats()
    assert (st.queue_depth, st.running) == (2, 0)  # waiting: the planner has not admitted them
    with pytest.raises(grpc.RpcError) as ei:
        client.generate(A, prompt_ids=[5], max_new_tokens=2)
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    cancelled = client.stats().cancelled
    a.cancel()
    b.cancel()
    assert _wait(lambda: client.stats().live_request_ids == [], 5.0)
    assert client.stats().cancelled == cancelled + 2 and _pages_used(client) == 0
    engine.budget = None


def test_cancel_frees_pages_at_once(served):
    _s, engine, client, _url = served
    engine.budget = FIRST_TOKEN_STEPS
    stream = client.generate_stream(A, prompt_ids=[1, 2, 3], max_new_tokens=200, ignore_eos=True)
    _held_after_first_token(engine, stream)
    st = client.stats()
    assert sum(k.pages_used for k in st.kv_pages) > 0 and len(st.live_request_ids) == 1
    assert (st.queue_depth, st.running) == (0, 1)
    stream.cancel()
    # freed by the cancel itself: the engine is still held, so the request cannot have finished
    assert _wait(lambda: _pages_used(client) == 0 and client.stats().live_request_ids == [], 5.0)
    assert engine.budget == 0
    engine.budget = None


def test_deadline_stops_generation_and_frees_pages(served):
    _s, engine, client, _url = served
    engine.budget = FIRST_TOKEN_STEPS
    cancelled = client.stats().cancelled
    stream = client.generate_stream(A, prompt_ids=[1, 2, 3], max_new_tokens=200, ignore_eos=True, timeout=1.5)
    with pytest.raises(grpc.RpcError) as ei:
        list(stream)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait(lambda: _pages_used(client) == 0 and client.stats().live_request_ids == [], 5.0)
    assert client.stats().cancelled == cancelled + 1
    engine.budget = None


def test_sleep_and_wake_over_grpc(served):
    """SleepModel / WakeModel; GetStats and the metrics show the state; sleep is refused while the
    model has a live request; after the wake the model's tokens equal the reference."""
    _s, engine, client, url = served
    engine.budget = None
    assert client.sleep_model(A) == "sleeping"
    assert {m.model: m.state for m in client.stats().model_states} == {A: "sleeping", B: "resident"}
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    assert f'crosspool_model_state{{model="{A}",state="sleeping"}} 1.0' in body
    assert client.wake_model(A) == "resident"
    with pytest.raises(grpc.RpcError) as ei:  # added from memory: nothing to re-read from disk
        client.sleep_model(A, to_disk=True)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "checkpoint" in ei.value.details()
    engine.budget = FIRST_TOKEN_STEPS
    stream = client.generate_stream(A, prompt_ids=[5, 9, 33, 7], max_new_tokens=200, ignore_eos=True)
    _held_after_first_token(engine, stream)
    with pytest.raises(grpc.RpcError) as ei:
        client.sleep_model(A)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "live requests" in ei.value.details()
    stream.cancel()
    engine.budget = None
    assert _wait(lambda: _pages_used(client) == 0 and client.stats().live_request_ids == [], 10.0)
    out = client.generate(A, prompt_ids=[5, 9, 33, 7], max_new_tokens=8, ignore_eos=True, timeout=120)
    assert out["token_ids"] == _reference(A, [5, 9, 33, 7], 8)


def test_unload_with_a_live_request_aborts_it(served):
    _s, engine, client, _url = served
    engine.budget = FIRST_TOKEN_STEPS
    stream = client.generate_stream(B, prompt_ids=[6, 10, 33], max_new_tokens=200, ignore_eos=True)
    _held_after_first_token(engine, stream)
    assert _pages_used(client) > 0
    assert client.unload_model(B) == 1
    with pytest.raises(grpc.RpcError) as ei:
        list(stream)
    assert ei.value.code() == grpc.StatusCode.ABORTED and "unloaded" in ei.value.details()
    assert _wait(lambda: _pages_used(client) == 0, 5.0)
    st = client.stats()
    assert list(st.models) == [A] and [w.model for w in st.weights] == [A] and st.live_request_ids == []
    engine.budget = None
    # the other model still serves
    out = client.generate(A, prompt_ids=[5, 9, 33, 7], max_new_tokens=8, ignore_eos=True, timeout=120)
    assert out["token_ids"] == _reference(A, [5, 9, 33, 7], 8)


def test_graceful_drain_finishes_the_live_stream(served):
    """Last: stops the server. A stream that is live when stop(grace) begins runs to its end; a new
    call during the drain is refused."""
    s, engine, client, _url = served
    engine.budget = FIRST_TOKEN_STEPS
    stream = client.generate_stream(A, prompt_ids=[5, 9, 33, 7], max_new_tokens=8, ignore_eos=True,
                                    timeout=120)
    got = [_held_after_first_token(engine, stream)]
    t = threading.Thread(target=s.stop, args=(60.0,))
    t.start()

    def refused() -> bool:
        try:
            client.list_models()
        except grpc.RpcError:
            return True
        return False

    assert _wait(refused)  # new calls are refused from now on ...
    with pytest.raises(grpc.RpcError):
        client.generate(A, prompt_ids=[1], max_new_tokens=2, timeout=10)
    assert t.is_alive()  # ... while stop() waits for the live stream
    engine.budget = None  # the held stream continues inside the grace period
    got += list(stream)
    t.join()
    assert [r.token_id for r in got] == _reference(A, [5, 9, 33, 7], 8) and got[-1].finish_reason != 0
    assert sum(used for _, used, _ in engine.stats().kv_pages) == 0
