"""The crosspool.v1 gRPC server over an `EngineInterface` (crosspool_jax.engine_api).

Status codes: unknown model NOT_FOUND; bad sampling parameters, empty or too-long prompt
INVALID_ARGUMENT; too many live requests RESOURCE_EXHAUSTED; a model unloaded under a live stream
ABORTED; missing/wrong bearer token (when a token is configured) UNAUTHENTICATED. A client cancel or
deadline cancels the engine request at once. `stop(grace)` drains live streams for `grace` seconds.
The standard grpc.health.v1 and reflection services are registered. With a certificate and key the
port speaks TLS only (serving/tls.py).
"""

from __future__ import annotations

import dataclasses
import hmac
import time
import uuid
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
from crosspool_jax.errors import CrossPoolError, InvalidRequestError
from crosspool_jax.sampling import SamplingParams
from serving.crosspool.v1 import crosspool_pb2 as pb
from serving.crosspool.v1 import crosspool_pb2_grpc as pb_grpc
from serving.stats import snapshot

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CrossPool"].full_name
DEFAULT_MAX_NEW_TOKENS = 32
_FINISH = {FINISH_STOP: pb.FINISH_REASON_STOP, FINISH_LENGTH: pb.FINISH_REASON_LENGTH}


def _info_pb(m: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(**dataclasses.asdict(m))


class CrossPoolServicer(pb_grpc.CrossPoolServicer):
    """Maps crosspool.v1 calls onto the engine."""

    def __init__(self, engine: Any, metrics: Any = None):
        self.engine = engine
        self.metrics = metrics  # serving.metrics.ServerMetrics or None

    def _abort(self, context: grpc.ServicerContext, e: Exception) -> None:
        code = grpc.StatusCode.INTERNAL
        if isinstance(e, ModelNotFoundError):
            code = grpc.StatusCode.NOT_FOUND
        elif isinstance(e, InvalidRequestError):
            code = grpc.StatusCode.INVALID_ARGUMENT
        elif isinstance(e, QueueFullError):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        elif isinstance(e, EngineClosedError):
            code = grpc.StatusCode.UNAVAILABLE
        elif isinstance(e, CrossPoolError | OSError):
            code = grpc.StatusCode.FAILED_PRECONDITION
        context.abort(code, " ".join(str(e).split()) or type(e).__name__)

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        t0 = time.monotonic()
        try:
            engine_req = self._to_engine_request(request)
            handle = self.engine.submit(engine_req)
        except CrossPoolError as e:
            self._abort(context, e)
            return
        m, model = self.metrics, request.model
        last_sent: float | None = None  # when the previous token was handed to gRPC
        ended = False  # finished (stop/length/error) rather than cancelled
        # a client cancel or deadline ends the RPC; the engine request goes with it, at once
        context.add_callback(lambda: self.engine.cancel(handle.request_id))
        try:
            while True:
                ev = handle.next_event(timeout=0.1)
                if ev is None:
                    if not context.is_active():
                        self.engine.cancel(handle.request_id)
                        return
                    continue
                if ev.finish_reason == FINISH_ERROR:
                    ended = True
                    if m is not None:
                        m.finish(model, FINISH_ERROR)
                    err = ev.error or "the request failed"
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

    def _to_engine_request(self, r: pb.GenerateRequest) -> Any:
        models = {m.name: m for m in self.engine.list_models()}
        if r.model not in models:
            raise ModelNotFoundError(
                f"model {r.model!r} is not loaded (loaded: {', '.join(models) or 'none'})"
            )
        if r.prompt and r.prompt_ids:
            raise InvalidRequestError("give prompt or prompt_ids, not both")
        if r.prompt:
            tok = self.engine.tokenizer(r.model)
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
            stops = list(self.engine.model_eos_ids(r.model))
        return make_request(
            r.model, prompt_ids, r.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, sampling, stops, r.request_id
        )

    def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_info_pb(m) for m in self.engine.list_models()])

    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> pb.LoadModelResponse:
        try:
            if not request.name or not request.path:
                raise InvalidRequestError("LoadModel needs a name and a path")
            return pb.LoadModelResponse(model=_info_pb(self.engine.load_model(request.name, request.path)))
        except (CrossPoolError, OSError) as e:
            self._abort(context, e)
            raise AssertionError("unreachable") from None

    def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.ServicerContext
    ) -> pb.UnloadModelResponse:
        try:
            return pb.UnloadModelResponse(failed_requests=self.engine.unload_model(request.name))
        except CrossPoolError as e:
            self._abort(context, e)
            raise AssertionError("unreachable") from None

    def GetStats(self, request: pb.GetStatsRequest, context: grpc.ServicerContext) -> pb.GetStatsResponse:
        snap = snapshot(self.engine)  # the metrics read the same snapshot (serving/stats.py)
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
        )


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
    """ReferenceEngine plus the look-ups the server needs for text prompts and default stops, and the
    reports GetStats and the metrics read (mode, devices, weights bytes)."""

    mode = "reference"

    def model_eos_ids(self, name: str) -> tuple[int, ...]:
        return tuple(self._model(name).generator.cfg.eos_token_ids)

    def weights_bytes(self, name: str) -> int:
        """Bytes of the model's weights (what the metrics export as crosspool_weights_bytes)."""
        return sum(self.weights_bytes_by_side(name))

    def weights_bytes_by_side(self, name: str) -> tuple[int, int]:
        """(attention-side bytes, FFN-side bytes) of the model's weights."""
        from crosspool_jax.params import tree_bytes

        w = self._model(name).generator.weights
        return tree_bytes(w.attn), tree_bytes(w.ffn)

    def describe(self) -> str:
        import jax

        return f"mode reference: one request at a time on {jax.devices()[0]}"


