"""The records a device group's runner keeps (`GroupRunner`): a request (`_Req`), a range of a
step's work (`_Work`), a call in flight (`_Call`), a call as read (`CallRecord`, the call log) and
what one step read (`StepResult`). Plain host-side data."""

from __future__ import annotations

import dataclasses
from typing import Any

from crosspool_jax.execution.call_clock import CallEnd
from crosspool_jax.execution.pooled_step import LaneShape
from crosspool_jax.execution.prefill_cost import PrefillWork
from crosspool_jax.execution.sampling import SamplingParams


@dataclasses.dataclass
class _Req:
    request_id: str
    model: str
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: tuple[int, ...]
    generated: list[int] = dataclasses.field(default_factory=list)  # PENDING: still on the device
    done: bool = False
    finish_reason: str | None = None
    message: str = ""
    pending: int = 0  # PENDING entries in `generated` (tokens of calls not read yet)
    # where generated[-1] is while it is PENDING: (its call's output [steps, N * slots], flat index)
    feed: tuple[Any, int] | None = None


PENDING = -1  # a generated token still on the device (a placeholder until its call is read)


@dataclasses.dataclass
class _Call:
    """A dispatched program call whose sampled tokens the host has not read yet."""

    outs: tuple[Any, ...]  # per lane: [steps, N * slots] int32 (numpy for the host-scheduled step)
    lanes: tuple[LaneShape, ...]
    # per lane: (request id, KV device, slot, tokens it samples, first index in `generated`)
    places: list[list[tuple[str, int, int, int, int]]]
    decode: bool
    prefill_tokens: int  # prompt tokens the call computes (for the prefill-rate estimate)
    prefill_work: PrefillWork  # its FLOPs (`prefill_cost`; NO_WORK for a decode call)
    models: frozenset[str]
    dispatched: float  # `GroupRunner._now()` at dispatch
    # the call compiled its program or ran in a larger one (its time is not a prefill rate)
    compiled: bool
    # a simulated executor's (benchmarks/sim): the virtual time its device work ends; None: a real
    # call, whose end `end` stamps
    done_at: float | None = None
    end: CallEnd | None = None
    requests: int = 0  # requests with rows in the call
    kv_tokens: int = 0  # their KV tokens before the call (what its attention reads)
    step: int = 0  # the `launch` that dispatched it (the runner's count of launches)
    step_decoding: int = 0  # requests the planner had decoding at that launch


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """One program call as `_collect` read it (`GroupRunner.call_log`): `_now()` at dispatch and
    when the host's read of it returned, its device seconds (from the later of its dispatch and the
    previous call's end to its own end, `call_clock`), decode or prefill, the programs' shapes
    (`describe_spec` of its lanes), prompt tokens and FLOPs of a prefill (`PrefillWork`, padded
    rows included), and whether it compiled its program or ran in a larger one, how many requests
    it carried and their KV tokens before it, the launch (step) that dispatched it and how many
    requests were decoding then (a step with prefill calls and no decode call while requests
    decode shows)."""

    dispatched: float
    ready: float
    busy: float | None  # None: its end was not seen (its outputs failed)
    decode: bool
    lanes: str
    prefill_tokens: int
    dense_flops: float
    attention_flops: float
    compiled: bool
    requests: int = 0  # requests with rows in the call (decode: slots with a token)
    kv_tokens: int = 0  # their KV tokens before the call (tokens)
    models: int = 0  # models with requests in the call
    step: int = 0  # `GroupRunner.launches` when it was dispatched
    step_decoding: int = 0  # requests in decode at that launch
    padded_flops: float = 0.0  # dense FLOPs of the prefill program's rows beyond its tokens


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one `GroupRunner.step()` read: new tokens per request and the requests that ended (with
    overlap, the tokens of the previous step's calls; `calls` and `preempted` are this step's)."""

    tokens: dict[str, list[int]]
    finished: dict[str, tuple[str, str]]  # request id -> (finish reason, message)
    calls: int  # device program calls made
    preempted: tuple[str, ...]


@dataclasses.dataclass
class _Work:
    req: _Req
    start: int
    end: int
    decode: bool
    samples: bool
