"""The narrow engine interface the gRPC server depends on (JetStream-style), `EngineCore` and
`ReferenceEngine`.

The server only sees `EngineInterface` (a Protocol) and the plain dataclasses below, so the pooled engine can
replace `ReferenceEngine` without touching the server. `EngineCore` is what both engines share: model
records without weights, request bookkeeping, the one final event, stats and shutdown of the worker
threads (the pooled engine, `crosspool_jax.engine.PooledEngine`, subclasses it and keeps weights only
in its arenas). `ReferenceEngine` runs the single-model reference path (`ReferenceGenerator`'s jitted
prefill/decode) token by token on one worker thread:

- a bounded number of live requests (queued + running); one more raises `QueueFullError`;
- `cancel(request_id)` removes the request at once and the worker stops it before its next token;
- `unload_model(name)` fails that model's live requests with a final "error" event naming the unload;
- every request ends with exactly one final event (finish_reason set), so no consumer ever hangs.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from crosspool_jax.detokenize import IncrementalDetokenizer
from crosspool_jax.errors import CapacityError, CrossPoolError, InvalidRequestError
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.models.config import ModelConfig, without_unreachable_eos
from crosspool_jax.models.params import ModelWeights
from crosspool_jax.models.reference import ReferenceGenerator, validate_request

FINISH_STOP = "stop"  # a stop token was generated
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_CANCELLED = "cancelled"  # cancel(request_id) (client cancel, deadline)
FINISH_ERROR = "error"  # the engine failed the request (model unloaded, shutdown, internal error)


class ModelNotFoundError(CrossPoolError, KeyError):
    """A request or call names a model that is not loaded."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "model not found"


class QueueFullError(CapacityError):
    """The engine holds its maximum number of live requests; the caller may retry later."""


class EngineClosedError(CrossPoolError):
    """The engine is shutting down and takes no new requests."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request. `request_id` is generated when empty."""

    model: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int = 32
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    request_id: str = ""


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclasses.dataclass(frozen=True)
class Event:
    """One streamed event. Token events carry token_id/text; the final event carries finish_reason and
    usage (and also the last token when the request ended on a token). `error` is set when
    finish_reason == "error". `timestamp` is time.time() when the event was produced."""

    request_id: str
    index: int  # position of the token among the generated ones (-1: no token in this event)
    token_id: int | None
    text: str
    timestamp: float
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What ListModels shows about a loaded model."""

    name: str
    family: str
    num_layers: int
    num_experts: int
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    source: str


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and counters."""

    queue_depth: int  # live requests not yet started
    running: int  # live requests generating now
    max_live_requests: int
    live_request_ids: tuple[str, ...]
    completed: int
    cancelled: int
    failed: int
    tokens_generated: int
    models: tuple[str, ...]
    # (device name, KV pages used, KV pages total) per KV device; empty when the engine has no KV pool
    kv_pages: tuple[tuple[str, int, int], ...] = ()
    preemptions: int = 0  # requests preempted (swapped out or recomputed) since the engine started
    # (model, "resident" | "sleeping" | "on_disk" | "waking") per registered model (pooled engine)
    model_states: tuple[tuple[str, str], ...] = ()


class RequestHandle:
    """A submitted request: iterate it (or `events()`) for its events; the last one is final."""

    def __init__(self, request_id: str, engine: EngineInterface):
        self.request_id = request_id
        self._engine = engine
        self._q: queue.Queue[Event] = queue.Queue()

    def _put(self, ev: Event) -> None:
        self._q.put(ev)

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None when none arrives within `timeout` seconds."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self) -> Iterator[Event]:
        """Yields events until (and including) the final one."""
        while True:
            ev = self._q.get()
            yield ev
            if ev.final:
                return

    __iter__ = events

    def cancel(self) -> bool:
        """Cancels this request (see EngineInterface.cancel)."""
        return self._engine.cancel(self.request_id)


class EngineInterface(Protocol):
    """What the server needs from an engine."""

    def list_models(self) -> list[ModelInfo]: ...

    def load_model(self, name: str, path: str) -> ModelInfo: ...

    def unload_model(self, name: str) -> int: ...

    def submit(self, request: Request) -> RequestHandle: ...

    def cancel(self, request_id: str) -> bool: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self, timeout: float | None = None) -> None: ...


