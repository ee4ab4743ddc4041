"""Admission: whether a request may ever start, and which waiting requests start each step (plain
Python, no JAX).

At submission a request that could never fit is rejected (`rejection_reason`). Each step,
`AdmissionRound` goes round-robin over the models with waiting requests and admits each model's
first waiting request (by precedence) when the pool can hold its admission forecast
(`admission_tokens`: its prefill, or resumed length, plus the headroom) after the pages still
promised to running requests (`pending_pages`) and the unused floors of other models with demand.
With `admission_backfill` a later request of a model whose first one does not fit may start instead
(at most `BACKFILL_TRIES` tried); the starving request (`find_starving`) has its pages held back from
every other admission until it starts. The pure decisions take what they need as arguments;
`AdmissionRound` applies them to the virtualizer and the request book.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from crosspool_jax.memory.kv_virtualizer import KVVirtualizer, ModelId, RequestId
from crosspool_jax.memory.planner_config import PlannerConfig, reserved_for_others
from crosspool_jax.memory.planner_types import Admission, RequestSpec, RequestStatus, ScheduledRequest
from crosspool_jax.memory.request_book import QueueEntry, RequestBook, RequestRecord

BACKFILL_TRIES = 8  # later requests of a blocked model tried per admission round (backfill)

# ---- decisions ----------------------------------------------------------------------------------


def rejection_reason(spec: RequestSpec, kv: KVVirtualizer, config: PlannerConfig) -> str | None:
    """Why `spec` could never be served by the pool `kv` under `config` (None: it could).

    An unregistered model, an empty prompt, max_new_tokens < 1, or more KV at its longest
    (`max_kv_tokens`) than the whole pool holds, than its model's cap, or (split-KV off) than one
    KV device holds.
    """
    if spec.model not in kv.models:
        return f"model {spec.model!r} is not registered with the KV pool"
    if len(spec.prompt) < 1:
        return "empty prompt"
    if spec.max_new_tokens < 1:
        return f"max_new_tokens must be >= 1, got {spec.max_new_tokens}"
    longest = spec.max_kv_tokens
    pool_tokens = kv.max_tokens(spec.model)
    if longest > pool_tokens:
        return (
            f"needs up to {longest} tokens of KV (prompt {len(spec.prompt)} + max_new_tokens "
            f"{spec.max_new_tokens} - 1); the whole pool holds {pool_tokens} for model {spec.model!r}"
        )
    cap = config.limits(spec.model).cap_pages
    pages = kv.layout(spec.model).pages_for(longest)
    if cap is not None and pages > cap:
        return f"needs up to {pages} pages of KV; model {spec.model!r} is capped at {cap} pages"
    if not config.allow_split_kv:
        per_device = kv.max_tokens(spec.model) // kv.config.num_devices
        if longest > per_device:
            return (
                f"needs up to {longest} tokens of KV; one KV device holds {per_device} "
                "and split-KV is off"
            )
    return None


def resume_span(req: RequestRecord) -> tuple[int, int]:
    """(KV positions `req` holds when admitted, KV positions its prefill reaches): a swapped request
    keeps its KV; any other starts from 0 and prefills its prompt and generated tokens."""
    if req.status == RequestStatus.SWAPPED:
        return req.kv_len, req.prefill_target
    return 0, req.num_tokens


def admission_tokens(req: RequestRecord, step_len: int, headroom: int) -> int:
    """KV positions the admission forecast must fit for `req`: its prefill (or resumed length) plus
    `headroom` decode tokens, capped at its max_kv_tokens, and at least `step_len`."""
    resume_len, target = resume_span(req)
    return max(step_len, min(max(target, resume_len) + headroom, req.spec.max_kv_tokens))


class FirstStep(NamedTuple):
    """What the step that admits a request computes."""

    prefill_target: int  # KV positions its prefill reaches
    step_len: int  # KV positions it holds after the step
    chunk: int  # prefill tokens the step uses (0: it resumes a decode, one token)


def first_step(req: RequestRecord, budget: int | None) -> FirstStep | None:
    """The admitting step of `req`: its next prefill chunk (at most `budget` tokens; None: no
    limit), or one decode token after a swap-in. None if it needs a prefill and the budget is 0."""
    resume_len, prefill_target = resume_span(req)
    if resume_len >= prefill_target:
        return FirstStep(prefill_target, resume_len + 1, 0)
    if budget == 0:
        return None
    chunk = prefill_target - resume_len if budget is None else min(prefill_target - resume_len, budget)
    return FirstStep(prefill_target, resume_len + chunk, chunk)


def find_starving(
    book: RequestBook, starving_after_steps: int | None, held_models: frozenset[ModelId],
    held_prefills: frozenset[RequestId],
) -> RequestRecord | None:
    """The waiting request of best precedence that has not fit the pool for `starving_after_steps`
    admission rounds and may start this step (its model not in `held_models`, itself not in
    `held_prefills`); None if there is none or the policy is off (None)."""
    if starving_after_steps is None:
        return None
    best = None
    for model, queue in book.queues.items():
        if model in held_models:
            continue
        for _, rid in queue:
            req = book.requests[rid]
            if req.unfit_rounds >= starving_after_steps and rid not in held_prefills and (
                    best is None or req.precedence < best.precedence):
                best = req
    return best


def pending_pages(running: Iterable[RequestRecord], kv: KVVirtualizer) -> dict[ModelId, int]:
    """Pages `running` requests were promised at admission but do not hold yet, per model."""
    pending: dict[ModelId, int] = {}
    for req in running:
        promised_pages = kv.layout(req.spec.model).pages_for(req.promised_len)
        extra = max(0, promised_pages - kv.device_pages_held(req.spec.request_id))
        if extra:
            pending[req.spec.model] = pending.get(req.spec.model, 0) + extra
    return pending


# ---- one step's admissions ----------------------------------------------------------------------


class AdmissionRound:
    """One step's admissions over `kv` (which it drives): round-robin over the models with waiting
    requests, not in `held_models`, each admitting its first waiting request not in `held_prefills`
    (a swapped request resuming its decode is never held) or a backfill. budget: prefill tokens
    left this step (None: no limit)."""

    def __init__(
        self, kv: KVVirtualizer, config: PlannerConfig, book: RequestBook, budget: int | None,
        held_models: frozenset[ModelId] = frozenset(), held_prefills: frozenset[RequestId] = frozenset(),
    ) -> None:
        self._kv = kv
        self._config = config
        self._book = book
        self._budget = budget
        self._held_models = held_models
        self._held_prefills = held_prefills
        # the starving request and the pages its admission needs, held back from every other
        self._starving = find_starving(book, config.starving_after_steps, held_models, held_prefills)
        self._starving_pages = 0
        if self._starving is not None:
            self._starving_pages = kv.layout(self._starving.spec.model).pages_for(
                admission_tokens(self._starving, 0, config.admission_headroom_tokens)
            )
        self._counted: set[RequestId] = set()  # unfit requests counted this round

    def run(self) -> tuple[list[Admission], list[ScheduledRequest]]:
        """Admits until no model can start another request; returns the admissions and their work
        this step, in admission order."""
        book = self._book
        admitted: list[Admission] = []
        run: list[ScheduledRequest] = []
        blocked: set[ModelId] = set(self._held_models)
        n = len(book.model_order)
        while True:
            progressed = False
            for i in range(n):
                index = (book.rr_next + i) % n
                model = book.model_order[index]
                if model in blocked:
                    continue
                picked = self._pick(book.queues[model])
                if picked is None:
                    blocked.add(model)
                    continue
                j, admission, budget_used = picked
                _, rid = book.queues[model].pop(j)
                admitted.append(admission)
                if self._starving is not None and self._starving.spec.request_id == rid:
                    self._starving = None
                if self._budget is not None:
                    self._budget -= budget_used
                run.append(book.requests[rid].schedule(self._kv.num_tokens(rid)))
                book.rr_next = (index + 1) % n
                progressed = True
                break  # restart the rotation from the next model
            if not progressed:
                return admitted, run

    def _pick(self, queue: list[QueueEntry]) -> tuple[int, Admission, int] | None:
        """Admits the first request of a model's `queue` (not a held prefill) that may start now:
        (its queue index, the admission, prefill budget used), or None. Past a request that does
        not fit the pool only with `admission_backfill`, at most `BACKFILL_TRIES` of them (a try
        costs a pass over the running requests); every request but the starving one fits beside
        the pages held back for it."""
        tries = 0
        for j, (_, rid) in enumerate(queue):
            req = self._book.requests[rid]
            if rid in self._held_prefills and req.prefill_span() is not None:
                continue
            starving = self._starving
            held_back = self._starving_pages if starving is not None and starving is not req else 0
            # with nothing running, floors reserve pages for requests that cannot start
            # either: the first admission into an idle pool ignores them (no deadlock)
            admission, budget_used, unfit = self._try_admit(req, not self._book.running, held_back)
            if admission is not None:
                req.unfit_rounds = 0
                return j, admission, budget_used
            if unfit != "pool":
                return None  # the budget is spent, or the model is at its cap
            if rid not in self._counted:  # once per step, however often the rotation tries it
                self._counted.add(rid)
                req.unfit_rounds += 1
            tries += 1
            if not self._config.admission_backfill or tries > BACKFILL_TRIES:
                return None
        return None

    def _try_admit(
        self, req: RequestRecord, ignore_floors: bool, held_back: int
    ) -> tuple[Admission | None, int, str | None]:
        """Admit `req` if it fits (device pages allocated, status RUNNING): (admission, prefill
        tokens it uses, None); else (None, 0, why: "budget", "cap" or "pool"). held_back: pages
        kept free for a starving request."""
        rid = req.spec.request_id
        model = req.spec.model
        step = first_step(req, self._budget)
        if step is None:
            return None, 0, "budget"
        forecast_len = admission_tokens(req, step.step_len, self._config.admission_headroom_tokens)
        unfit = self._forecast_unfit(model, forecast_len, ignore_floors, req.cap_pages, held_back)
        if unfit is not None:
            return None, 0, unfit
        # the forecast checked that the pool can place forecast_len >= step_len tokens for a new
        # request of this model now, so the swap-in (placed like a new request) and the growth fit
        allow_split = self._config.allow_split_kv
        swap_in = None
        if req.status == RequestStatus.SWAPPED:
            swap_in = self._kv.swap_in(rid, allow_split=allow_split)
        else:
            self._kv.add_request(rid, model)
            req.prefill_target = step.prefill_target
        resumed = req.num_preemptions > 0
        req.promised_len = forecast_len
        req.status = RequestStatus.RUNNING
        req.message = "running"
        self._book.running[rid] = req
        # `RequestRecord.schedule` (called by `run`) advances kv_len; pages are grown here
        self._kv.grow(rid, step.step_len, allow_split=allow_split)
        return Admission(rid, model, resumed, swap_in), step.chunk, None

    def _forecast_unfit(
        self, model: ModelId, tokens: int, ignore_floors: bool, cap: int | None, held_back: int
    ) -> str | None:
        """Why a new request of `model` holding `tokens` tokens does not fit the admission
        forecast ("cap": its model's cap, held to `cap`; "pool": the pool, after `held_back`
        pages kept for a starving request), or None if it fits."""
        kv = self._kv
        pages = kv.layout(model).pages_for(tokens)
        pending = pending_pages(self._book.running.values(), kv)
        if cap is not None and kv.model_pages(model) + pending.get(model, 0) + pages > cap:
            return "cap"
        reserved = 0 if ignore_floors else reserved_for_others(
            self._config, model, self._book.live_per_model, lambda m: kv.model_pages(m) + pending.get(m, 0)
        )
        available = kv.total_free_pages - sum(pending.values()) - reserved - held_back
        if pages > available:
            return "pool"
        return None if kv.can_fit(model, tokens, allow_split=self._config.allow_split_kv) else "pool"
