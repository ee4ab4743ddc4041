"""The crosspool.v1 gRPC server over an `EngineInterface` (crosspool_jax.engine_api).

Status codes: unknown model NOT_FOUND; bad sampling parameters, empty or too-long prompt
INVALID_ARGUMENT (max_new_tokens < 1 included: the engine's own check, as in the local path), and so
is a request past one of the request limits (serving/limits.py, checked before anything is queued; the
message names the limit) or request bytes that do not parse (`add_servicer`); too many
live requests RESOURCE_EXHAUSTED; a model unloaded under a live stream ABORTED; missing/wrong bearer
token (when a token is configured) UNAUTHENTICATED; the server starting (no engine yet) or shutting
down UNAVAILABLE, with a message that says so. A client cancel or deadline cancels the engine request
at once. The standard grpc.health.v1 and reflection services are registered. With a certificate and
key the port speaks TLS only (serving/tls.py).

Life cycle: `start_server(None, ...)` binds the port first (a port in use is an OSError "cannot
listen on HOST:PORT: address already in use"; SO_REUSEPORT is off, so a second server can never
share the port) with health NOT_SERVING, while the engine is built and warmed up;
`RunningServer.set_ready(engine)` then flips health to SERVING. `RunningServer.stop(grace)` marks
NOT_SERVING, refuses new calls (health checks still answer), lets live streams finish for `grace`
seconds and ends those left with UNAVAILABLE ("the server is shutting down; the request was not
finished"). `serve_forever` blocks until SIGINT/SIGTERM, logs the drain, and exits at once on a
second signal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hmac
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crosspool_jax.engine_api import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineClosedError,
    ModelInfo,
    ModelNotFoundError,
    QueueFullError,
    ReferenceEngine,
    make_request,
)
from crosspool_jax.errors import CrossPoolError, InvalidRequestError, UnavailableError
from crosspool_jax.execution.sampling import SamplingParams
from serving.client import DEFAULT_MAX_NEW_TOKENS, SERVER_SHUTTING_DOWN, SERVER_STARTING
from serving.crosspool.v1 import crosspool_pb2 as pb
from serving.crosspool.v1 import crosspool_pb2_grpc as pb_grpc
from serving.limits import RequestLimits, check_generate, check_model_call, check_request, check_text
from serving.stats import snapshot

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CrossPool"].full_name
_FINISH = {FINISH_STOP: pb.FINISH_REASON_STOP, FINISH_LENGTH: pb.FINISH_REASON_LENGTH}
# what the client is told (UNAVAILABLE) while the server starts, and when it shuts down
STARTING_MESSAGE = f"{SERVER_STARTING} (loading models); retry when its health check says SERVING"
REFUSED_MESSAGE = f"{SERVER_SHUTTING_DOWN}; it takes no new requests"
CUT_OFF_MESSAGE = f"{SERVER_SHUTTING_DOWN}; the request was not finished"
# the error ReferenceEngine.shutdown (and so PooledEngine's) gives the requests it fails
_ENGINE_SHUTDOWN_ERROR = "the engine shut down before the request finished"
# after the drain, what the streams the engine failed get to send their status before gRPC cancels them
_ABORT_GRACE = 1.0


def _info_pb(m: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(**dataclasses.asdict(m))


class CrossPoolServicer(pb_grpc.CrossPoolServicer):
    """Maps crosspool.v1 calls onto the engine. `engine` None: the server is starting; every call
    answers UNAVAILABLE (STARTING_MESSAGE) until `engine` is set. `draining`: the server is shutting
    down; every new call answers UNAVAILABLE (REFUSED_MESSAGE) while live streams finish (the health
    service, separate, still answers: NOT_SERVING)."""

    def __init__(self, engine: Any, metrics: Any = None, limits: RequestLimits | None = None):
        self.engine = engine
        self.metrics = metrics  # serving.metrics.ServerMetrics or None
        self.limits = limits or RequestLimits()  # checked before anything is queued
        self.draining = False

    def _engine(self, context: grpc.ServicerContext) -> Any:
        """The engine, or the call aborted with UNAVAILABLE while the server starts or drains."""
        engine = self.engine
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED_MESSAGE)
        if engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, STARTING_MESSAGE)
        return engine

    def _abort(self, context: grpc.ServicerContext, e: Exception) -> None:
        code = grpc.StatusCode.INTERNAL
        if isinstance(e, ModelNotFoundError):
            code = grpc.StatusCode.NOT_FOUND
        elif isinstance(e, InvalidRequestError):
            code = grpc.StatusCode.INVALID_ARGUMENT
        elif isinstance(e, QueueFullError):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        elif isinstance(e, EngineClosedError):
            context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED_MESSAGE)
        elif isinstance(e, UnavailableError):
            code = grpc.StatusCode.UNAVAILABLE
        elif isinstance(e, CrossPoolError | OSError):
            code = grpc.StatusCode.FAILED_PRECONDITION
        context.abort(code, " ".join(str(e).split()) or type(e).__name__)

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        t0 = time.monotonic()
        engine = self._engine(context)
        try:
            engine_req = self._to_engine_request(engine, request)
            handle = engine.submit(engine_req)
        except CrossPoolError as e:
            self._abort(context, e)
            return
        m, model = self.metrics, request.model
        last_sent: float | None = None  # when the previous token was handed to gRPC
        ended = False  # finished (stop/length/error) rather than cancelled
        # a client cancel or deadline ends the RPC; the engine request goes with it, at once
        context.add_callback(lambda: engine.cancel(handle.request_id))
        try:
            while True:
                ev = handle.next_event(timeout=0.1)
                if ev is None:
                    if not context.is_active():
                        engine.cancel(handle.request_id)
                        return
                    continue
                if ev.finish_reason == FINISH_ERROR:
                    ended = True
                    if m is not None:
                        m.finish(model, FINISH_ERROR)
                    err = ev.error or "the request failed"
                    if err == _ENGINE_SHUTDOWN_ERROR:  # the drain's grace ran out (or the engine stopped)
                        context.abort(grpc.StatusCode.UNAVAILABLE, CUT_OFF_MESSAGE)
                    # the pooled engine's planner refuses a request whose KV could never fit its pool
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED if err.startswith("rejected:") else (
                        grpc.StatusCode.ABORTED)
                    context.abort(code, err)
                if ev.finish_reason == FINISH_CANCELLED:
                    return
                resp = pb.GenerateResponse(
                    request_id=ev.request_id,
                    index=max(ev.index, 0),
                    token_id=ev.token_id if ev.token_id is not None else -1,
                    text=ev.text,
                    timestamp_unix_nanos=int(ev.timestamp * 1e9),
                )
                if ev.final:
                    resp.finish_reason = _FINISH[ev.finish_reason]
                    u = ev.usage
                    resp.usage.CopyFrom(
                        pb.Usage(
                            prompt_tokens=u.prompt_tokens,
                            completion_tokens=u.completion_tokens,
                            total_tokens=u.total_tokens,
                        )
                    )
                if m is not None and ev.token_id is not None:
                    now = time.monotonic()
                    if last_sent is None:
                        m.first_token(model, now - t0)
                    else:
                        m.token_gap(model, now - last_sent)
                    last_sent = now
                if ev.final:
                    ended = True
                    if m is not None:
                        m.finish(model, ev.finish_reason)
                yield resp
                if ev.final:
                    return
        finally:
            if m is not None and not ended:
                m.cancel(model)

    def _to_engine_request(self, engine: Any, r: pb.GenerateRequest) -> Any:
        check_text(r.model, "the model name", self.limits.max_model_name_bytes, "max_model_name_bytes")
        models = {m.name: m for m in engine.list_models()}
        if r.model not in models:
            raise ModelNotFoundError(
                f"model {r.model!r} is not loaded (loaded: {', '.join(models) or 'none'})"
            )
        if r.prompt and r.prompt_ids:
            raise InvalidRequestError("give prompt or prompt_ids, not both")
        # the fields as sent, before any work (tokenizing) is spent on them
        check_generate(self.limits, model=r.model, request_id=r.request_id, prompt=r.prompt,
                       prompt_ids=r.prompt_ids,
                       max_new_tokens=r.max_new_tokens if r.HasField("max_new_tokens") else None,
                       stop_token_ids=r.stop_token_ids)
        if r.prompt:
            tok = engine.tokenizer(r.model)
            if tok is None:
                raise InvalidRequestError(f"model {r.model!r} has no tokenizer; send prompt_ids")
            prompt_ids = tok.encode(r.prompt)
        else:
            prompt_ids = list(r.prompt_ids)
        s = r.sampling
        sampling = SamplingParams(
            temperature=s.temperature if s.HasField("temperature") else 0.0,
            top_k=s.top_k if s.HasField("top_k") else 0,
            top_p=s.top_p if s.HasField("top_p") else 1.0,
            seed=s.seed if s.HasField("seed") else 0,
        )
        if r.ignore_eos:
            stops: list[int] = []
        elif r.stop_token_ids:
            stops = list(r.stop_token_ids)
        else:
            stops = list(engine.model_eos_ids(r.model))
        # absent: the default; present (0 and negatives included): as sent, so the engine's own check
        # refuses a bad value with the message the local path gives
        max_new = r.max_new_tokens if r.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        request = make_request(r.model, prompt_ids, max_new, sampling, stops, r.request_id)
        check_request(self.limits, request)  # the tokenized prompt, the model's eos ids as stops
        return request

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        engine = self._engine(context)
        return pb.ListModelsResponse(models=[_info_pb(m) for m in engine.list_models()])

    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> pb.LoadModelResponse:
        engine = self._engine(context)
        try:
            if not request.name or not request.path:
                raise InvalidRequestError("LoadModel needs a name and a path")
            check_model_call(self.limits, request.name, request.path)
            return pb.LoadModelResponse(model=_info_pb(engine.load_model(request.name, request.path)))
        except (CrossPoolError, OSError) as e:
            self._abort(context, e)
            raise AssertionError("unreachable") from None

    def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.ServicerContext
    ) -> pb.UnloadModelResponse:
        engine = self._engine(context)
        try:
            check_model_call(self.limits, request.name)
            return pb.UnloadModelResponse(failed_requests=engine.unload_model(request.name))
        except CrossPoolError as e:
            self._abort(context, e)
            raise AssertionError("unreachable") from None

    def SleepModel(
        self, request: pb.SleepModelRequest, context: grpc.ServicerContext
    ) -> pb.SleepModelResponse:
        op = "sleep_to_disk" if request.to_disk else "sleep"
        return pb.SleepModelResponse(state=self._transition(request.name, op, context))

    def WakeModel(self, request: pb.WakeModelRequest, context: grpc.ServicerContext) -> pb.WakeModelResponse:
        return pb.WakeModelResponse(state=self._transition(request.name, "wake", context))

    def _transition(self, name: str, op: str, context: grpc.ServicerContext) -> str:
        """Runs engine.sleep / engine.wake on `name`; returns the model's state after it."""
        engine = self._engine(context)
        try:
            check_model_call(self.limits, name)
            return model_transition(engine, name, op)
        except CrossPoolError as e:
            self._abort(context, e)
            raise AssertionError("unreachable") from None

    def GetStats(self, request: pb.GetStatsRequest, context: grpc.ServicerContext) -> pb.GetStatsResponse:
        snap = snapshot(self._engine(context))  # the metrics read the same snapshot (serving/stats.py)
        st = snap.stats
        return pb.GetStatsResponse(
            queue_depth=st.queue_depth,
            running=st.running,
            max_live_requests=st.max_live_requests,
            live_request_ids=list(st.live_request_ids),
            completed=st.completed,
            cancelled=st.cancelled,
            failed=st.failed,
            tokens_generated=st.tokens_generated,
            models=list(st.models),
            mode=snap.mode,
            topology=snap.topology,
            kv_pages=[
                pb.KVDeviceStats(device=dev, pages_used=used, pages_free=total - used, pages_total=total)
                for dev, used, total in st.kv_pages
            ],
            preemptions=st.preemptions,
            weights=[
                pb.ModelWeightsStats(
                    model=w.model, bytes=w.bytes, attention_bytes=w.attention_bytes, ffn_bytes=w.ffn_bytes
                )
                for w in snap.weights
            ],
            programs_compiled=snap.programs_compiled,
            model_states=[pb.ModelStateStats(model=m, state=state) for m, state in st.model_states],
        )


