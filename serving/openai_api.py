"""The OpenAI-compatible HTTP API, served beside gRPC on the same engine (Starlette + uvicorn).

Endpoints: `GET /v1/models`, `POST /v1/models/{name}/sleep` and `/wake` (the pooled engine's
sleeping models: weights to host memory and back, `?to_disk=true` drops them to their checkpoint;
sleep is refused with 400 while the model has live requests), `POST /v1/completions`,
`POST /v1/chat/completions` (streaming as server-sent events ending in `data: [DONE]`, or one
JSON body), `GET /health` (200 `{"status": "ok"}` when serving, 503 while starting or draining;
no token needed, for probes).

Request fields: `model`, `prompt` (completions: a string, a list of token ids, or a list of one
string) or `messages` (chat: rendered with the checkpoint's jinja2 chat template, see
checkpoints/tokenizer.py), `max_tokens` (chat also `max_completion_tokens`; absent: 16 for
completions, OpenAI's default, and the rest of the model's context for chat), `temperature`
(default 1.0, OpenAI's; 0 = greedy), `top_p`, `seed`, `stop` (a string or a list of up to 4),
`stream`, `stream_options.include_usage`, `n` (1 only), and the extension fields `stop_token_ids`
(a list of token ids that end the request, on top of the model's eos ids; the name vLLM uses) and
`ignore_eos` (true: the model's eos ids do not stop it; vLLM's name too). Fields the engine cannot
honour when set (`n` > 1, `logprobs`, `echo`, `best_of` > 1, penalties != 0, `tools`,
`logit_bias`) are refused with 400 rather than ignored.

Errors are OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
`openai_error` picks: 400 bad request, 401 missing/wrong bearer token, 404 unknown model, 429
the engine's live-request limit, 503 while the server starts or drains; mid-stream failures are
sent as one `data: {"error": ...}` event (the openai client raises it) before the stream ends.

A client that disconnects mid-stream cancels its engine request (its KV pages are free before the
engine's next step). The engine's blocking event iterator runs on one pump thread per request that
hands events to the event loop (`loop.call_soon_threadsafe`), so no engine wait blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from crosspool_jax.engine_api import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    EngineClosedError,
    ModelNotFoundError,
    QueueFullError,
    make_request,
)
from crosspool_jax.errors import CrossPoolError, InvalidRequestError, UnavailableError
from crosspool_jax.execution.sampling import SamplingParams
from serving.limits import check_generate, check_request

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
MAX_STOP_STRINGS = 4  # OpenAI's limit
# the error ReferenceEngine.shutdown (and so PooledEngine's) gives the requests it fails
_ENGINE_SHUTDOWN_ERROR = "the engine shut down before the request finished"
_UNSUPPORTED = {  # field -> the value that means "not asked for"
    "n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "presence_penalty": 0,
    "frequency_penalty": 0, "tools": None, "logit_bias": None, "suffix": None,
}


class APIError(Exception):
    """An error to answer in OpenAI's format: HTTP `status`, `type`, `code`, `param`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def openai_error(e: BaseException) -> APIError:
    """The one mapping of engine/server errors to OpenAI errors (HTTP status, type, code)."""
    if isinstance(e, APIError):
        return e
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, ModelNotFoundError):
        return APIError(404, msg, "invalid_request_error", "model_not_found", "model")
    if isinstance(e, InvalidRequestError):
        return APIError(400, msg, "invalid_request_error")
    if isinstance(e, QueueFullError):
        return APIError(429, msg, "rate_limit_exceeded", "engine_queue_full")
    if isinstance(e, EngineClosedError):
        return APIError(503, f"{_shutting_down()}; it takes no new requests", "service_unavailable",
                        "shutting_down")
    if isinstance(e, UnavailableError):  # e.g. a multi-host group that lost a process
        return APIError(503, msg, "service_unavailable", "unavailable")
    if isinstance(e, CrossPoolError):
        return APIError(400, msg, "invalid_request_error")
    return APIError(500, msg, "server_error")


