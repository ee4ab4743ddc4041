"""The KV planner's request records: where every request is, with no policy (plain Python, no JAX).

`RequestRecord` is the planner's mutable record of one request (its tokens, KV length, prefill
target, status). `RequestBook` holds every record by id, the running ones, and per model the waiting
and swapped ones in precedence order, with the round-robin order of the models. The policy that
moves requests between these places is in `admission` and `preemption`; `KVPlanner` coordinates.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Collection

from crosspool_jax.memory.kv_virtualizer import ModelId, RequestId
from crosspool_jax.memory.planner_types import (
    Phase,
    PlannerError,
    RequestInfo,
    RequestSpec,
    RequestStatus,
    ScheduledRequest,
)

QueueEntry = tuple[tuple[int, int], RequestId]  # (precedence, request id)


@dataclasses.dataclass
class RequestRecord:
    """The planner's record of one request (lengths in tokens, caps in device pages)."""

    spec: RequestSpec
    arrival: int
    status: RequestStatus = RequestStatus.WAITING
    generated: list[int] = dataclasses.field(default_factory=list)
    kv_len: int = 0  # KV positions held (device, or host when swapped)
    prefill_target: int = 0  # KV positions to reach by prefill before decoding
    promised_len: int = 0  # KV positions the admission forecast counted on (pending until held)
    # the model's cap this request is held to: the cap at submission, raised (never lowered) by
    # limit changes while it is live (`KVPlanner.set_model_limits`); None: no cap
    cap_pages: int | None = None
    num_preemptions: int = 0
    message: str = ""
    unfit_rounds: int = 0  # admission rounds this waiting request did not fit the pool

    @property
    def precedence(self) -> tuple[int, int]:
        """Sort key: smaller runs first and is preempted last."""
        return (-self.spec.priority, self.arrival)

    @property
    def num_tokens(self) -> int:
        """Known tokens: prompt + generated."""
        return len(self.spec.prompt) + len(self.generated)

    @property
    def in_prefill(self) -> bool:
        return self.kv_len < self.prefill_target

    def info(self) -> RequestInfo:
        phase = None
        if self.status == RequestStatus.RUNNING:
            phase = Phase.PREFILL if self.in_prefill else Phase.DECODE
        return RequestInfo(
            self.spec.request_id,
            self.spec.model,
            self.status,
            self.spec.prompt,
            tuple(self.generated),
            self.kv_len,
            phase,
            self.num_preemptions,
            self.message,
        )

    def prefill_span(self) -> tuple[int, int] | None:
        """(KV positions held, KV positions its prefill reaches) while the request runs a prefill or
        waits to start or resume one (tokens); None when it decodes, resumes a decode or ended."""
        if self.status in (RequestStatus.RUNNING, RequestStatus.SWAPPED):
            return (self.kv_len, self.prefill_target) if self.in_prefill else None
        if self.status == RequestStatus.WAITING:
            return 0, self.num_tokens
        return None

    def next_length(self, decode_target: int | None, budget: int | None) -> tuple[int, int]:
        """(KV length after this step, prefill tokens it uses) for a running request: the next
        prefill chunk (at most `budget` tokens; None: no limit), or a decode to `decode_target`
        (None: one token). Raises PlannerError if the tokens its last step sampled are missing."""
        if self.in_prefill:
            chunk = self.prefill_target - self.kv_len
            if budget is not None:
                chunk = min(chunk, budget)
            return self.kv_len + chunk, chunk
        if self.num_tokens != self.kv_len + 1:
            raise PlannerError(
                f"request {self.spec.request_id!r}: append the tokens sampled by its last step "
                f"before planning the next ({self.num_tokens} tokens known, {self.kv_len} positions computed)"
            )
        return (self.kv_len + 1 if decode_target is None else decode_target), 0

    def schedule(self, target: int) -> ScheduledRequest:
        """This step's work up to `target` KV positions; `kv_len` becomes `target` (the caller has
        grown the request's pages to it)."""
        start = self.kv_len
        phase = Phase.PREFILL if self.in_prefill else Phase.DECODE
        self.kv_len = target
        samples = phase == Phase.DECODE or target == self.prefill_target
        return ScheduledRequest(self.spec.request_id, self.spec.model, phase, start, target, samples)


