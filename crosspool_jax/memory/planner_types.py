"""The KV planner's data types: request states and snapshots, step input and step plan, errors.

Plain frozen dataclasses and enums (no JAX); `crosspool_jax.memory.planner` re-exports them all.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from crosspool_jax.memory.kv_virtualizer import ModelId, PhysicalPage, RequestId, SwapPlan

# ---- requests -----------------------------------------------------------------------------------


class RequestStatus(enum.StrEnum):
    WAITING = "waiting"  # not running; KV (if any) dropped: (re)starts with a prefill
    SWAPPED = "swapped"  # not running; KV on host: resumes with a swap-in
    RUNNING = "running"  # holds device pages
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"
    REJECTED = "rejected"  # refused at submission (could never fit)

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {RequestStatus.FINISHED, RequestStatus.CANCELLED, RequestStatus.FAILED, RequestStatus.REJECTED}
)


class PlannerError(Exception):
    """Misuse of the planner API (unknown request, wrong state, inconsistent step input)."""


class RequestRejected(PlannerError):
    """A submission the pool can never serve; the request is recorded as REJECTED."""

    def __init__(self, request_id: RequestId, reason: str) -> None:
        super().__init__(f"request {request_id!r} rejected: {reason}")
        self.request_id = request_id
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class RequestSpec:
    """A request as submitted: prompt token ids and the most tokens it may generate."""

    request_id: RequestId
    model: ModelId
    prompt: tuple[int, ...]
    max_new_tokens: int
    priority: int = 0  # higher runs first and is preempted last

    @property
    def max_kv_tokens(self) -> int:
        """Most KV positions the request ever needs: the last generated token is never fed back."""
        return len(self.prompt) + self.max_new_tokens - 1


class Phase(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclasses.dataclass(frozen=True)
class RequestInfo:
    """Snapshot of a request.

    kv_len: tokens whose KV is held (on device, or on host when swapped).
    phase: for a running request, whether its next step is a prefill chunk or a decode (else None).
    """

    request_id: RequestId
    model: ModelId
    status: RequestStatus
    prompt: tuple[int, ...]
    generated: tuple[int, ...]
    kv_len: int
    phase: Phase | None
    num_preemptions: int
    message: str


# ---- step input and output ----------------------------------------------------------------------


class PreemptionMode(enum.StrEnum):
    """What happened to a preempted request's KV."""

    SWAP = "swap"  # pages copied to host; resumes by copying them back
    RECOMPUTE = "recompute"  # pages dropped; resumes by re-prefilling prompt + generated tokens


@dataclasses.dataclass(frozen=True)
class StepInput:
    """What the engine asks of one step.

    decode_lengths: for running decode requests, the KV length each will hold after the step
        (kv_len + K for K decode steps); a running decode request not named decodes one token.
    prefill_token_budget: most prefill tokens to schedule over all requests (None: no limit).
    held_models: models whose waiting requests are not admitted this step (they keep their place
        and precedence; running requests of these models go on). The engine holds a model whose
        step programs are still compiling, so its first requests do not stall the others'.
    held_prefills: requests whose prefill makes no progress this step: running ones in prefill get
        no chunk (they keep their pages), waiting ones are not admitted (later requests of their
        model may be). The engine holds a request whose next prefill needs a program still
        compiling in the background (a prompt past the compiled shapes).
    """

    decode_lengths: Mapping[RequestId, int] = dataclasses.field(default_factory=dict)
    prefill_token_budget: int | None = None
    held_models: frozenset[ModelId] = frozenset()
    held_prefills: frozenset[RequestId] = frozenset()


@dataclasses.dataclass(frozen=True)
class ScheduledRequest:
    """One request's work this step: compute KV positions [token_start, token_end).

    The input tokens are prompt + generated, positions [token_start, token_end). samples_token: the
    step yields sampled tokens for it (token_end - token_start of them for decode, 1 for the final
    prefill chunk), to be passed to `KVPlanner.append_tokens`.
    """

    request_id: RequestId
    model: ModelId
    phase: Phase
    token_start: int
    token_end: int
    samples_token: bool

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


@dataclasses.dataclass(frozen=True)
class Preemption:
    """A running request that lost its device pages this step; it is waiting (or swapped) again."""

    request_id: RequestId
    model: ModelId
    mode: PreemptionMode
    kv_len: int  # KV positions it held
    pages_freed: tuple[PhysicalPage, ...]
    swap_out: SwapPlan | None  # the copies to host, for SWAP
    reason: str


@dataclasses.dataclass(frozen=True)
class Admission:
    """A waiting or swapped request that got device pages this step."""

    request_id: RequestId
    model: ModelId
    resumed: bool  # it had run before (preempted)
    swap_in: SwapPlan | None  # the copies from host, when it was swapped


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The planner's decision for one step.

    Engine order: perform every `preempted[i].swap_out`, then every `admitted[i].swap_in`, then run
    `run` (page tables from the virtualizer are already up to date). A step plan never holds both
    swap-outs and swap-ins: admission is skipped in a step that preempted.
    """

    run: tuple[ScheduledRequest, ...]
    preempted: tuple[Preemption, ...]
    admitted: tuple[Admission, ...]

    @property
    def swap_outs(self) -> tuple[SwapPlan, ...]:
        return tuple(p.swap_out for p in self.preempted if p.swap_out is not None)

    @property
    def swap_ins(self) -> tuple[SwapPlan, ...]:
        return tuple(a.swap_in for a in self.admitted if a.swap_in is not None)