@dataclasses.dataclass
class ModelRecord:
    """What an engine keeps of a loaded model besides its weights (those live where the engine puts
    them: a `ReferenceGenerator`, an arena)."""

    info: ModelInfo
    config: ModelConfig  # eos ids outside the vocabulary dropped
    tokenizer: Any  # encode/decode or None


@dataclasses.dataclass
class _Model(ModelRecord):
    """A `ReferenceEngine` model: the record plus its generator (which holds the weights)."""

    generator: ReferenceGenerator | None = None


@dataclasses.dataclass
class _Live:
    request: Request
    handle: RequestHandle
    model: ModelRecord
    running: bool = False
    done: bool = False


class EngineCore:
    """What every engine shares: model records (config, info, tokenizer; no weights), request
    bookkeeping (live requests, handles, submit validation, cancel, the one final event, counters,
    stats) and shutdown of its worker threads. A subclass places weights, hands submitted requests
    to its workers (`_enqueue`) and starts them (`_start_workers`)."""

    def __init__(self, max_live_requests: int = 64):
        if max_live_requests < 1:
            raise ValueError(f"max_live_requests must be >= 1, got {max_live_requests}")
        self.max_live_requests = max_live_requests
        self._lock = threading.Lock()
        self._models: dict[str, ModelRecord] = {}
        self._adding: set[str] = set()  # names being added (placed, not registered yet)
        self._live: dict[str, _Live] = {}
        self._ids = itertools.count()
        self._closed = False
        self._counts = {"completed": 0, "cancelled": 0, "failed": 0, "tokens": 0}
        self._workers: list[threading.Thread] = []

    def _start_workers(self, workers: Sequence[threading.Thread]) -> None:
        """Starts the engine's worker threads; from now on shutdown() (or interpreter exit) joins them."""
        self._workers = list(workers)
        for t in self._workers:
            t.start()
        _RUNNING_ENGINES.add(self)

    # ---- subclass hooks -------------------------------------------------------------------------
    def _enqueue(self, lv: _Live) -> None:
        """Hands a submitted (live) request to the worker that runs it."""
        raise NotImplementedError

    def _on_cancel(self, lv: _Live) -> None:
        """A live request was cancelled (its final event is sent): let the workers free it."""

    def _on_unload(self, name: str) -> None:
        """A model was removed from the records (its live requests failed): free its weights."""

    def _stop_workers(self) -> None:
        """Asks every worker to return after its current step (shutdown joins them)."""
        raise NotImplementedError

    # ---- models -------------------------------------------------------------------------------
    def _begin_add(self, name: str, config: ModelConfig, source: str) -> tuple[ModelConfig, ModelInfo]:
        """Reserves `name` for a model being added (refused if loaded or being added) and returns
        its config (eos ids outside the vocabulary dropped, with a warning) and ModelInfo; finish with
        `_end_add` (or `_abort_add`)."""
        if not name:
            raise InvalidRequestError("a model name must not be empty")
        config = without_unreachable_eos(config, f"model {name!r}")
        info = ModelInfo(
            name=name,
            family=str(config.family.value),
            num_layers=config.num_layers,
            num_experts=config.num_experts,
            vocab_size=config.vocab_size,
            max_position_embeddings=config.max_position_embeddings,
            hidden_size=config.hidden_size,
            source=source,
        )
        with self._lock:
            self._check_free_name(name)
            self._adding.add(name)
        return config, info

    def _end_add(self, record: ModelRecord) -> ModelInfo:
        with self._lock:
            self._adding.discard(record.info.name)
            self._models[record.info.name] = record
        return record.info

    def _abort_add(self, name: str) -> None:
        with self._lock:
            self._adding.discard(name)

    def _check_free_name(self, name: str) -> None:
        """Raises InvalidRequestError if `name` is loaded or being added (call under the lock)."""
        if name in self._models or name in self._adding:
            raise InvalidRequestError(f"a model named {name!r} is already loaded; unload it first")

    def unload_model(self, name: str) -> int:
        """Removes a model; its live requests end with an "error" event. Returns how many were failed."""
        with self._lock:
            if name not in self._models:
                raise ModelNotFoundError(f"model {name!r} is not loaded")
            del self._models[name]
            victims = [lv for lv in self._live.values() if lv.request.model == name]
        for lv in victims:
            self._finish(lv, FINISH_ERROR, error=f"model {name!r} was unloaded while the request was live")
        self._on_unload(name)
        return len(victims)

    def list_models(self) -> list[ModelInfo]:
        with self._lock:
            return [m.info for m in self._models.values()]

    def model_eos_ids(self, name: str) -> tuple[int, ...]:
        """The model's eos ids (its config's, those inside the vocabulary): a request's default stops."""
        return tuple(self._model(name).config.eos_token_ids)

    def tokenizer(self, name: str) -> Any:
        """The model's tokenizer (None when it has none)."""
        return self._model(name).tokenizer

    def _model(self, name: str) -> Any:
        """The model's record (`ModelRecord`, or the engine's subclass of it)."""
        with self._lock:
            m = self._models.get(name)
        if m is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        return m

    # ---- requests -----------------------------------------------------------------------------
    def submit(self, request: Request) -> RequestHandle:
        """Validates and queues a request. Raises ModelNotFoundError, InvalidRequestError,
        QueueFullError or EngineClosedError."""
        model = self._model(request.model)
        r = request
        validate_request(model.config, r.prompt_ids, r.max_new_tokens, r.stop_token_ids)
        rid = request.request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        request = dataclasses.replace(request, request_id=rid)
        handle = RequestHandle(rid, self)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shutting down")
            if rid in self._live:
                raise InvalidRequestError(f"request id {rid!r} is already live")
            if len(self._live) >= self.max_live_requests:
                raise QueueFullError(
                    f"the engine holds its maximum of {self.max_live_requests} live requests; retry later"
                )
            lv = self._live[rid] = _Live(request, handle, model)
        self._enqueue(lv)
        return handle

    def cancel(self, request_id: str) -> bool:
        """Ends a live request with a "cancelled" event; False when it is not live (done or unknown)."""
        with self._lock:
            lv = self._live.get(request_id)
        if lv is None or not self._finish(lv, FINISH_CANCELLED):
            return False
        self._on_cancel(lv)
        return True

    def stats(self) -> EngineStats:
        with self._lock:
            running = sum(1 for lv in self._live.values() if lv.running)
            return EngineStats(
                queue_depth=len(self._live) - running,
                running=running,
                max_live_requests=self.max_live_requests,
                live_request_ids=tuple(self._live),
                completed=self._counts["completed"],
                cancelled=self._counts["cancelled"],
                failed=self._counts["failed"],
                tokens_generated=self._counts["tokens"],
                models=tuple(self._models),
            )

    def shutdown(self, timeout: float | None = None) -> None:
        """Stops taking requests, lets live ones finish for up to `timeout` seconds (None: wait), then
        fails what is left and stops the workers."""
        with self._lock:
            self._closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                left = list(self._live.values())
            if not left or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(0.01)
        for lv in left:
            self._finish(lv, FINISH_ERROR, error="the engine shut down before the request finished")
        self._stop_workers()
        # Wait for each worker's current step, however long (an XLA compile can take minutes): a
        # daemon thread still inside XLA when the interpreter finalizes aborts the whole process
        # ("terminate called after throwing an instance of ''" / SIGSEGV).
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join()
        _RUNNING_ENGINES.discard(self)

    # ---- internals ----------------------------------------------------------------------------
    def _count_tokens(self, n: int = 1) -> None:
        with self._lock:
            self._counts["tokens"] += n

    def _put_token(self, lv: _Live, event: Event) -> bool:
        """Streams a token event unless `lv` has ended. Checked and put under the lock `_finish`
        sets `done` under, so a token can never follow the final event (a cancel from another
        thread finishes the request while the worker is emitting)."""
        with self._lock:
            if lv.done:
                return False
            lv.handle._put(event)
            return True

    def _finish(
        self,
        lv: _Live,
        reason: str,
        error: str | None = None,
        last: tuple[int, int | None, str] | None = None,
        completion_tokens: int = 0,
    ) -> bool:
        """Sends the one final event of `lv` and forgets it. Idempotent: False when already done."""
        with self._lock:
            if lv.done:
                return False
            lv.done = True
            self._live.pop(lv.request.request_id, None)
            key = {FINISH_CANCELLED: "cancelled", FINISH_ERROR: "failed"}.get(reason, "completed")
            self._counts[key] += 1
        index, token_id, text = last if last is not None else (-1, None, "")
        lv.handle._put(
            Event(
                request_id=lv.request.request_id,
                index=index,
                token_id=token_id,
                text=text,
                timestamp=time.time(),
                finish_reason=reason,
                usage=Usage(len(lv.request.prompt_ids), completion_tokens),
                error=error,
            )
        )
        return True