def _shutting_down() -> str:
    from serving.client import SERVER_SHUTTING_DOWN

    return SERVER_SHUTTING_DOWN


def _event_error(err: str) -> APIError:
    """The OpenAI error for an engine request that ended with finish_reason "error"."""
    if err == _ENGINE_SHUTDOWN_ERROR:  # the drain's grace ran out (or the engine stopped)
        return APIError(503, f"{_shutting_down()}; the request was not finished", "service_unavailable",
                        "shutting_down")
    if err.startswith("rejected:"):  # the planner: this request's KV could never fit the pool
        return APIError(400, err, "invalid_request_error", "context_too_large")
    return APIError(500, err, "server_error")


def error_response(e: BaseException) -> JSONResponse:
    err = openai_error(e)
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ---- request validation ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """A checked /v1/completions or /v1/chat/completions body, as the engine request it becomes."""

    chat: bool
    model: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    stop_token_ids: tuple[int, ...]
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _num(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise APIError(400, f"{key} must be a number in [{lo:g}, {hi:g}], got {v!r}", param=key)
    return float(v)


def _int_field(body: dict[str, Any], key: str, lo: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise APIError(400, f"{key} must be an integer >= {lo}, got {v!r}", param=key)
    return v


def render_chat(tokenizer: Any, model: str, messages: Any) -> str:
    """The prompt text of `messages` through the tokenizer's jinja2 chat template (sandboxed, as HF's
    `apply_chat_template` renders it, with the generation prompt added)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}] parts: text only, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param="messages")
            m = {**m, "content": "".join(str(p.get("text", "")) for p in content)}
        flat.append(m)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError(400, f"model {model!r} has no chat template (tokenizer_config.json has no "
                       "chat_template); use /v1/completions", param="messages")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise APIError(400, f"chat template: {message}", param="messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=flat, add_generation_prompt=True,
            bos_token=getattr(tokenizer, "bos_token", None) or "",
            eos_token=getattr(tokenizer, "eos_token", None) or "",
        )
    except jinja2.TemplateError as e:
        raise APIError(400, f"model {model!r}: chat template failed: {e}", param="messages") from None


def parse_request(engine: Any, body: Any, chat: bool) -> ParsedRequest:
    """Checks a completions (`chat` False) or chat completions body against the engine's models; the
    one place HTTP requests are validated. Raises APIError (400 / 404)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required", param="model")
    models = {m.name: m for m in engine.list_models()}
    if model not in models:
        raise openai_error(ModelNotFoundError(
            f"model {model!r} is not loaded (loaded: {', '.join(models) or 'none'})"))
    for key, off in _UNSUPPORTED.items():
        v = body.get(key)
        if v is not None and v != off and not (key == "logprobs" and v is False):
            raise APIError(400, f"{key}={v!r} is not supported by this server", param=key)
    tok = engine.tokenizer(model)
    if chat:
        if tok is None:
            raise APIError(400, f"model {model!r} has no tokenizer", param="messages")
        prompt_ids = tok.encode(render_chat(tok, model, body.get("messages")))
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
            p = p[0]
        if isinstance(p, str):
            if tok is None:
                raise APIError(400, f"model {model!r} has no tokenizer; send the prompt as token ids",
                               param="prompt")
            prompt_ids = tok.encode(p)
        elif isinstance(p, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            prompt_ids = list(p)
        else:
            raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                           param="prompt")
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
    max_tokens = _int_field(body, "max_tokens", 1)
    if chat and max_tokens is None:
        max_tokens = _int_field(body, "max_completion_tokens", 1)
    if max_tokens is None:
        context = models[model].max_position_embeddings
        max_tokens = max(1, context - len(prompt_ids)) if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
    seed = _int_field(body, "seed", 0)
    sampling = SamplingParams(
        temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0),
        seed=0 if seed is None else seed,
    )
    stop = body.get("stop")
    stops: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings",
                       param="stop")
    ids = body.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise APIError(400, "stop_token_ids must be a list of token ids", param="stop_token_ids")
    eos = () if body.get("ignore_eos") else tuple(engine.model_eos_ids(model))
    stop_ids = tuple(dict.fromkeys((*eos, *ids)))
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    return ParsedRequest(chat, model, tuple(prompt_ids), max_tokens, sampling, stop_ids, stops,
                         bool(body.get("stream")), bool(opts.get("include_usage")))


