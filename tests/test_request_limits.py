"""Issue 22: what one request can cost the server.

- every limit of `serving.limits.RequestLimits` refused with INVALID_ARGUMENT naming it, before
  anything is queued (a reference-engine server whose `submit` counts calls: no compile, no token);
- malformed request bytes on every crosspool.v1 method: INVALID_ARGUMENT (a raw channel);
- the limits from the config file and the flags, and the GetStats size check;
- the pooled engine: stop ids of every count 1..max_stop_ids compile no program (one stop width),
  one more is refused; a cancel, and an unload, during a compile of the request's step program free
  its pages at once (the compile blocked on an event).
"""

from __future__ import annotations

import textwrap
import threading
import time

import grpc
import jax
import jax.numpy as jnp
import pytest

from crosspool_jax.demo import demo_models
from crosspool_jax.engine import EngineConfig, PooledEngine
from crosspool_jax.engine_api import FINISH_CANCELLED, FINISH_ERROR, make_request
from crosspool_jax.errors import InvalidRequestError
from crosspool_jax.models.reference import ReferenceGenerator
from serving.cli import build_parser, serve_settings
from serving.client import CrossPoolClient
from serving.crosspool.v1 import crosspool_pb2 as pb
from serving.limits import RequestLimits, check_generate
from serving.server import SERVICE_NAME, demo_engine, start_server
from serving.settings import SettingsError, build_settings, load_config

A = "demo-mixtral"
MODELS = demo_models()
SMALL = RequestLimits(max_request_id_bytes=16, max_model_name_bytes=24, max_path_bytes=32,
                      max_prompt_bytes=64, max_prompt_tokens=12, max_new_tokens=40,
                      max_stop_token_ids=4, max_stop_strings=2, max_stop_string_bytes=8)


# ---- the limits on the wire (reference engine: nothing here generates) -----------------------------


@pytest.fixture(scope="module")
def served():
    engine = demo_engine(max_live_requests=4, names=[A])
    submitted = []
    real_submit = engine.submit

    def counting_submit(request):
        submitted.append(request)
        return real_submit(request)

    engine.submit = counting_submit
    s = start_server(engine, port=0, limits=SMALL)
    with CrossPoolClient(s.address) as c:
        yield s, c, submitted
    s.stop(grace=0)


def _refused(call) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    return e.value.details()


def _gen(c, **kw):
    return lambda: list(c.generate_stream(kw.pop("model", A), timeout=10, **kw))


@pytest.mark.parametrize("field, kw, words", [
    ("max_request_id_bytes", {"request_id": "r" * 17, "prompt_ids": [1]}, "request_id is 17 bytes"),
    ("max_model_name_bytes", {"model": "m" * 25, "prompt_ids": [1]}, "the model name is 25 bytes"),
    ("max_prompt_bytes", {"prompt": "é" * 33}, "the prompt text is 66 bytes"),
    ("max_prompt_tokens", {"prompt_ids": [1] * 13}, "prompt_ids is 13 tokens"),
    ("max_prompt_tokens", {"prompt": "x" * 13}, "the prompt is 13 tokens"),  # once tokenized
    ("max_new_tokens", {"prompt_ids": [1], "max_new_tokens": 41}, "max_new_tokens is 41 tokens"),
    ("max_stop_token_ids", {"prompt_ids": [1], "stop_token_ids": [1, 2, 3, 4, 5]},
     "stop_token_ids is 5 ids"),
])
def test_each_generate_limit_is_refused_before_anything_is_queued(served, field, kw, words):
    _s, c, submitted = served
    before = c.stats()
    msg = _refused(_gen(c, **kw))
    limit = getattr(SMALL, field)
    assert msg == f"{words}; the limit is {limit} ({field})"
    after = c.stats()
    assert not submitted and list(after.live_request_ids) == []
    assert (after.completed, after.failed, after.cancelled) == (before.completed, before.failed,
                                                                before.cancelled)