def model_transition(engine: Any, name: str, op: str) -> str:
    """engine.sleep(name), engine.sleep(name, to_disk=True) or engine.wake(name) (`op`: "sleep",
    "sleep_to_disk", "wake"), then the model's state; InvalidRequestError for an engine without
    sleeping models (the reference engine)."""
    fn = getattr(engine, "sleep" if op == "sleep_to_disk" else op, None)
    if fn is None:
        raise InvalidRequestError(f"this engine has no sleeping models ({op} is not supported)")
    if op == "sleep_to_disk":
        fn(name, to_disk=True)
    else:
        fn(name)
    return dict(engine.stats().model_states).get(name, "resident")


# crosspool.v1's methods: (request type, response type, server-streaming)
_RPCS: dict[str, tuple[Any, Any, bool]] = {
    "Generate": (pb.GenerateRequest, pb.GenerateResponse, True),
    "ListModels": (pb.ListModelsRequest, pb.ListModelsResponse, False),
    "LoadModel": (pb.LoadModelRequest, pb.LoadModelResponse, False),
    "UnloadModel": (pb.UnloadModelRequest, pb.UnloadModelResponse, False),
    "GetStats": (pb.GetStatsRequest, pb.GetStatsResponse, False),
    "SleepModel": (pb.SleepModelRequest, pb.SleepModelResponse, False),
    "WakeModel": (pb.WakeModelRequest, pb.WakeModelResponse, False),
}


