"""ReferenceEngine alone: streaming equals the reference path, queue bound, cancel, unload, shutdown."""

from __future__ import annotations

import pytest

from crosspool_jax.demo import demo_models
from crosspool_jax.engine_api import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineClosedError,
    ModelNotFoundError,
    QueueFullError,
    ReferenceEngine,
    make_request,
)
from crosspool_jax.errors import InvalidRequestError
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.models.reference import ReferenceGenerator

NAME = "demo-mixtral"


@pytest.fixture(scope="module")
def model():
    return demo_models()[NAME]


@pytest.fixture
def engine(model):
    e = ReferenceEngine(max_live_requests=2)
    e.add_model(NAME, model.config, model.weights, model.tokenizer)
    yield e
    e.shutdown(timeout=0)


def test_stream_matches_reference(engine, model):
    prompt = model.tokenizer.encode("hello")
    for sampling in (SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=7)):
        evs = list(engine.submit(make_request(NAME, prompt, 12, sampling)))
        ref = ReferenceGenerator(model.config, model.weights).generate(prompt, 12, sampling)
        assert [e.token_id for e in evs] == list(ref.token_ids)
        assert [e.index for e in evs] == list(range(12))
        assert all(not e.final for e in evs[:-1]) and evs[-1].finish_reason == FINISH_LENGTH
        assert evs[-1].usage.prompt_tokens == len(prompt) and evs[-1].usage.completion_tokens == 12
        assert [e.timestamp for e in evs] == sorted(e.timestamp for e in evs)
        assert "".join(e.text for e in evs) == model.tokenizer.decode(ref.token_ids)
    # a stop token ends the stream with "stop"
    first = list(engine.submit(make_request(NAME, prompt, 12)))[2].token_id
    evs = list(engine.submit(make_request(NAME, prompt, 12, stop_token_ids=[first])))
    assert evs[-1].finish_reason == FINISH_STOP and evs[-1].token_id == first
    assert engine.stats().live_request_ids == ()


def test_bad_requests(engine, model):
    with pytest.raises(ModelNotFoundError):
        engine.submit(make_request("nope", [1, 2], 4))
    with pytest.raises(InvalidRequestError):
        engine.submit(make_request(NAME, [], 4))
    with pytest.raises(InvalidRequestError):
        engine.submit(make_request(NAME, [1] * model.config.max_position_embeddings, 4))
    with pytest.raises(InvalidRequestError):
        engine.submit(make_request(NAME, [999], 4))


def test_queue_full_cancel_and_unload(engine):
    a = engine.submit(make_request(NAME, [1, 2, 3], 400))
    b = engine.submit(make_request(NAME, [4, 5, 6], 400))
    with pytest.raises(QueueFullError):
        engine.submit(make_request(NAME, [7], 4))
    assert set(engine.stats().live_request_ids) == {a.request_id, b.request_id}
    first = a.next_event(timeout=60)  # a is running
    assert first is not None and not first.final
    assert engine.cancel(a.request_id)
    assert a.request_id not in engine.stats().live_request_ids  # freed at once
    assert not engine.cancel(a.request_id)
    last = list(a)[-1]
    assert last.finish_reason == FINISH_CANCELLED and last.usage.completion_tokens >= 0
    # unloading fails the live request with a clear error, never hangs it
    assert engine.unload_model(NAME) == 1
    evs = list(b)
    assert evs[-1].finish_reason == FINISH_ERROR and "unloaded" in evs[-1].error
    st = engine.stats()
    assert st.live_request_ids == () and st.models == () and st.cancelled == 1 and st.failed == 1
    with pytest.raises(ModelNotFoundError):
        engine.unload_model(NAME)


def test_shutdown_fails_leftovers_and_refuses_new(model):
    e = ReferenceEngine(max_live_requests=4)
    e.add_model(NAME, model.config, model.weights, model.tokenizer)
    h = e.submit(make_request(NAME, [1, 2], 400))
    e.shutdown(timeout=0)
    assert list(h)[-1].finish_reason == FINISH_ERROR
    with pytest.raises(EngineClosedError):
        e.submit(make_request(NAME, [1, 2], 4))