def test_model_calls_and_a_megabyte_request_id_are_refused(served):
    s, c, submitted = served
    assert _refused(lambda: c.load_model("n" * 25, "/x")).endswith("(max_model_name_bytes)")
    assert _refused(lambda: c.load_model("n", "/" + "p" * 40)) == (
        "the path is 41 bytes; the limit is 32 (max_path_bytes)")
    assert _refused(lambda: c.unload_model("n" * 25)).endswith("(max_model_name_bytes)")
    assert [m.name for m in c.list_models()] == [A]
    # the fault test's 1 MB id (default limits: 128 bytes); GetStats stays small
    s.servicer.limits = RequestLimits()
    try:
        msg = _refused(_gen(c, request_id="r" * (1 << 20), prompt_ids=[1]))
        assert msg == "request_id is 1048576 bytes; the limit is 128 (max_request_id_bytes)"
    finally:
        s.servicer.limits = SMALL
    assert not submitted and c.stats().ByteSize() < 1024


def test_stop_strings_for_other_front_ends():
    check_generate(SMALL, model=A, stop_strings=["ab", "12345678"])
    with pytest.raises(InvalidRequestError, match=r"^the stop strings is 3 strings; the limit is 2 "):
        check_generate(SMALL, model=A, stop_strings=["a", "b", "c"])
    with pytest.raises(InvalidRequestError, match=r"^a stop string is 9 bytes; .*\(max_stop_string_bytes\)$"):
        check_generate(SMALL, model=A, stop_strings=["123456789"])


def test_malformed_bytes_on_every_method_are_invalid_argument(served):
    s, _c, submitted = served
    bad = b"\x0a\x05ab"  # field 1, length 5, only 2 bytes follow: no message type parses it
    with grpc.insecure_channel(s.address) as ch:
        for method in ("Generate", "ListModels", "LoadModel", "UnloadModel", "GetStats"):
            path = f"/{SERVICE_NAME}/{method}"
            if method == "Generate":
                call = ch.unary_stream(path, request_serializer=None, response_deserializer=None)
                msg = _refused(lambda call=call: list(call(bad, timeout=10)))
            else:
                call = ch.unary_unary(path, request_serializer=None, response_deserializer=None)
                msg = _refused(lambda call=call: call(bad, timeout=10))
            assert msg.startswith(f"malformed crosspool.v1.{method}Request: 4 bytes that do not parse"), msg
        # well-formed raw bytes still reach the servicer
        raw = ch.unary_unary(f"/{SERVICE_NAME}/ListModels", request_serializer=None,
                             response_deserializer=None)(b"", timeout=10)
        assert [m.name for m in pb.ListModelsResponse.FromString(raw).models] == [A]
    assert not submitted


# ---- the limits in the settings ----------------------------------------------------------------------


def test_limits_from_the_config_file_and_flags(tmp_path):
    path = tmp_path / "serve.toml"
    path.write_text(textwrap.dedent("""
        [limits]
        max_request_id_bytes = 64
        max_prompt_bytes = "2MiB"
        max_stop_token_ids = 8
        """))
    args = build_parser().parse_args(["serve", "--config", str(path), "--max-stop-token-ids", "12",
                                      "--max-path-bytes", "1KiB"])
    lim = serve_settings(args).request_limits()
    assert (lim.max_request_id_bytes, lim.max_prompt_bytes, lim.max_stop_token_ids, lim.max_path_bytes) == (
        64, 2 << 20, 12, 1024)
    assert lim.max_prompt_tokens == RequestLimits().max_prompt_tokens
    path.write_text("[limits]\nmax_stop_ids = 3\n")
    with pytest.raises(SettingsError, match=r"unknown key 'limits.max_stop_ids' \(known: max_request_id"):
        load_config(str(path))
    with pytest.raises(SettingsError, match=r"--max-stop-token-ids: must be an integer, got 'x'"):
        serve_settings(build_parser().parse_args(["serve", "--max-stop-token-ids", "x"]))
    # GetStats lists every live id: max_live_requests x max_request_id_bytes stays under 1 MiB
    with pytest.raises(SettingsError, match=r"max_live_requests \(10000\) x max_request_id_bytes \(128\)"):
        build_settings({"max_live_requests": 10000})


# ---- the pooled engine: one stop width; pages freed during a compile --------------------------------


@pytest.fixture(scope="module")
def pooled():
    eng = PooledEngine(mode="crosspool", pools="1+1", max_live_requests=4,
                       config=EngineConfig(arena_bytes=8 << 20, attention_backend="reference",
                                           max_stop_ids=16))
    group = eng.groups[0]
    group.warm_programs = 0  # every program this test needs compiles on the serving path, counted
    group.fallback = False
    m = MODELS[A]
    eng.add_model(A, m.config, m.weights, m.tokenizer)
    yield eng, group
    eng.shutdown(timeout=0)