class RequestBook:
    """Every request's record, the running ones, and per model the queue of waiting and swapped
    ones by precedence; the models in round-robin order (order of first submission)."""

    def __init__(self) -> None:
        self.requests: dict[RequestId, RequestRecord] = {}
        self.running: dict[RequestId, RequestRecord] = {}
        self.queues: dict[ModelId, list[QueueEntry]] = {}  # per model, by precedence
        self.model_order: list[ModelId] = []  # round-robin order (first submission)
        self.rr_next = 0  # index into model_order where the next admission rotation starts
        self.live_per_model: dict[ModelId, int] = {}
        self._arrivals = 0

    def new_record(self, spec: RequestSpec, cap_pages: int | None) -> RequestRecord:
        """Records a submitted request (WAITING, the next arrival number), not yet live or queued."""
        if spec.request_id in self.requests:
            raise PlannerError(f"request id {spec.request_id!r} was already submitted")
        req = RequestRecord(spec, self._arrivals, cap_pages=cap_pages)
        self._arrivals += 1
        self.requests[spec.request_id] = req
        return req

    def open(self, req: RequestRecord) -> None:
        """Counts an accepted request live and queues it; its model joins the round-robin at its
        first request."""
        model = req.spec.model
        if model not in self.queues:
            self.queues[model] = []
            self.model_order.append(model)
        self.live_per_model[model] = self.live_per_model.get(model, 0) + 1
        self.enqueue(req)

    def enqueue(self, req: RequestRecord) -> None:
        """Queues a waiting or swapped request in its model's queue by precedence."""
        bisect.insort(self.queues[req.spec.model], (req.precedence, req.spec.request_id), key=lambda e: e[0])

    def close(self, req: RequestRecord) -> None:
        """Takes a request that is ending off the running set or its queue and counts it no longer
        live (its status is still the one it had)."""
        rid = req.spec.request_id
        if req.status == RequestStatus.RUNNING:
            del self.running[rid]
        elif req.status in (RequestStatus.WAITING, RequestStatus.SWAPPED):
            self.queues[req.spec.model].remove((req.precedence, rid))
        self.live_per_model[req.spec.model] -= 1

    def get(self, request_id: RequestId) -> RequestRecord:
        try:
            return self.requests[request_id]
        except KeyError:
            raise PlannerError(f"unknown request {request_id!r}") from None

    def live(self, request_id: RequestId) -> RequestRecord:
        req = self.get(request_id)
        if req.status.is_terminal:
            raise PlannerError(f"request {request_id!r} already ended ({req.status}: {req.message})")
        return req

    def running_ids(self) -> tuple[RequestId, ...]:
        """Running requests by precedence."""
        return tuple(r.spec.request_id for r in sorted(self.running.values(), key=lambda r: r.precedence))

    def waiting_ids(self, model: ModelId | None = None) -> tuple[RequestId, ...]:
        """Waiting and swapped requests in admission order within each model (all models: in
        round-robin order)."""
        models = self.model_order if model is None else [model]
        return tuple(rid for m in models for _, rid in self.queues.get(m, []))

    @property
    def has_live_requests(self) -> bool:
        return bool(self.running) or any(self.queues.values())

    def keep_larger_caps(self, new_cap: Callable[[ModelId], int | None]) -> None:
        """Every live request keeps the larger of its cap and its model's `new_cap` (None, no cap,
        is the largest)."""
        for req in self.requests.values():
            if not req.status.is_terminal:
                new = new_cap(req.spec.model)
                req.cap_pages = None if new is None or req.cap_pages is None else max(req.cap_pages, new)

    def drop_idle_models(self, registered: Collection[ModelId]) -> None:
        """Forgets the round-robin entries of models not in `registered` with no live requests; the
        rotation goes on from the model it would have started at."""
        gone = [m for m in self.model_order
                if m not in registered and not self.live_per_model.get(m) and not self.queues[m]]
        if not gone:
            return
        nxt = self.model_order[self.rr_next] if self.rr_next < len(self.model_order) else None
        for m in gone:
            self.model_order.remove(m)
            del self.queues[m]
            self.live_per_model.pop(m, None)
        keep = self.model_order
        self.rr_next = keep.index(nxt) if nxt in keep else (self.rr_next % len(keep) if keep else 0)

    def effective_cap(self, model: ModelId, config_cap: int | None) -> int | None:
        """The most pages `model` may hold now: its configured cap, raised by the caps its live
        requests keep from before a limit change (None: no cap)."""
        cap = config_cap
        for req in self.requests.values():
            if req.spec.model == model and not req.status.is_terminal and cap is not None:
                cap = None if req.cap_pages is None else max(cap, req.cap_pages)
        return cap