def _parse(request_type: Any, raw: bytes, context: grpc.ServicerContext) -> Any:
    """`raw` parsed as `request_type`, or the call aborted with INVALID_ARGUMENT (gRPC's own
    deserializer would answer INTERNAL "Exception deserializing request!")."""
    try:
        return request_type.FromString(raw)
    except Exception as e:  # google.protobuf.message.DecodeError (and whatever else a parser raises)
        why = " ".join(str(e).split()) or type(e).__name__
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"malformed {request_type.DESCRIPTOR.full_name}: {len(raw)} bytes that do not "
                      f"parse ({why})")


def _handler(method: Callable[..., Any], request_type: Any, response_type: Any, streaming: bool) -> Any:
    """A gRPC method handler that takes the request's raw bytes and parses them itself (`_parse`)."""
    if streaming:
        def stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
            yield from method(_parse(request_type, raw, context), context)

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=None, response_serializer=response_type.SerializeToString)

    def unary(raw: bytes, context: grpc.ServicerContext) -> Any:
        return method(_parse(request_type, raw, context), context)

    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=None, response_serializer=response_type.SerializeToString)


def add_servicer(servicer: CrossPoolServicer, server: grpc.Server) -> None:
    """Registers crosspool.v1 as the generated `add_CrossPoolServicer_to_server` does, except that
    each method parses its request itself, so malformed bytes are INVALID_ARGUMENT, not INTERNAL."""
    handlers = {name: _handler(getattr(servicer, name), req, resp, streaming)
                for name, (req, resp, streaming) in _RPCS.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    register = getattr(server, "add_registered_method_handlers", None)  # grpcio >= 1.63
    if register is not None:
        register(SERVICE_NAME, handlers)


class BearerAuthInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except grpc.health.v1 (for probes)."""

    def __init__(self, token: str):
        self._token = token.encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        if handler_call_details.method.startswith("/grpc.health.v1."):
            return continuation(handler_call_details)
        md = dict(handler_call_details.invocation_metadata or ())
        got = str(md.get("authorization", "")).encode()
        if hmac.compare_digest(got, b"Bearer " + self._token):
            return continuation(handler_call_details)
        return self._deny_stream if handler_call_details.method.endswith("/Generate") else self._deny_unary


class ServingEngine(ReferenceEngine):
    """ReferenceEngine plus the reports GetStats and the metrics read (mode, devices, weights
    bytes)."""

    mode = "reference"

    def weights_bytes(self, name: str) -> int:
        """Bytes of the model's weights (what the metrics export as crosspool_weights_bytes)."""
        return sum(self.weights_bytes_by_side(name))

    def weights_bytes_by_side(self, name: str) -> tuple[int, int]:
        """(attention-side bytes, FFN-side bytes) of the model's weights."""
        from crosspool_jax.models.params import tree_bytes

        w = self._model(name).generator.weights
        return tree_bytes(w.attn), tree_bytes(w.ffn)

    def describe(self) -> str:
        import jax

        return f"mode reference: one request at a time on {jax.devices()[0]}"


@dataclasses.dataclass
class RunningServer:
    """A started server: its address, engine (None while starting) and a `stop(grace)` that drains
    streams first."""

    server: grpc.Server
    engine: Any
    address: str
    port: int
    health: health.HealthServicer
    metrics: Any = None  # serving.metrics.ServerMetrics
    tls: bool = False  # serving TLS only
    servicer: CrossPoolServicer | None = None
    http: Any = None  # serving.openai_api.HTTPServer: the OpenAI-compatible API, when started

    @property
    def http_address(self) -> str | None:
        """HOST:PORT of the OpenAI-compatible HTTP API (None: not served)."""
        return None if self.http is None else self.http.address

    def set_ready(self, engine: Any, metrics: Any = None) -> None:
        """Hands a server started without an engine its engine (and metrics): calls reach it from now
        on and health says SERVING (unless the server is already shutting down)."""
        self.engine, self.metrics = engine, metrics
        if self.servicer is not None:
            self.servicer.metrics = metrics
            self.servicer.engine = engine
        for svc in ("", SERVICE_NAME):
            self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)

    def set_not_serving(self) -> None:
        """Health NOT_SERVING while calls still reach the engine (which refuses them itself: a
        multi-host group that lost a process answers UNAVAILABLE with the reason)."""
        for svc in ("", SERVICE_NAME):
            self.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)

    def live_requests(self) -> int:
        """Live requests in the engine (0 while starting)."""
        return 0 if self.engine is None else len(self.engine.stats().live_request_ids)

    def refuse_new_calls(self) -> None:
        """Health NOT_SERVING and new calls refused (UNAVAILABLE, REFUSED_MESSAGE); live streams go on.
        The first half of `stop`; idempotent."""
        self.health.enter_graceful_shutdown()
        if self.servicer is not None:
            self.servicer.draining = True

    def stop(self, grace: float = 5.0) -> None:
        """Marks NOT_SERVING and refuses new calls (UNAVAILABLE, REFUSED_MESSAGE; health checks still
        answer, NOT_SERVING); lets live streams finish for `grace` s; the engine then fails those left,
        which end with UNAVAILABLE (CUT_OFF_MESSAGE); then the server stops."""
        self.refuse_new_calls()
        grace = max(0.0, float(grace))
        deadline = time.monotonic() + grace
        if self.engine is not None:
            self.engine.shutdown(timeout=grace)
        done = self.server.stop(max(0.0, deadline - time.monotonic()) + _ABORT_GRACE)
        if self.http is not None:  # its streams ended with the engine's requests (an error event if cut)
            self.http.stop(timeout=_ABORT_GRACE + 2.0)
        while not done.wait(0.1):  # in short waits: a signal handler runs between them
            pass


