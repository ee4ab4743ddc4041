"""KV planner: admission, growth and preemption policy over the shared KV pool.

The planner owns the lifecycle of every request (waiting, running, swapped, and the terminal
states) and decides, once per engine step, which requests run, which are preempted and how, and
which waiting ones are admitted. It is plain host-side bookkeeping: dataclasses in, dataclasses out,
no clocks, no threads. The policy and its reasons are in docs/planner.md; in short:

- Precedence: higher `priority` first, then earlier arrival. A request keeps its arrival number when
  it is preempted, so it resumes ahead of the requests of its model that arrived after it.
- Admission by aggregate active demand: a waiting request is admitted when the pool (all devices,
  split-KV allowed) can hold its prefill plus `admission_headroom_tokens` decode tokens, after the
  pages still promised to running prefills and the unused floors of other models with demand.
- Fairness: round-robin over models with waiting requests; FCFS (by precedence) within a model,
  and a head that does not fit blocks only its own model's queue. With `admission_backfill` a
  later request of that model that fits the pool starts instead. A waiting request that has not
  fit the pool in `starving_after_steps` admission rounds is starving: the one of best
  precedence has its pages held back from every other admission (any model's, backfills
  included) until it starts, so a long prompt is not passed forever by shorter ones.
- Floors and caps: `ModelLimits.floor_pages` are reserved for a model while it has live requests
  (other models can neither be admitted into nor grow into them, nor preempt its requests below
  them); `cap_pages` bounds the device pages a model may hold.
- Limits change while requests run (`set_model_limits`, the static mode adding or removing a model):
  nothing is preempted by the change. A request live at the change keeps the larger of its old and
  its new cap, so a model whose new cap is below what it holds keeps its pages and its running
  requests keep growing (out of free pages, as before); requests submitted after the change are held
  to the new cap, so the model admits none of them until it is back under it. New floors reserve
  pages as they free up.
- Growth: running requests grow in precedence order. When one does not fit, the lowest-precedence
  running request that can help loses its pages; if none is left, the growing request itself does.
- Preemption mode: swap to host if host slots allow and (in AUTO) the swap round trip is estimated
  cheaper than recomputing; else drop and recompute (re-prefill prompt + generated tokens).
- A request that could never fit (longer than the whole pool, or than its model's cap) is rejected
  at submission. No other request is ever dropped: each ends FINISHED, CANCELLED or FAILED with a
  message.

`KVPlanner` coordinates; the pieces are modules of their own, each plain Python: `planner_config`
(the knobs, floor arithmetic), `planner_types` (requests, step input and plan, errors),
`request_book` (where every request is), `preemption` (growth, victim, swap or recompute and its
cost model), `admission` (rejection at submission, the admission forecast, round-robin with backfill
and starving requests). The public names of `planner_config` and `planner_types` are importable from
here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from crosspool_jax.memory.admission import BACKFILL_TRIES, AdmissionRound, rejection_reason
from crosspool_jax.memory.kv_virtualizer import (
    KVVirtualizer,
    ModelId,
    PhysicalPage,
    RequestId,
    Residency,
    SwapPlan,
)
from crosspool_jax.memory.planner_config import (
    ModelLimits,
    PlannerConfig,
    PreemptionChoice,
    check_floors_fit,
)
from crosspool_jax.memory.planner_types import (
    Admission,
    Phase,
    PlannerError,
    Preemption,
    PreemptionMode,
    RequestInfo,
    RequestRejected,
    RequestSpec,
    RequestStatus,
    ScheduledRequest,
    StepInput,
    StepPlan,
)
from crosspool_jax.memory.preemption import GrowthRound, preemption_costs_s
from crosspool_jax.memory.request_book import RequestBook, RequestRecord

__all__ = [
    "BACKFILL_TRIES",
    "Admission",
    "KVPlanner",
    "ModelLimits",
    "Phase",
    "PhysicalPage",  # kv_virtualizer's, importable from here as before the split
    "PlannerConfig",
    "PlannerError",
    "Preemption",
    "PreemptionChoice",
    "PreemptionMode",
    "RequestInfo",
    "RequestRejected",
    "RequestSpec",
    "RequestStatus",
    "ScheduledRequest",
    "StepInput",
    "StepPlan",
    "SwapPlan",  # kv_virtualizer's, importable from here as before the split
]


class KVPlanner:
    """Admission, growth and preemption over a `KVVirtualizer` (which it drives exclusively)."""

    def __init__(self, virtualizer: KVVirtualizer, config: PlannerConfig | None = None) -> None:
        self._kv = virtualizer
        self._config = config or PlannerConfig()
        check_floors_fit(self._config, virtualizer.config.total_pages)
        self._book = RequestBook()

    def set_model_limits(self, limits: Mapping[ModelId, ModelLimits]) -> None:
        """Replaces every model's floor and cap (models not named: none), also while requests are live.

        The rule (module docstring): nothing is preempted by the change. A live request keeps the
        larger of its old and new cap (None, no cap, is the largest), so requests live at the change
        run to their end as they would have; requests submitted later are held to the new cap (a
        model holding more than it admits none of them until it is under it). Floors apply from the
        next step. Raises ValueError (nothing changed) if the floors exceed the pool."""
        cfg = dataclasses.replace(self._config, model_limits=dict(limits))
        check_floors_fit(cfg, self._kv.config.total_pages)
        self._book.keep_larger_caps(lambda model: cfg.limits(model).cap_pages)
        self._config = cfg
        self._book.drop_idle_models(self._kv.models)  # models gone from the pool

    @property
    def config(self) -> PlannerConfig:
        return self._config

    def update_costs(self, host_link_bytes_per_s: float | None = None,
                     prefill_tokens_per_s: Mapping[ModelId, float] | None = None) -> None:
        """Replace the swap/recompute cost constants with measured ones (the engine measures its
        own swaps and prefill calls); later preemptions use them."""
        cfg = self._config
        if host_link_bytes_per_s is not None:
            cfg = dataclasses.replace(cfg, host_link_bytes_per_s=float(host_link_bytes_per_s))
        if prefill_tokens_per_s:
            rates = dict(cfg.model_prefill_tokens_per_s)
            rates.update({m: float(r) for m, r in prefill_tokens_per_s.items()})
            cfg = dataclasses.replace(cfg, model_prefill_tokens_per_s=rates)
        self._config = cfg

    @property
    def virtualizer(self) -> KVVirtualizer:
        return self._kv

    def preemption_costs_s(self, model: ModelId, pages: int, kv_tokens: int) -> tuple[float, float]:
        """Estimated (swap round trip, recompute) seconds for a request holding `pages` / `kv_tokens`.

        Swap: pages * page_bytes copied out and back over the host link. Recompute: re-prefill of
        kv_tokens tokens at the model's prefill rate.
        """
        return preemption_costs_s(self._config, self._kv.config.page_bytes, model, pages, kv_tokens)

    # -- lifecycle API --

    def submit(self, spec: RequestSpec) -> RequestInfo:
        """Queue a request. Raises RequestRejected (and records it REJECTED) if it could never fit."""
        req = self._book.new_record(spec, self._config.limits(spec.model).cap_pages)
        reason = rejection_reason(spec, self._kv, self._config)
        if reason is not None:
            req.status = RequestStatus.REJECTED
            req.message = reason
            raise RequestRejected(spec.request_id, reason)
        req.message = "waiting for admission"
        self._book.open(req)
        return req.info()

    def append_tokens(self, request_id: RequestId, tokens: Sequence[int]) -> RequestInfo:
        """Record tokens sampled for a running request; finishes it at max_new_tokens."""
        req = self._book.get(request_id)
        if req.status != RequestStatus.RUNNING:
            raise PlannerError(f"request {request_id!r} is {req.status}, not running: cannot append tokens")
        if req.num_tokens + len(tokens) > req.kv_len + 1:
            raise PlannerError(
                f"request {request_id!r}: {len(tokens)} tokens appended but only "
                f"{req.kv_len + 1 - req.num_tokens} were sampled by the scheduled positions"
            )
        if len(req.generated) + len(tokens) > req.spec.max_new_tokens:
            raise PlannerError(
                f"request {request_id!r}: {len(req.generated) + len(tokens)} tokens exceed max_new_tokens "
                f"{req.spec.max_new_tokens}"
            )
        req.generated.extend(int(t) for t in tokens)
        if len(req.generated) == req.spec.max_new_tokens:
            self._end(req, RequestStatus.FINISHED, "finished: max_new_tokens reached")
        return req.info()

    def finish(self, request_id: RequestId, message: str = "finished") -> RequestInfo:
        """End a live request normally (e.g. a stop token); frees its pages now. Usually the
        request is running; an engine that plans ahead of its device (placeholder tokens, see
        `revise_tokens`) may learn of a stop token after the request was preempted."""
        req = self._book.live(request_id)
        self._end(req, RequestStatus.FINISHED, message)
        return req.info()

    def revise_tokens(self, request_id: RequestId, start: int, tokens: Sequence[int]) -> RequestInfo:
        """Replace generated tokens [start, start + len(tokens)) with their real values.

        An engine that plans the next step while the device still computes this one appends
        placeholders for the tokens in flight (`append_tokens`: only their count matters to
        planning) and revises them once they arrive. Any state but forgotten is allowed: tokens of a
        request that ended at max_new_tokens on placeholders arrive after it ended."""
        req = self._book.get(request_id)
        if not 0 <= start <= start + len(tokens) <= len(req.generated):
            raise PlannerError(f"request {request_id!r}: tokens [{start}, {start + len(tokens)}) "
                               f"outside the {len(req.generated)} generated")
        req.generated[start:start + len(tokens)] = [int(t) for t in tokens]
        return req.info()

    def cancel(self, request_id: RequestId, message: str = "cancelled") -> RequestInfo:
        """End a live request at the client's wish; frees its pages (device or host) now."""
        req = self._book.live(request_id)
        self._end(req, RequestStatus.CANCELLED, message)
        return req.info()

    def fail(self, request_id: RequestId, message: str) -> RequestInfo:
        """End a live request with an error; frees its pages now."""
        if not message:
            raise PlannerError("a failure needs a message")
        req = self._book.live(request_id)
        self._end(req, RequestStatus.FAILED, message)
        return req.info()

    def info(self, request_id: RequestId) -> RequestInfo:
        return self._book.get(request_id).info()

    def prefill_span(self, request_id: RequestId) -> tuple[int, int] | None:
        """(KV positions held, KV positions its prefill reaches) of a request running a prefill or
        waiting to start or resume one (tokens); None when it decodes, resumes a decode or ended.
        Cheap (no snapshot): the runner asks it of every such request each step."""
        return self._book.get(request_id).prefill_span()

    def forget(self, request_id: RequestId) -> None:
        """Drop the record of a request in a terminal state."""
        req = self._book.get(request_id)
        if not req.status.is_terminal:
            raise PlannerError(f"request {request_id!r} is {req.status}; only ended requests are forgotten")
        del self._book.requests[request_id]

    def running(self) -> tuple[RequestId, ...]:
        """Running requests by precedence."""
        return self._book.running_ids()

    def waiting(self, model: ModelId | None = None) -> tuple[RequestId, ...]:
        """Waiting and swapped requests in admission order within each model."""
        return self._book.waiting_ids(model)

    @property
    def has_live_requests(self) -> bool:
        return self._book.has_live_requests

    # -- the step --

    def step(self, step_input: StepInput | None = None) -> StepPlan:
        """Plan one engine step: grow running requests (preempting if needed), then admit."""
        step_input = step_input or StepInput()
        budget = step_input.prefill_token_budget
        if budget is not None and budget < 0:
            raise PlannerError(f"prefill_token_budget must be >= 0, got {budget}")
        targets = self._decode_targets(step_input.decode_lengths)
        growth = GrowthRound(self._kv, self._config, self._book)
        run, budget = growth.run(targets, budget, step_input.held_prefills)
        admitted: list[Admission] = []
        if not growth.preempted:  # a step plan never holds both swap-outs and swap-ins
            admission = AdmissionRound(
                self._kv, self._config, self._book, budget, step_input.held_models, step_input.held_prefills
            )
            admitted, started = admission.run()
            run.extend(started)
        return StepPlan(tuple(run), tuple(growth.preempted), tuple(admitted))

    # -- step internals --

    def _decode_targets(self, decode_lengths: Mapping[RequestId, int]) -> dict[RequestId, int]:
        for rid, target in decode_lengths.items():
            req = self._book.running.get(rid)
            if req is None or req.in_prefill:
                raise PlannerError(f"decode length given for {rid!r}, which is not a running decode request")
            if not req.kv_len < target <= req.spec.max_kv_tokens:
                raise PlannerError(
                    f"request {rid!r}: decode length {target} outside "
                    f"({req.kv_len}, {req.spec.max_kv_tokens}]"
                )
        return dict(decode_lengths)

    # -- helpers --

    def _end(self, req: RequestRecord, status: RequestStatus, message: str) -> None:
        """Ends a live request with `status` and frees its pages (device or host)."""
        self._book.close(req)
        if self._kv.has_request(req.spec.request_id):
            self._kv.free(req.spec.request_id)
        req.status = status
        req.message = message

    def check_invariants(self) -> None:
        """Cross-check planner and virtualizer books; raise PlannerError on any inconsistency."""
        self._kv.check_invariants()
        running = self._book.running
        for rid, req in self._book.requests.items():
            in_kv = self._kv.has_request(rid)
            if req.status == RequestStatus.RUNNING:
                if rid not in running or not in_kv or self._kv.residency(rid) != Residency.RESIDENT:
                    raise PlannerError(f"running request {rid!r} not resident")
                if self._kv.num_tokens(rid) != req.kv_len:
                    raise PlannerError(
                        f"request {rid!r}: kv_len {req.kv_len} != pool {self._kv.num_tokens(rid)}"
                    )
            elif req.status == RequestStatus.SWAPPED:
                if not in_kv or self._kv.residency(rid) != Residency.SWAPPED:
                    raise PlannerError(f"swapped request {rid!r} not swapped in the pool")
            elif in_kv:
                raise PlannerError(f"request {rid!r} is {req.status} but holds KV")
        for model in self._kv.models:
            cap = self._book.effective_cap(model, self._config.limits(model).cap_pages)
            if cap is not None and self._kv.model_pages(model) > cap:
                raise PlannerError(f"model {model!r} holds {self._kv.model_pages(model)} pages > cap {cap}")