def _reference(prompt: list[int], n: int) -> list[int]:
    m = MODELS[A]
    w = jax.tree.map(lambda a: a.astype(jnp.float32), m.weights)  # the CPU arena is f32
    return list(ReferenceGenerator(m.config, w).generate(prompt, n).token_ids)


def _tokens(handle) -> list[int]:
    evs = list(handle.events())
    assert evs[-1].finish_reason == "length", evs[-1]
    return [e.token_id for e in evs if e.token_id is not None]


def _pages_used(eng) -> int:
    return sum(used for _dev, used, _total in eng.stats().kv_pages)


PROMPT = [5, 9, 33, 7]


def test_no_stop_id_count_compiles_a_program(pooled):
    eng, group = pooled
    want = _reference(PROMPT, 8)
    unused = [t for t in range(MODELS[A].config.vocab_size) if t not in want][:16]
    assert _tokens(eng.submit(make_request(A, PROMPT, 8, stop_token_ids=unused[:1]))) == want
    built, background, held = group.programs_built, group.background_built, set(group._programs)
    assert built > 0 and {ln.stop_width for sp in held for ln in sp.lanes} == {16}
    for n in range(2, 17):
        assert _tokens(eng.submit(make_request(A, PROMPT, 8, stop_token_ids=unused[:n]))) == want, n
    assert (group.programs_built, group.background_built, set(group._programs)) == (
        built, background, held)
    # one more than the programs take: refused before anything is queued
    with pytest.raises(InvalidRequestError, match=r"^17 stop token ids; the step programs take at most "
                                                  r"16 \(max_stop_ids\)$"):
        eng.submit(make_request(A, PROMPT, 8, stop_token_ids=list(range(17))))
    assert eng.stats().live_request_ids == () and group.running_count() == 0


def _blocked_compiles(monkeypatch, group):
    """Makes the group's next program build wait on `gate`; `entered` is set when one is waiting."""
    gate, entered = threading.Event(), threading.Event()
    real = group._compile_aot

    def blocked(spec):
        entered.set()
        assert gate.wait(120)
        return real(spec)

    monkeypatch.setattr(group, "_compile_aot", blocked)
    group._programs.clear()  # the next request's programs compile again (the persistent cache helps)
    return gate, entered


def test_a_cancel_during_a_compile_frees_the_pages_at_once(pooled, monkeypatch):
    eng, group = pooled
    gate, entered = _blocked_compiles(monkeypatch, group)
    try:
        h = eng.submit(make_request(A, PROMPT, 8))
        assert entered.wait(60)  # the worker is compiling the request's prefill program
        assert _pages_used(eng) > 0
        t0 = time.perf_counter()
        assert h.cancel()
        assert _pages_used(eng) == 0 and time.perf_counter() - t0 < 1.0  # not after the compile
        assert not gate.is_set() and [e.finish_reason for e in h.events()] == [FINISH_CANCELLED]
    finally:
        gate.set()
    # the call compiled meanwhile ran on freed pages; nothing else was disturbed
    assert _tokens(eng.submit(make_request(A, PROMPT, 8))) == _reference(PROMPT, 8)
    assert _pages_used(eng) == 0


def test_an_unload_during_a_compile_frees_the_pages_at_once(pooled, monkeypatch):
    eng, group = pooled
    gate, entered = _blocked_compiles(monkeypatch, group)
    try:
        h = eng.submit(make_request(A, PROMPT, 8))
        assert entered.wait(60)
        assert _pages_used(eng) > 0
        assert eng.unload_model(A) == 1
        assert _pages_used(eng) == 0 and not gate.is_set()
        evs = list(h.events())
        assert evs[-1].finish_reason == FINISH_ERROR and "unloaded" in evs[-1].error
    finally:
        gate.set()
    deadline = time.time() + 60
    while A in group.geoms and time.time() < deadline:  # the worker removes the weights after its step
        time.sleep(0.01)
    assert A not in group.geoms and eng.stats().live_request_ids == () and _pages_used(eng) == 0