# ---- stop strings ---------------------------------------------------------------------------------


class StopText:
    """Text pieces with stop strings cut out: `push(piece)` returns (text safe to send, stopped).
    Text that may be the start of a stop string is held back until it is known not to be one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = stops, ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        keep = 0  # the longest tail of text that begins some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class _SSEResponse(StreamingResponse):
    """A stream that also listens for the client's disconnect while no token is due (Starlette's own
    does so only for ASGI < 2.4; with 2.4 it notices on the next send, which a held or slow engine
    may delay): the disconnect cancels the body's task, whose `finally` cancels the engine request."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                with contextlib.suppress(OSError):  # the client went away during a send
                    await self.stream_response(send)
                tg.cancel_scope.cancel()

            async def listen() -> None:
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            await listen()


# ---- the app ---------------------------------------------------------------------------------------


def _pump(handle: Any, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[Any]) -> None:
    """Runs on its own thread: the request's blocking event iterator, handed to the loop."""
    try:
        for ev in handle.events():
            loop.call_soon_threadsafe(q.put_nowait, ev)
    except RuntimeError:  # the loop closed (server stopped)
        pass


class _Run:
    """One engine request seen from the event loop: submit, events as they come, cancel."""

    def __init__(self, engine: Any, parsed: ParsedRequest, metrics: Any, limits: Any = None):
        self.engine, self.parsed, self.metrics = engine, parsed, metrics
        self.t0 = time.monotonic()
        p = parsed
        req = make_request(p.model, list(p.prompt_ids), p.max_tokens, p.sampling, list(p.stop_token_ids),
                           "")
        if limits is not None:
            check_request(limits, req)  # the tokenized prompt, the stop ids
        self.handle = engine.submit(req)  # raises QueueFullError etc. before anything is sent
        self.q: asyncio.Queue[Any] = asyncio.Queue()
        self.ended = False  # finished (stop/length/error) rather than cancelled
        self.last_sent: float | None = None
        self.tokens = 0
        threading.Thread(target=_pump, args=(self.handle, asyncio.get_running_loop(), self.q),
                         name=f"http-{self.handle.request_id[:8]}", daemon=True).start()

    async def events(self) -> AsyncIterator[Any]:
        while True:
            ev = await self.q.get()
            if ev.token_id is not None:
                self.tokens += 1
                m = self.metrics
                if m is not None:
                    now = time.monotonic()
                    if self.last_sent is None:
                        m.first_token(self.parsed.model, now - self.t0)
                    else:
                        m.token_gap(self.parsed.model, now - self.last_sent)
                    self.last_sent = now
            yield ev
            if ev.final:
                return

    def finish(self, reason: str) -> None:
        self.ended = True
        if self.metrics is not None:
            self.metrics.finish(self.parsed.model, reason)

    def close(self) -> None:
        """Cancels the engine request unless it ended (a disconnect, a stop string); counts a cancel."""
        if not self.ended:
            # counted first: whoever sees the request gone from the engine sees the cancel counted
            if self.metrics is not None:
                self.metrics.cancel(self.parsed.model)
            self.engine.cancel(self.handle.request_id)
            self.ended = True


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Routes:
    """The HTTP endpoints over one server's `state` (see `create_app`); each method is a route."""

    def __init__(self, state: Any, auth_token: str | None) -> None:
        self.state = state
        self.token = auth_token.encode() if auth_token else None

    def ready_engine(self, request: HTTPRequest) -> Any:
        """The engine, once the bearer token checks and the server is up and not draining."""
        if self.token is not None:
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, b"Bearer " + self.token):
                raise APIError(401, "missing or wrong bearer token", "authentication_error",
                               "invalid_api_key")
        from serving.server import REFUSED_MESSAGE, STARTING_MESSAGE

        if self.state.draining:
            raise APIError(503, REFUSED_MESSAGE, "service_unavailable", "shutting_down")
        if self.state.engine is None:
            raise APIError(503, STARTING_MESSAGE, "service_unavailable", "starting")
        return self.state.engine

    def count(self, request: HTTPRequest, status: int) -> None:
        m = self.state.metrics
        if m is not None and hasattr(m, "http_request"):
            m.http_request(request.url.path, status)

    def refused(self, request: HTTPRequest, e: Exception) -> Response:
        """The OpenAI-style error response for `e` (an APIError or a CrossPoolError), counted."""
        err = openai_error(e)
        self.count(request, err.status)
        return error_response(err)

    async def health(self, request: HTTPRequest) -> Response:
        from serving.server import REFUSED_MESSAGE, STARTING_MESSAGE

        state = self.state
        if state.draining:
            return JSONResponse({"status": "draining", "message": REFUSED_MESSAGE}, status_code=503)
        if state.engine is None:
            return JSONResponse({"status": "starting", "message": STARTING_MESSAGE}, status_code=503)
        lost = getattr(state.engine, "lost_reason", None)  # a multi-host group that lost a process
        if lost is not None:
            return JSONResponse({"status": "unavailable", "message": lost}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: HTTPRequest) -> Response:
        try:
            engine = self.ready_engine(request)
        except APIError as e:
            return self.refused(request, e)
        created = int(time.time())
        data = [{"id": m.name, "object": "model", "created": created, "owned_by": "crosspool",
                 "max_model_len": m.max_position_embeddings} for m in engine.list_models()]
        self.count(request, 200)
        return JSONResponse({"object": "list", "data": data})

    async def generate(self, request: HTTPRequest, chat: bool) -> Response:
        try:
            engine = self.ready_engine(request)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise APIError(400, "the request body is not valid JSON") from None
            parsed = parse_request(engine, body, chat)
            limits = getattr(self.state, "limits", None)
            if limits is not None:  # the gRPC API's request limits (serving/limits.py) apply here too
                check_generate(limits, model=parsed.model, stop_strings=parsed.stop)
            run = _Run(engine, parsed, self.state.metrics, limits)
        except (APIError, CrossPoolError) as e:
            return self.refused(request, e)
        self.count(request, 200)
        rid = ("chatcmpl-" if chat else "cmpl-") + run.handle.request_id
        if parsed.stream:
            return _SSEResponse(_stream(run, rid, chat), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await _whole(run, rid, chat)
        finally:
            run.close()

    async def transition(self, request: HTTPRequest, op: str) -> Response:
        """POST /v1/models/{name}/sleep[?to_disk=true] | /wake: engine.sleep / engine.wake (in a
        worker thread: the weight copy blocks); 200 {"id", "object": "model", "state"}."""
        from starlette.concurrency import run_in_threadpool

        from serving.server import model_transition

        try:
            engine = self.ready_engine(request)
            name = request.path_params["name"]
            limits = getattr(self.state, "limits", None)
            if limits is not None:
                check_generate(limits, model=name, stop_strings=())
            if op == "sleep" and request.query_params.get("to_disk", "").lower() in ("1", "true", "yes"):
                op = "sleep_to_disk"
            new_state = await run_in_threadpool(model_transition, engine, name, op)
        except (APIError, CrossPoolError) as e:
            return self.refused(request, e)
        self.count(request, 200)
        return JSONResponse({"id": name, "object": "model", "state": new_state})

    async def sleep(self, request: HTTPRequest) -> Response:
        return await self.transition(request, "sleep")

    async def wake(self, request: HTTPRequest) -> Response:
        return await self.transition(request, "wake")

    async def completions(self, request: HTTPRequest) -> Response:
        return await self.generate(request, chat=False)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self.generate(request, chat=True)


def create_app(state: Any, auth_token: str | None = None) -> Starlette:
    """The ASGI app. `state` has `engine` (None while the server starts), `draining` (True: refuse new
    requests) and `metrics` (a serving.metrics.ServerMetrics or None), read on every request, so the
    gRPC servicer (serving.server.CrossPoolServicer) itself serves: both APIs share one life cycle."""
    r = _Routes(state, auth_token)
    return Starlette(routes=[
        Route("/health", r.health, methods=["GET"]),
        Route("/v1/models", r.models, methods=["GET"]),
        Route("/v1/models/{name}/sleep", r.sleep, methods=["POST"]),
        Route("/v1/models/{name}/wake", r.wake, methods=["POST"]),
        Route("/v1/completions", r.completions, methods=["POST"]),
        Route("/v1/chat/completions", r.chat_completions, methods=["POST"]),
    ])


async def _collect(run: _Run) -> AsyncIterator[tuple[str, str | None]]:
    """(text piece, finish reason or None) per engine event, stop strings applied; raises APIError for
    an engine failure."""
    stops = StopText(run.parsed.stop)
    async for ev in run.events():
        if ev.finish_reason == FINISH_ERROR:
            run.finish(FINISH_ERROR)
            raise _event_error(ev.error or "the request failed")
        if ev.finish_reason == FINISH_CANCELLED:  # cancelled elsewhere (an unload is an error)
            raise APIError(500, "the request was cancelled", "server_error")
        text, stopped = stops.push(ev.text)
        if stopped:  # a stop string: finished with "stop"; the engine request is cancelled now
            run.finish("stop")
            run.engine.cancel(run.handle.request_id)
            yield text, "stop"
            return
        if ev.final:
            run.finish(ev.finish_reason)
            yield text + stops.flush(), ev.finish_reason
            return
        yield text, None  # one chunk per token, its text possibly "" (held back or a special token)


async def _whole(run: _Run, rid: str, chat: bool) -> Response:
    p, parts, reason = run.parsed, [], "stop"
    try:
        async for text, fin in _collect(run):
            parts.append(text)
            reason = fin or reason
    except APIError as e:
        return error_response(e)
    text = "".join(parts)
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return JSONResponse({
        "id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
        "model": p.model, "choices": [choice], "usage": _usage(len(p.prompt_ids), run.tokens),
    })


async def _stream(run: _Run, rid: str, chat: bool) -> AsyncIterator[str]:
    p, created = run.parsed, int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, fin: str | None, first: bool = False) -> str:
        c: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": fin}
        if chat:
            c["delta"] = {"role": "assistant", "content": text or ""} if first else {"content": text or ""}
        else:
            c["text"] = text or ""
        body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": p.model,
                                "choices": [c]}
        if p.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield chunk("", None, first=True)
        try:
            async for text, fin in _collect(run):
                yield chunk(text, fin)
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        if p.include_usage:
            usage = {"id": rid, "object": obj, "created": created, "model": p.model, "choices": [],
                     "usage": _usage(len(p.prompt_ids), run.tokens)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # a client gone mid-stream lands here (the send failed or the task was cancelled)
        run.close()


# ---- the server ------------------------------------------------------------------------------------


class HTTPServer:
    """uvicorn serving `app` on a socket bound at construction (so a port in use is refused at once:
    OSError "cannot listen on HOST:PORT: ..."), on its own thread with its own event loop."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 8000,
                 tls_cert: str | None = None, tls_key: str | None = None):
        import uvicorn

        name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            family, stype, proto, _, addr = socket.getaddrinfo(
                name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, stype, proto)
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(2048)
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()}") from None
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.tls = bool(tls_cert)
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", ssl_certfile=tls_cert,
            ssl_keyfile=tls_key, timeout_graceful_shutdown=2, timeout_keep_alive=30,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="crosspool-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = self.address.rsplit(":", 1)[0]
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run(self.server.serve(sockets=[self.sock]))

    def wait_started(self, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while not self.server.started and time.monotonic() < end and self._thread.is_alive():
            time.sleep(0.01)
        return self.server.started

    def stop(self, timeout: float = 5.0) -> None:
        """Closes the listener and open connections (streams still open are cut after 2 s) and joins
        the server's thread for up to `timeout` s."""
        self.server.should_exit = True
        self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self.sock.close()