class ReferenceEngine(EngineCore):
    """`EngineInterface` over one `ReferenceGenerator` per model; one worker thread runs requests in order."""

    def __init__(self, max_live_requests: int = 64):
        super().__init__(max_live_requests)
        self._pending: queue.Queue[str | None] = queue.Queue()
        self._start_workers([threading.Thread(target=self._run, name="crosspool-reference-engine",
                                              daemon=True)])

    # ---- models -------------------------------------------------------------------------------
    def add_model(
        self, name: str, config: ModelConfig, weights: ModelWeights, tokenizer: Any = None, source: str = ""
    ) -> ModelInfo:
        """Registers an in-memory model (demo models, tests). Replacing a live name is refused. eos
        ids of `config` outside its vocabulary are dropped with a warning."""
        config, info = self._begin_add(name, config, source)
        try:
            record = _Model(info, config, tokenizer, ReferenceGenerator(config, weights))
        except BaseException:
            self._abort_add(name)
            raise
        return self._end_add(record)

    def load_model(self, name: str, path: str) -> ModelInfo:
        """Loads an HF directory or crosspool checkpoint from `path` under `name`."""
        from checkpoints import load_model  # local import: checkpoints pulls in orbax

        with self._lock:
            self._check_free_name(name)
        m = load_model(path)
        return self.add_model(name, m.config, m.weights, m.tokenizer, source=str(path))

    # ---- the worker ---------------------------------------------------------------------------
    def _enqueue(self, lv: _Live) -> None:
        self._pending.put(lv.request.request_id)

    def _stop_workers(self) -> None:
        self._pending.put(None)

    def _run(self) -> None:
        while True:
            rid = self._pending.get()
            if rid is None:
                return
            with self._lock:
                lv = self._live.get(rid)
                if lv is None or lv.done:
                    continue
                lv.running = True
            try:
                self._generate(lv)
            except Exception as e:  # never leave a consumer hanging on an engine bug
                msg = " ".join(str(e).split()) or type(e).__name__
                self._finish(lv, FINISH_ERROR, error=f"internal error: {type(e).__name__}: {msg}")

    def _generate(self, lv: _Live) -> None:
        """Prefill, then decode one token at a time, checking for cancel/unload between tokens."""
        req, gen, tok_model = lv.request, lv.model.generator, lv.model.tokenizer
        stops = {int(x) for x in req.stop_token_ids}
        out: list[int] = []
        detok = IncrementalDetokenizer(tok_model) if tok_model is not None else None
        for t in gen.stream_tokens(req.prompt_ids, req.max_new_tokens, req.sampling):
            if lv.done:  # cancelled or failed by another thread: stop before emitting more
                return
            out.append(t)
            piece = detok.push(t) if detok is not None else ""
            self._count_tokens()
            reason = FINISH_STOP if t in stops else FINISH_LENGTH if len(out) >= req.max_new_tokens else None
            if reason is not None:
                if detok is not None:
                    piece += detok.flush()  # a held-back tail
                self._finish(lv, reason, last=(len(out) - 1, t, piece), completion_tokens=len(out))
                return
            self._put_token(lv, Event(req.request_id, len(out) - 1, t, piece, time.time()))


# Engines whose worker may still run. At interpreter exit (after non-daemon threads are joined,
# before daemon threads are frozen) each is shut down, so no worker is inside XLA when the process
# finalizes, even when the user never called shutdown().
_RUNNING_ENGINES: weakref.WeakSet[EngineCore] = weakref.WeakSet()


@atexit.register
def _shutdown_running_engines() -> None:
    for engine in list(_RUNNING_ENGINES):
        engine.shutdown(timeout=0)


def make_request(
    model: str,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 32,
    sampling: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
    request_id: str = "",
) -> Request:
    """A `Request` from plain values (lists are turned into tuples)."""
    return Request(
        model=model,
        prompt_ids=tuple(int(t) for t in prompt_ids),
        max_new_tokens=int(max_new_tokens),
        sampling=sampling or SamplingParams(),
        stop_token_ids=tuple(int(t) for t in stop_token_ids),
        request_id=request_id,
    )