def listen_error(host: str, port: int, in_use_only: bool = True) -> str | None:
    """Why nothing can listen on host:port ("address already in use", ...), from a plain socket bound
    the way gRPC binds (SO_REUSEADDR, no SO_REUSEPORT); None when it can, or when `host` does not
    resolve (gRPC then refuses it). `in_use_only`: report EADDRINUSE only (other errors on one of
    several addresses of a name need not stop gRPC, which listens on those it can)."""
    if port == 0:
        return None
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return None
    for family, socktype, proto, _name, addr in infos:
        try:
            with socket.socket(family, socktype, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE or not in_use_only:
                return (e.strerror or str(e)).lower()
    return None


def start_server(
    engine: Any,
    host: str = "127.0.0.1",
    port: int = 50051,
    auth_token: str | None = None,
    max_workers: int | None = None,
    metrics: Any = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    limits: RequestLimits | None = None,
    http_port: int | None = None,
    http_host: str | None = None,
) -> RunningServer:
    """Starts a server on host:port (port 0: a free port) and returns at once. Metrics (a
    serving.metrics.ServerMetrics) are recorded only when given. With `tls_cert` and `tls_key` (PEM
    files: certificate chain, private key) it serves TLS only; raises serving.tls.TLSError for a bad
    file or pair. A port something else listens on is refused (SO_REUSEPORT is off): OSError
    "cannot listen on HOST:PORT: address already in use".

    `engine` None: the server starts without one (what `crosspool serve` does before it loads any
    model): health says NOT_SERVING and calls answer UNAVAILABLE ("the server is starting") until
    `RunningServer.set_ready(engine, metrics)`.

    `limits`: what one request may cost (serving/limits.py; default `RequestLimits()`), checked
    before anything is queued; a request past one is INVALID_ARGUMENT naming the limit. Malformed
    request bytes are INVALID_ARGUMENT too, on every crosspool.v1 method.
    `http_port` (None: off; 0: a free port): also serve the OpenAI-compatible HTTP API
    (serving/openai_api.py) on `http_host` (default `host`), on the same engine, with the same bearer
    token, TLS pair and life cycle (503 while starting or draining; stopped with the gRPC server). Its
    port is bound here too, before any model is loaded; `RunningServer.http_address` is where.

    `max_workers`: gRPC handler threads (default: the engine's max_live_requests + 16, at least 32).
    A stream holds one for its whole life, so fewer threads than live requests would leave streams
    queued inside gRPC, invisible to the engine and never refused; the server also takes at most
    `max_workers` calls at once and refuses more with RESOURCE_EXHAUSTED."""
    creds = None
    if tls_cert or tls_key:
        from serving.tls import TLSError, server_credentials

        if not (tls_cert and tls_key):
            raise TLSError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        creds = server_credentials(tls_cert, tls_key)
    interceptors = [BearerAuthInterceptor(auth_token)] if auth_token else []
    if max_workers is None:
        max_workers = max(32, int(getattr(engine, "max_live_requests", 16)) + 16)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=interceptors,
        maximum_concurrent_rpcs=max_workers,
        # gRPC's default SO_REUSEPORT lets a second server listen on the same port, and the calls are
        # then split silently between the two processes
        options=[("grpc.so_reuseport", 0)],
    )
    servicer = CrossPoolServicer(engine, metrics, limits)
    add_servicer(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = _bind(server, host, port, creds)
    http = None
    if http_port is not None:
        from serving.openai_api import HTTPServer, create_app

        try:
            http = HTTPServer(create_app(servicer, auth_token), http_host or host, http_port,
                              tls_cert=tls_cert, tls_key=tls_key)
        except OSError as e:
            server.stop(None)
            raise OSError(f"--http-port: {e}") from None
    status = health_pb2.HealthCheckResponse.NOT_SERVING if engine is None else (
        health_pb2.HealthCheckResponse.SERVING)
    for svc in ("", SERVICE_NAME):
        health_servicer.set(svc, status)
    server.start()
    if http is not None:
        http.wait_started()
    return RunningServer(
        server, engine, f"{host}:{bound}", bound, health_servicer, metrics, tls=creds is not None,
        servicer=servicer, http=http,
    )


def _bind(server: grpc.Server, host: str, port: int, creds: Any) -> int:
    """Binds `server` to host:port (TLS with `creds`, else plaintext) and returns the bound port;
    stops the server and raises OSError("cannot listen on HOST:PORT: why") if it cannot."""
    bound = 0
    why = listen_error(host, port)  # before gRPC tries: its C core would log a line of its own
    if why is None:
        try:
            if creds is None:
                bound = server.add_insecure_port(f"{host}:{port}")
            else:
                bound = server.add_secure_port(f"{host}:{port}", creds)
        except RuntimeError:  # grpc raises instead of returning 0 for some bind failures
            bound = 0
        if bound == 0:
            why = listen_error(host, port, in_use_only=False) or "gRPC could not bind it"
    if why is not None:
        server.stop(None)
        raise OSError(f"cannot listen on {host}:{port}: {why}")
    return bound


def demo_engine(max_live_requests: int = 64, names: list[str] | None = None) -> ServingEngine:
    """A ServingEngine holding the built-in demo models (all, or those in `names`)."""
    from crosspool_jax.demo import demo_models

    engine = ServingEngine(max_live_requests=max_live_requests)
    for name, m in demo_models().items():
        if names is None or name in names:
            engine.add_model(name, m.config, m.weights, m.tokenizer, source="builtin-demo")
    return engine


def _stderr_log(msg: str) -> None:
    print(f"crosspool: {msg}", file=sys.stderr, flush=True)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class ServeInterrupted(BaseException):
    """Raised in the main thread by the first SIGINT / SIGTERM while `ShutdownSignals.interrupt` is on
    (the server is starting: building the engine, loading models, warming up)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


class ShutdownSignals:
    """SIGINT and SIGTERM handlers (install from the main thread). The first signal sets `event` (and,
    while `interrupt` is on, raises ServeInterrupted in the main thread); a second one logs one line
    and ends the process at once with os._exit(128 + signum): no drain, no traceback."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self.log = log or _stderr_log
        self.event = threading.Event()
        self.signum: int | None = None
        self.interrupt = False
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.signum is not None else "none"

    def install(self) -> ShutdownSignals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            # no engine call here: the main thread may hold the engine's lock at this point
            self.log(f"serve: second signal ({signal_name(signum)}) during the shutdown: exiting now, "
                     "without finishing the drain")
            for f in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    f.flush()
            os._exit(128 + signum)
        self.signum = signum
        self.event.set()
        if self.interrupt:
            self.interrupt = False
            raise ServeInterrupted(signum)


def serve_forever(
    running: RunningServer,
    grace: float = 5.0,
    log: Callable[[str], None] | None = None,
    signals: ShutdownSignals | None = None,
) -> None:
    """Blocks (in the main thread) until SIGINT / SIGTERM, then logs `serve: shutting down (signal
    SIGTERM), draining N live requests for up to G s`, stops gracefully (`running.stop(grace)`) and
    logs `serve: stopped`. A second signal during the drain exits the process at once
    (ShutdownSignals). `signals`: handlers already installed (by `crosspool serve`, at start-up)."""
    log = log or _stderr_log
    own = signals is None
    if signals is None:
        signals = ShutdownSignals(log).install()
    signals.interrupt = False
    try:
        while not signals.event.wait(0.2):
            pass
        running.refuse_new_calls()  # before the log line: whoever reads it sees NOT_SERVING
        n = running.live_requests()
        log(f"serve: shutting down (signal {signals.name}), draining {n} live requests for up to {grace:g} s")
        running.stop(grace)
        log("serve: stopped")
    finally:
        if own:
            signals.restore()