@dataclasses.dataclass
class RunningServer:
    """A started server: its address, engine and a `stop(grace)` that drains streams first."""

    server: grpc.Server
    engine: Any
    address: str
    port: int
    health: health.HealthServicer
    metrics: Any = None  # serving.metrics.ServerMetrics
    tls: bool = False  # serving TLS only

    def stop(self, grace: float = 5.0) -> None:
        """Marks NOT_SERVING, refuses new calls, lets live streams finish for `grace` s, stops the engine."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.engine.shutdown(timeout=0)


def start_server(
    engine: Any,
    host: str = "127.0.0.1",
    port: int = 50051,
    auth_token: str | None = None,
    max_workers: int | None = None,
    metrics: Any = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> RunningServer:
    """Starts a server on host:port (port 0: a free port) and returns at once. Metrics (a
    serving.metrics.ServerMetrics) are recorded only when given. With `tls_cert` and `tls_key` (PEM
    files: certificate chain, private key) it serves TLS only; raises serving.tls.TLSError for a bad
    file or pair.

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
    )
    pb_grpc.add_CrossPoolServicer_to_server(CrossPoolServicer(engine, metrics), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        if creds is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", creds)
    except RuntimeError:  # grpc raises instead of returning 0 for some bind failures
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    for svc in ("", SERVICE_NAME):
        health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(
        server, engine, f"{host}:{bound}", bound, health_servicer, metrics, tls=creds is not None
    )


def demo_engine(max_live_requests: int = 64, names: list[str] | None = None) -> ServingEngine:
    """A ServingEngine holding the built-in demo models (all, or those in `names`)."""
    from crosspool_jax.demo import demo_models

    engine = ServingEngine(max_live_requests=max_live_requests)
    for name, m in demo_models().items():
        if names is None or name in names:
            engine.add_model(name, m.config, m.weights, m.tokenizer, source="builtin-demo")
    return engine


def serve_forever(running: RunningServer, grace: float = 5.0) -> None:
    """Blocks until Ctrl-C / SIGTERM, then stops gracefully."""
    import signal

    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop["now"]:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    running.stop(grace)


def new_request_id() -> str:
    """A fresh request id (the client's default)."""
    return uuid.uuid4().hex
