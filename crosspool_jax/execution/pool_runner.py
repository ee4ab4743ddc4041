"""Host side of the pooled engine for one device group: models in an arena, requests in the planner,
and the one-program steps built from them (plain Python bookkeeping; the device work is in
`crosspool_jax.execution.pooled_step`).

A `GroupRunner` owns one `ArenaStore` (its devices: a KV+weights split, or one colocated device),
one `KVVirtualizer` over the KV devices' pages and one `KVPlanner`. `step()` is one engine step:

1. the planner grows running requests (preempting by recompute when the pool is full) and admits
   waiting ones, giving each a token range [start, end) to compute this step;
2. prefill ranges run as chunked-prefill programs and decode ranges as K-step decode programs
   (control lowering: the device samples and checks stops; the host sees tokens once per call);
   a range that crosses from one KV segment into the next (a request that just spilled onto
   another KV device) is cut at the boundary and the rest runs in a follow-up call;
3. sampled tokens go back to the planner; stops, max_new_tokens, cancels free pages at once.

Host work overlaps device work (``overlap=True``, the default): a step dispatches its calls and
then reads the tokens of the PREVIOUS step's calls, not its own, so the host plans step N+1,
builds its inputs, and streams step N's tokens while the device computes. Planning ahead needs
the tokens in flight only by count: they enter the planner as placeholders (`PENDING`) and are
revised when read; a decode call's input token that is still on the device is gathered there from
the call that sampled it (`_feed_tokens`). In decode the only thing not known ahead is whether a
request stops (a stop token; max_new_tokens is known): a request that stopped in call N also ran
in call N+1, whose tokens for it are dropped, and its pages are freed when the stop is read (call
N+1's KV writes to them are ordered before any later call's, since every call consumes the
arena the previous one produced). ``overlap=False`` reads each call's tokens right after it.

Shapes are bucketed (slots, tokens, pages to powers of two) so a handful of programs serve any mix.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.errors import InvalidRequestError
from crosspool_jax.execution.call_clock import CallClock, CallEnd
from crosspool_jax.execution.compile_cache import enable_compilation_cache
from crosspool_jax.execution.host_step import EXECUTIONS, StrategyTrial
from crosspool_jax.execution.pooled_step import LaneShape, StepSpec, empty_lane_inputs, model_geometry
from crosspool_jax.execution.prefill_cost import (
    NO_WORK,
    PrefillCostFit,
    PrefillWork,
    chunk_work,
    dense_flops_per_token,
)
from crosspool_jax.execution.sampling import SamplingParams, seed_words
from crosspool_jax.execution.step_programs import ShapeBuckets, StepPrograms, _pow2, describe_lane
from crosspool_jax.memory.arena import NO_GUARD, ArenaBook, ArenaStore, HostModel
from crosspool_jax.memory.kv_virtualizer import KVGeometry, KVPoolConfig, KVSegment, KVVirtualizer
from crosspool_jax.memory.planner import (
    KVPlanner,
    ModelLimits,
    Phase,
    PlannerConfig,
    PreemptionChoice,
    RequestSpec,
    RequestStatus,
)
from crosspool_jax.memory.topology import PoolTopology, Role
from crosspool_jax.models.config import AttentionKind, ModelConfig
from crosspool_jax.models.costs import ModelCosts, model_costs
from crosspool_jax.models.params import ModelWeights
from pallas_kernels import dispatch
from pallas_kernels.page_layout import PageGeometry, PoolLayout, _np_dtype

_log = logging.getLogger(__name__)


# Stop ids a request may carry by default (`GroupRunner(max_stop_ids=)`, `EngineConfig.max_stop_ids`).
# Every lane of a runner has ONE stop-id width S = this rounded up to a power of two (ids -1
# padded), so a request's number of stop ids never selects or compiles a program (the check is a
# [B, S] compare per token); a request with more is refused at submit (InvalidRequestError).
DEFAULT_MAX_STOP_IDS = 16
# While requests decode, a step's prefill gets this share of a measured decode call's seconds
# (`GroupRunner.prefill_budget`), at least one chunk: a step that mixes prefill with decode then
# costs ~2x a pure decode step. Measured on one H200 (docs/benchmarks.md, 2026-12-04): 0.75 with
# a floor of the smallest bucket made prefill calls of ~170 tokens, each paying a whole read of
# the experts, and doubled TTFT without lowering TBT P99.
DEFAULT_PREFILL_SHARE = 1.0


def stop_width(max_stop_ids: int) -> int:
    """The stop-id width S of every lane of a runner that takes up to `max_stop_ids` stop ids per
    request: the power of two >= it (ids, not bytes)."""
    return _pow2(max_stop_ids)



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


class GroupRunner(StepPrograms):
    """One device group of the pooled engine (see module docstring).

    topology: the group's devices (KV + weights split), or `colocated` for a single device that is
    both (the `shared` / `static` baselines). layout: the arena pages (num_pages per device).
    attn_pages: pages per KV device for attention-side weights (colocated: for all weights).
    steps_per_call: K decode tokens per host call. prefill_chunk: the least prompt tokens a step
    prefills while requests decode (the budget's floor; chunked prefill interleaved with decode).
    max_prefill_tokens: most prompt tokens of all requests per step; while requests decode, the
    step's budget is the prompt tokens whose predicted seconds fit `prefill_share` x the measured
    decode call (`prefill_budget`). A request's tokens of a step run in one program call (cut only
    at a KV segment's end): a MoE prefill call has a large fixed part (it reads every expert), which
    cutting a step's span into chunks paid once per chunk (measured: docs/planner.md).
    mixed_steps: in a step that prefills a lane's prompts, that lane's decoding requests take one
    token each as rows of the same prefill call (one read of the experts, instead of a decode
    call of K tokens and a prefill call), their budget share taken from the prompt tokens; lanes
    with nothing to prefill decode K tokens per call as before (`_mixed_lanes`).
    backend: the kernels' backend. attention_kernels: which attention kernels the step programs
    run (`pallas_kernels.dispatch`: "triton", the default, "auto" or "mosaic"). call_log: the
    last this many calls read are kept in `call_log` (`CallRecord`; 0: none), for benchmarks.
    kv_pages_per_device: KV pages the virtualizer hands out per KV device (default: all the arena's
    KV pages; fewer leaves the rest unused, e.g. to give two modes the same KV budget).
    micro_batches: decode lanes per model (2: ping-pong, each model's slots split in two lanes whose
    layers interleave so attention and experts overlap across the pools; requests split across KV
    devices stay in one lane).
    host_swap_pages: host-memory page slots for swapped-out KV (0: preemption always recomputes;
    otherwise the planner's `preemption` policy picks swap or recompute per request).
    max_programs: compiled step programs kept (least recently used evicted). Programs are per
    model CLASS and shape bucket (`pooled_step.LaneShape`), not per model. buckets: how sizes
    round to program shapes (default: `ShapeBuckets.coarse()` on GPU, `.fine()` elsewhere).
    A step runs one program per lane group: a model class's lane (MLA: one model's), or its two
    ping-pong lanes, never a mix of classes, so the programs a runner can need depend only on each
    class and the shape buckets, not on which other models have work in a step.
    execution: how a step program runs on a crosspool topology: "lowered" (one XLA program over
    both pools, `pooled_step.build_step`), "host" (host-scheduled per-layer calls on each pool's
    mesh with device-to-device transfers, `host_step.HostScheduledStep`), or "auto" (each program
    structure runs both for its first calls, timed, then keeps the faster: `MeasuredChoice`).
    Colocated stores always run "lowered" (there is one device: nothing to schedule between).
    overlap: a step reads the previous step's tokens instead of its own, so host work (planning,
    inputs, streaming) overlaps the device's (module docstring); False: each call is read at once.

    Stall-free compiles (docs/engine.md, "Compiles off the serving path"): programs compile in a
    background thread and a call never waits for one it can do without. warm_programs: when a
    model's lane (its class, or a new group count G) is new to the runner, up to this many of its
    programs are queued for the background thread at load (`warm_specs`; None: 4 on CPU, 8 on
    GPU; 0: none); warm_slots / warm_context bound them (slots per KV device, tokens per request;
    None: 8 / 512 on CPU, 32 / 8192 on GPU). fallback: a call whose exact program is not compiled
    runs in the smallest compiled program that dominates its shape (`spec_dominates`: inputs padded
    to it) while the exact one compiles in the background; only when none does, the call compiles
    on the serving path (counted in `blocked_compile_seconds`). False: every new shape compiles on
    the serving path. JAX's persistent compilation cache is turned on (`compile_cache`).
    compiler_options: XLA options every step program compiles with (`Lowered.compile`; e.g.
    {"xla_gpu_autotune_level": 0}); part of the persistent cache's key. Default: XLA's.
    compile_process: lower and compile step programs in a worker process and load the serialized
    executables here (`compile_process.ProcessCompiler`), so tracing and lowering never hold this
    process's GIL; a worker failure falls back to compiling here (counted in
    `process_compile_failures`). Lowered execution only (the host-scheduled strategy's per-layer
    programs compile on their first call).
    compile_workers: background compiles that run at once (default 1). With compile_process each
    has its own worker process (a host with cores to spare compiles a cold model's programs that
    many times faster); without it XLA's compiles overlap, but tracing and lowering share this
    process's GIL with the stepping thread.
    max_stop_ids: most stop ids of one request (`submit` refuses more, InvalidRequestError); every
    lane's stop-id width is `stop_width(max_stop_ids)` (a power of two), one width for all programs.

    Threads: one thread steps the runner (`launch` / `result` / `submit`); `cancel` and `fail` may
    come from any thread and free the request's pages at once. The planner, the virtualizer and the
    requests are guarded by one lock, which the stepping thread holds except while it compiles (or
    waits for a compile) and while it waits for the device (`_unlocked`): a cancel during a compile
    or a running call frees the pages then. What a call in flight holds of an ended request (its
    inputs, page numbers, tokens) is harmless: pages freed are handed out again only by a later
    `launch` on the stepping thread, whose calls consume the arena this call produces, and an ended
    request's tokens are dropped when read.
    """

    def __init__(
        self,
        topology: PoolTopology | None,
        layout: PoolLayout,
        attn_pages: int,
        *,
        colocated: jax.Device | None = None,
        steps_per_call: int = 4,
        prefill_chunk: int = 64,
        max_prefill_tokens: int = 512,
        backend: str | None = None,
        platform: str | None = None,
        planner_config: PlannerConfig | None = None,
        kv_pages_per_device: int | None = None,
        micro_batches: int = 1,
        host_swap_pages: int = 0,
        max_programs: int = 64,
        buckets: ShapeBuckets | None = None,
        execution: str = "lowered",
        overlap: bool = True,
        warm_programs: int | None = None,
        warm_slots: int | None = None,
        warm_context: int | None = None,
        fallback: bool = True,
        max_stop_ids: int = DEFAULT_MAX_STOP_IDS,
        prefill_share: float = DEFAULT_PREFILL_SHARE,
        mixed_steps: bool = False,
        call_log: int = 0,
        compiler_options: dict[str, Any] | None = None,
        compile_process: bool = False,
        compile_workers: int = 1,
        attention_kernels: str = dispatch.DEFAULT_ATTENTION_KERNELS,
        store: ArenaBook | None = None,
    ):
        if not prefill_share > 0:
            raise ValueError(f"prefill_share must be > 0, got {prefill_share}")
        if compile_workers < 1:
            raise ValueError(f"compile_workers must be >= 1, got {compile_workers}")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        if store is None:
            enable_compilation_cache()  # before anything compiles; keeps a directory set elsewhere
            store = ArenaStore(topology, layout, attn_pages, colocated=colocated)
        self.store = store
        self.execution = "lowered" if self.store.colocated else execution
        self._trials: dict[tuple[Any, ...], StrategyTrial] = {}  # auto: verdict per lane structure
        self.platform = platform or ("gpu" if jax.default_backend() in ("gpu", "cuda") else "cpu")
        self.backend = backend
        self.attention_kernels = dispatch.check_kernels(attention_kernels)
        self.steps_per_call = steps_per_call
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.micro_batches = micro_batches
        if max_stop_ids < 1:
            raise ValueError(f"max_stop_ids must be >= 1, got {max_stop_ids}")
        self.max_stop_ids = max_stop_ids
        self.stop_width = stop_width(max_stop_ids)  # every lane's S (one program dimension value)
        # the planner, the virtualizer and `reqs` (see "Threads" above); plain, not re-entrant:
        # `_unlocked` must release it entirely
        self._state_lock = threading.Lock()
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max_prefill_tokens
        pages = self.store.kv_pages if kv_pages_per_device is None else kv_pages_per_device
        if not 1 <= pages <= self.store.kv_pages:
            raise ValueError(f"kv_pages_per_device={pages} must be in [1, {self.store.kv_pages}]")
        self.kv = KVVirtualizer(KVPoolConfig(self.store.num_kv, pages, layout.page_bytes, host_swap_pages))
        self._planner_config = planner_config or PlannerConfig(preemption=PreemptionChoice.ALWAYS_RECOMPUTE)
        self.planner = KVPlanner(self.kv, self._planner_config)
        self.geoms: dict[str, PageGeometry] = {}
        self.reqs: dict[str, _Req] = {}
        self._init_programs(max_programs, buckets, warm_programs, warm_slots, warm_context, fallback,
                            compiler_options, compile_process, compile_workers)
        self._init_counters()
        # measured prefill calls -> seconds of a prefill from its FLOPs (`prefill_budget`)
        self.prefill_fit = PrefillCostFit()
        self.prefill_share = prefill_share
        self.mixed_steps = mixed_steps
        self.mixed_rows = 0  # decode tokens computed as rows of a prefill call (`mixed_steps`)
        self._costs: dict[str, ModelCosts] = {}  # per model, from its shapes (`_model_costs`)
        self._init_reading(call_log, overlap, layout)

    def _init_counters(self) -> None:
        """The counters the benchmarks and stats read (compiles, stalls, holds, calls, swaps) and
        the measured link and prefill rates."""
        self.process_compiles = 0  # programs built by the worker process (`compile_process`)
        self.process_compile_failures = 0  # worker failures that fell back to compiling here
        # programs compiled on the serving path (a call waited) or by `precompile`; the background
        # thread's are counted apart (`background_built`) when a step picks them up
        self.programs_built = 0
        self.background_built = 0
        self.blocked_compiles = 0  # calls that compiled (or waited for) their program
        self.blocked_compile_seconds = 0.0  # seconds `_run` spent on those compiles / waits
        # the last blocked waits: (seconds, what it waited for, the wanted shape; `describe_spec`)
        self.blocked_log: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=32)
        self.fallback_calls = 0  # program calls run in a larger program than their shape's
        # programs compiled with the Triton attention after a Mosaic build failed (`_compile_aot`)
        # and the (lane class, decode) kinds that go straight to Triton since
        self.kernel_fallbacks = 0
        self._mosaic_failed: set[tuple[Any, bool]] = set()
        self.held_steps = 0  # steps that held some model's admissions for its warm programs
        self.held_prefill_steps = 0  # steps that held some request's prefill for its programs
        self.preemptions = 0
        self.calls = 0
        self.launches = 0  # `launch` calls (steps planned); the call log's `step`
        self._step_decoding = 0  # requests decoding at the last launch (the call log)
        self._dispatches = 0  # calls `_run` dispatched (launch counts its step's)
        self.swapped_pages = 0
        self.link_rate: float | None = None  # measured host<->device bytes/s (swaps)
        self.prefill_rate: dict[str, float] = {}  # measured prefill tokens/s per model

    def _init_reading(self, call_log: int, overlap: bool, layout: PoolLayout) -> None:
        """The calls in flight and their reading: the call log, overlap, the call clock, host-side
        accounting and the host swap space."""
        # the last calls read (`CallRecord`): what the benchmarks report of a run's calls
        self.call_log: collections.deque[CallRecord] = collections.deque(maxlen=call_log)
        # (start, end, decode) of the background compiles, `_now()` seconds (the last 1,024)
        self.compile_spans: collections.deque[tuple[float, float, bool]] = collections.deque(maxlen=1024)
        self.decode_call_seconds: float | None = None  # measured device time of a decode call (EMA)
        self.overlap = overlap
        self._inflight: collections.deque[_Call] = collections.deque()
        self._read_tokens: dict[str, list[int]] = {}  # read since the last StepResult
        self._read_finished: dict[str, tuple[str, str]] = {}
        self._launched: tuple[int, tuple[str, ...]] | None = None  # (calls, preempted) of launch()
        self._last_end = 0.0  # when the last read call's device work ended
        self._call_clock = CallClock()  # stamps each real call's end (`call_clock`)
        weakref.finalize(self, self._call_clock.close)
        # host-side accounting: seconds in launch() (planning, inputs, dispatch), seconds blocked
        # reading calls' tokens, tokens sampled for requests that had ended when read (a stop read
        # one call late with overlap, a cancel)
        self.launch_seconds = 0.0
        self.wait_seconds = 0.0
        self.dropped_tokens = 0
        hp = self.kv.config.host_swap_pages
        self._host_swap = (np.zeros((hp, layout.rows_per_page, layout.row_elems), _np_dtype(layout.dtype))
                           if hp else None)

    # -- models --
    def add_model(self, name: str, cfg: ModelConfig, weights: ModelWeights,
                  guard: contextlib.AbstractContextManager = NO_GUARD) -> None:
        """Places a model's weights (`ArenaStore.write_model`) and registers it with the store, the
        KV planner and the background compiler at one moment. `guard`: the lock the stepping
        thread holds around its steps; held only around the arena updates and the registration,
        so the weights' encoding, host-to-device copy and writer compiles do not pause the steps."""
        geom = model_geometry(cfg, self.store.layout, self.platform)
        ma = self.store.write_model(name, cfg, weights, guard)
        self._register_model(name, cfg, geom, ma, guard)

    def add_random_model(self, name: str, cfg: ModelConfig, seed: int = 0,
                         guard: contextlib.AbstractContextManager = NO_GUARD) -> None:
        """A model with random weights generated on the devices (benchmarks at real sizes)."""
        geom = model_geometry(cfg, self.store.layout, self.platform)
        ma = self.store.write_model_random(name, cfg, seed, guard=guard)
        self._register_model(name, cfg, geom, ma, guard)

    def _register_model(self, name: str, cfg: ModelConfig, geom: Any, ma: Any,
                        guard: contextlib.AbstractContextManager, warm: bool = True) -> None:
        """Registers a placed model with the store, the KV planner and (`warm`: queues its lane's
        warm programs) the background compiler, under `guard`."""
        with guard, self._state_lock:
            self.store.models[name] = ma
            self.kv.register_model(name, KVGeometry(cfg.num_layers, geom.bytes_per_token_used,
                                                    tokens_per_page_override=geom.tokens_per_page))
            self.geoms[name] = geom
        if warm:
            with guard:
                self.warm_up(name)

    def sleep_model(self, name: str, guard: contextlib.AbstractContextManager = NO_GUARD) -> HostModel:
        """Copies a model with no live request to host memory (`ArenaStore.copy_out`) and frees its
        arena rows and its KV registration (its pages are free already: no request holds any). Its
        class's programs stay compiled. `guard` (the stepping thread's lock) is held around the
        reads' dispatch and the release, not during the copy. RuntimeError while it has live
        requests (nothing changed)."""
        with guard, self._state_lock:
            self._check_no_live(name)
        host = self.store.copy_out(name, guard)
        with guard, self._state_lock:
            self.store.remove_model(name)
            self.kv.unregister_model(name)
            del self.geoms[name]
        return host

    def wake_model(self, name: str, cfg: ModelConfig, host: HostModel,
                   guard: contextlib.AbstractContextManager = NO_GUARD) -> None:
        """Places a model slept by `sleep_model` back (`ArenaStore.copy_in`: `guard` held around the
        allocation and each chunk's write, not the copies) and registers it; compiles nothing (its
        class's programs and the chunk writers are compiled already). CapacityError (nothing
        changed) when its rows do not fit."""
        geom = model_geometry(cfg, self.store.layout, self.platform)
        ma = self.store.copy_in(name, host, guard)
        self._register_model(name, cfg, geom, ma, guard, warm=False)

    def remove_model(self, name: str) -> None:
        with self._state_lock:
            self._check_no_live(name)
            self.store.remove_model(name)
            self.kv.unregister_model(name)
            del self.geoms[name]

    def _check_no_live(self, name: str) -> None:
        """RuntimeError if `name` has live requests (before its weights leave the arena)."""
        live = [r for r in self.reqs.values() if r.model == name and not r.done]
        if live:
            raise RuntimeError(f"model {name!r} has {len(live)} live requests; end them first")

    def set_limits(self, limits: dict[str, ModelLimits]) -> None:
        """Per-model page floors/caps (the `static` mode's fixed reservations). May change while
        requests run (a model added or removed next to live requests): nothing is preempted, a
        request live at the change keeps the larger of its old and new cap, later ones are held to
        the new cap (`KVPlanner.set_model_limits`). The planner keeps its requests and measured costs."""
        with self._state_lock:
            self.planner.set_model_limits(limits)
        self._planner_config = dataclasses.replace(self._planner_config, model_limits=dict(limits))

    # -- requests --
    def submit(self, request_id: str, model: str, prompt: Sequence[int], max_new_tokens: int,
               sampling: SamplingParams, stop_ids: Sequence[int] = ()) -> None:
        """Queue a request (raises planner.RequestRejected if it could never fit, InvalidRequestError
        if it has more than `max_stop_ids` stop ids)."""
        if model not in self.geoms:
            raise KeyError(f"model {model!r} is not in this group")
        stops = tuple(int(s) for s in stop_ids)
        if len(stops) > self.max_stop_ids:
            raise InvalidRequestError(
                f"{len(stops)} stop token ids; the step programs take at most {self.max_stop_ids} "
                "(max_stop_ids)")
        tokens = tuple(int(t) for t in prompt)
        with self._state_lock:
            self.planner.submit(RequestSpec(request_id, model, tokens, max_new_tokens))
            self.reqs[request_id] = _Req(request_id, model, tokens, max_new_tokens, sampling, stops)

    def cancel(self, request_id: str) -> bool:
        """Ends a live request; its pages are free when this returns (tokens of it still on the
        device are dropped when their call is read). Any thread; it waits for the stepping thread's
        host work at most, never for a compile or the device (class docstring, "Threads")."""
        with self._state_lock:
            r = self.reqs.get(request_id)
            if r is None or r.done:
                return False
            if not self.planner.info(request_id).status.is_terminal:  # else: ended on placeholders
                self.planner.cancel(request_id)
            self._end(r, "cancelled", "cancelled")
            return True

    def fail(self, request_id: str, message: str) -> None:
        """Ends a live request with an error; its pages are free when this returns (any thread)."""
        with self._state_lock:
            self._fail_locked(request_id, message)

    def fail_model(self, model: str, message: str) -> list[str]:
        """Ends every live request of `model` with an error (an unload), freeing their pages at once
        (any thread); returns their ids."""
        with self._state_lock:
            ids = [rid for rid, r in self.reqs.items() if r.model == model and not r.done]
            for rid in ids:
                self._fail_locked(rid, message)
            return ids

    def _fail_locked(self, request_id: str, message: str) -> None:
        r = self.reqs.get(request_id)
        if r is not None and not r.done:
            if not self.planner.info(request_id).status.is_terminal:
                self.planner.fail(request_id, message)
            self._end(r, "error", message)

    def running_count(self) -> int:
        """Requests the planner runs now (admitted, not ended)."""
        with self._state_lock:
            return len(self.planner.running())

    @contextlib.contextmanager
    def _unlocked(self) -> Any:
        """(the stepping thread, holding `_state_lock`) Lets other threads' cancels and fails in for
        a long wait: a compile or the device. Whoever holds the lock after it must recheck
        `_Req.done` for the requests it works on."""
        self._state_lock.release()
        try:
            yield
        finally:
            self._state_lock.acquire()

    def _end(self, r: _Req, reason: str, message: str) -> None:
        r.done, r.finish_reason, r.message = True, reason, message
        self.planner.forget(r.request_id)
        del self.reqs[r.request_id]

    @property
    def has_work(self) -> bool:
        """Live requests: to plan, or with tokens still in flight (a step that ends the last live
        request lets go of the calls still in flight: they hold only ended requests' tokens)."""
        with self._state_lock:
            return self.planner.has_live_requests or bool(self.reqs)

    # -- the step --
    def step(self) -> StepResult:
        """One engine step (see module docstring): `launch()`, then `result()`."""
        self.launch()
        return self.result()

    def launch(self) -> None:
        """Plans one step and dispatches its program calls without waiting for them. With
        `overlap`, the planner sees the previous step's tokens as placeholders (module docstring)."""
        with self._state_lock:
            self._launch_locked()

    def _launch_locked(self) -> None:
        if self._launched is not None:
            raise RuntimeError("launch() twice without result()")
        t_launch, waited = self._now(), self.wait_seconds
        k = self.steps_per_call
        held, held_prefills = self.held_models(), self.held_prefills()
        mixed = self._mixed_lanes(held, held_prefills) if self.mixed_steps else set()
        decode_lengths = {}
        folded = 0  # decode requests that take their token in a prefill call
        for rid in self.planner.running():
            info = self.planner.info(rid)
            if info.phase == Phase.DECODE:
                r = self.reqs[rid]
                cap = len(r.prompt) + r.max_new_tokens - 1
                one = self._lane_key(r.model) in mixed
                folded += one
                decode_lengths[rid] = min(info.kv_len + (1 if one else k), cap)
        from crosspool_jax.memory.planner import StepInput

        self.held_steps += bool(held)
        self.held_prefill_steps += bool(held_prefills)
        self.launches += 1
        self._step_decoding = len(decode_lengths)
        budget = self.prefill_budget(bool(decode_lengths))
        plan = self.planner.step(StepInput(decode_lengths, prefill_token_budget=max(1, budget - folded),
                                           held_models=held, held_prefills=held_prefills))
        # swap-outs before anything writes KV, swap-ins before anything reads it (planner contract)
        for sp in plan.swap_outs:
            self._swap(sp, to_host=True)
        for sp in plan.swap_ins:
            self._swap(sp, to_host=False)
        preempted = []
        for p in plan.preempted:
            self.preemptions += 1
            preempted.append(str(p.request_id))
        work = [_Work(self.reqs[str(s.request_id)], s.token_start, s.token_end,
                      s.phase == Phase.DECODE, s.samples_token) for s in plan.run]
        dispatches = self._dispatches
        while work:
            if any(w.req.pending for w in work if not w.decode):
                # a prefill (a recomputed request's) reads tokens still on the device: read them
                self._collect(keep=0)
                work = [w for w in work if not w.req.done]
            pre = [w for w in work if not w.decode]
            dec = [w for w in work if w.decode]
            if mixed and pre:  # a mixed lane's decode tokens: rows of its prefill call
                lanes = {self._lane_key(w.req.model) for w in pre}
                fold = [w for w in dec if w.end - w.start == 1 and self._lane_key(w.req.model) in lanes]
                if fold:
                    folded_ids = {id(w) for w in fold}
                    dec = [w for w in dec if id(w) not in folded_ids]
                    pre += [_Work(w.req, w.start, w.end, False, True) for w in fold]
                    self.mixed_rows += len(fold)
            rest: list[_Work] = []
            if pre:
                rest += self._run(pre, False)
            if dec:  # (a cancel during the prefill's compile may have ended some)
                rest += self._run([w for w in dec if not w.req.done], True)
            if not self.overlap:
                self._collect(keep=0)
            # a decode range cut at a segment end continues in a follow-up call unless it ended
            work = [w for w in rest if not w.req.done]
        calls = self._dispatches - dispatches
        self.calls += calls
        self._launched = (calls, tuple(preempted))
        # reads inside launch (overlap off, or a prefill that needs tokens in flight) are waits
        self.launch_seconds += self._now() - t_launch - (self.wait_seconds - waited)

    def _mixed_lanes(self, held: frozenset[str], held_prefills: frozenset[str]) -> set[Any]:
        """(`mixed_steps`) Lanes that have prompt tokens to prefill this step: a running or waiting
        request with prompt left that is not held (`held_models`, `held_prefills`)."""
        out = set()
        for rid in (*self.planner.running(), *self.planner.waiting()):
            r = self.reqs.get(rid)
            if r is None or r.model in held or rid in held_prefills or self.planner.prefill_span(rid) is None:
                continue
            out.add(self._lane_key(r.model))
        return out

    def prefill_budget(self, decoding: bool) -> int:
        """Most prompt tokens this step may prefill. With requests decoding: the tokens whose
        predicted seconds (`prefill_fit`, fitted on this group's measured prefill calls, or its
        prior while the fit cannot tell per-call from per-FLOP costs: `prefill_cost`; priced at
        the longest context a running prefill continues from) fit `prefill_share` x the measured
        decode call (EMA), so a step that mixes prefill with decode costs about 1 + prefill_share
        decode steps. At least one chunk (`prefill_chunk`: prefill always progresses, in calls
        large enough to be worth their fixed cost), at most `max_prefill_tokens`. With nothing
        decoding, or before a decode call and a prefill call are measured: `max_prefill_tokens`."""
        most = self.max_prefill_tokens
        if not decoding or self.decode_call_seconds is None:
            return most
        seconds = self.prefill_share * self.decode_call_seconds
        floor = min(self.prefill_chunk, most)
        context, model = 0, None
        for rid in self.planner.running():
            info = self.planner.info(rid)
            if info.phase == Phase.PREFILL and (model is None or info.kv_len > context):
                context, model = info.kv_len, self.reqs[rid].model
        if model is None:  # a step that admits: its prompts start at 0 (priced as the first waiting)
            model = next((self.reqs[rid].model for rid in self.planner.waiting() if rid in self.reqs), None)
        n = None
        if model is not None:
            # priced as one call (a request's tokens of a step run in one, `_run`) in the program
            # of its token bucket: T rows on each KV device
            bk = self.buckets
            n = self.prefill_fit.tokens_within(seconds, self._model_costs(model), context, most,
                                               lambda t: bk.round(t, bk.tokens_floor),
                                               self.store.num_kv)
        if n is None:  # no prefill call measured yet
            return most
        return int(min(most, max(floor, n)))

    def _model_costs(self, model: str) -> ModelCosts:
        """`model`'s per-token costs from its shapes (`models.costs`), kept per model."""
        c = self._costs.get(model)
        if c is None:
            cfg = self.store.models[model].config
            c = model_costs(cfg, self.store.layout.dtype, self.geoms[model].bytes_per_token_used)
            self._costs[model] = c
        return c

    def result(self) -> StepResult:
        """Reads the calls before the last `launch()`'s (all calls without `overlap`): their tokens,
        and the requests that ended. Blocks until those calls' device work is done."""
        with self._state_lock:
            return self._result_locked()

    def _result_locked(self) -> StepResult:
        if self._launched is None:
            raise RuntimeError("result() without launch()")
        calls, preempted = self._launched
        self._launched = None
        self._collect(keep=calls if self.overlap else 0)
        if not self.reqs:  # the calls still in flight hold only ended requests' tokens: let go
            self.dropped_tokens += sum(p[3] for call in self._inflight for lane in call.places for p in lane)
            self._inflight.clear()
        tokens, finished = self._read_tokens, self._read_finished
        self._read_tokens, self._read_finished = {}, {}
        return StepResult(tokens, finished, calls, preempted)

    def _now(self) -> float:
        """The runner's clock in seconds (`time.perf_counter`; a simulated runner's virtual clock)."""
        return time.perf_counter()

    def _read(self, call: _Call) -> list[np.ndarray]:
        """A call's sampled tokens per lane ([steps, N * slots] int32), waiting for its device work."""
        return [np.asarray(o) for o in call.outs]

    @functools.cached_property
    def _feed(self) -> Callable:
        """`_feed_tokens` jitted with the step inputs' sharding (built on first use)."""
        return jax.jit(_feed_tokens, out_shardings=self.store.sharding, donate_argnums=(0,))

    def _collect(self, keep: int) -> None:
        """Reads the oldest calls in flight until `keep` are left: revises placeholders to the
        sampled tokens, ends requests at a stop token or (all tokens read) at max_new_tokens."""
        n = self.store.num_devices
        while len(self._inflight) > keep:
            call = self._inflight.popleft()
            t_wait = self._now()
            with self._unlocked():  # cancels from other threads free pages meanwhile
                got_lanes = self._read(call)  # waits for the call's device work
            ready = self._now()
            self.wait_seconds += ready - t_wait
            # the device started this call when it was dispatched or when the previous call ended,
            # whichever was later, and ended when the call clock saw its outputs ready
            end = call.done_at if call.done_at is not None else (
                call.end.get(timeout=5.0) if call.end is not None else ready)
            busy = None if end is None else end - max(call.dispatched, self._last_end)
            self._last_end = ready if end is None else end
            # a call that ran in a larger program than its shape's (or compiled its own) measures
            # that program, not its work
            if busy is not None and not call.compiled:
                if call.decode:
                    old = self.decode_call_seconds
                    self.decode_call_seconds = busy if old is None else 0.8 * old + 0.2 * busy
                else:
                    self._note_prefill(call.prefill_tokens, call.models, busy)
                    self.prefill_fit.observe(call.prefill_work, busy)
            if self.call_log.maxlen:
                self.call_log.append(CallRecord(
                    call.dispatched, ready, busy, call.decode,
                    " + ".join(describe_lane(ln) for ln in call.lanes), call.prefill_tokens,
                    call.prefill_work.dense_flops, call.prefill_work.attention_flops, call.compiled,
                    call.requests, call.kv_tokens, len(call.models), call.step, call.step_decoding,
                    call.prefill_work.padded_flops))
            for lane, place, got in zip(call.lanes, call.places, got_lanes, strict=True):
                got = got.reshape(got.shape[0], n, lane.slots)
                for rid, d, bi, count, g0 in place:
                    r = self.reqs.get(rid)
                    if r is None or r.done:  # ended since (cancel, stop read earlier, unload)
                        self.dropped_tokens += count
                        continue
                    seq = [int(v) for v in got[:, d, bi] if v >= 0][:count]
                    self._deliver(r, g0, count, seq)

    def _deliver(self, r: _Req, g0: int, count: int, seq: list[int]) -> None:
        """The `seq` sampled for placeholders generated[g0 : g0 + count] of `r`."""
        rid = r.request_id
        stop_at = next((i for i, t in enumerate(seq) if t in r.stop_ids), None)
        if stop_at is not None:
            seq = seq[: stop_at + 1]
        elif len(seq) != count:
            raise RuntimeError(f"request {rid}: the device sampled {len(seq)} of {count} tokens "
                               "without a stop token")
        r.generated[g0:g0 + len(seq)] = seq
        r.pending -= count
        self.planner.revise_tokens(rid, g0, seq)
        self._read_tokens.setdefault(rid, []).extend(seq)
        info = self.planner.info(rid)
        if stop_at is not None:
            del r.generated[g0 + len(seq):]  # placeholders of later calls: dropped
            if not info.status.is_terminal:
                info = self.planner.finish(rid, "stop token")
            self._read_finished[rid] = ("stop", info.message)
            self._end(r, "stop", info.message)
        elif r.pending == 0 and info.status == RequestStatus.FINISHED:
            self._read_finished[rid] = ("length", info.message)
            self._end(r, "length", info.message)

    def _note_prefill(self, total: int, models: frozenset[str], seconds: float) -> None:
        """Measured prefill throughput per model (EMA over calls) -> the planner's recompute cost."""
        for m in models:
            rate = total / max(seconds, 1e-9)  # tokens of all models per second of this call
            old = self.prefill_rate.get(m)
            self.prefill_rate[m] = rate if old is None else 0.8 * old + 0.2 * rate
        self.planner.update_costs(prefill_tokens_per_s=dict(self.prefill_rate))

    # -- swap --
    def _swap(self, plan: Any, to_host: bool) -> None:
        """Copies a request's pages between the arena and the host swap slots (`plan.copies`)."""
        if not plan.copies:
            return
        st = self.store
        idx = np.array([c.device * st.layout.num_pages + st.kv_first_page + c.device_page
                        for c in plan.copies], np.int32)
        slots = np.array([c.host_slot for c in plan.copies], np.int64)
        if self._host_swap is None:
            raise RuntimeError("a swap was planned but the runner has no host swap space")
        t0 = time.perf_counter()
        if to_host:
            self._host_swap[slots] = np.asarray(_gather_pages(st.arena, jnp.asarray(idx)))
        else:
            st.arena = _scatter_pages(st.arena, jnp.asarray(idx), jnp.asarray(self._host_swap[slots]))
            st.arena.block_until_ready()
        self.swapped_pages += len(plan.copies)
        # measured host link rate (EMA) feeds the planner's swap-or-recompute choice
        rate = len(plan.copies) * st.layout.page_bytes / max(time.perf_counter() - t0, 1e-9)
        self.link_rate = rate if self.link_rate is None else 0.8 * self.link_rate + 0.2 * rate
        self.planner.update_costs(host_link_bytes_per_s=self.link_rate)

    # -- building one program call --
    def _segment_at(self, rid: str, pos: int) -> tuple[int, KVSegment, list[KVSegment]]:
        segs = self.kv.segments(rid)
        tpp = self.kv.layout(self.reqs[rid].model).tokens_per_page
        for i, s in enumerate(segs):
            cap_end = s.token_start + s.pages_per_layer * tpp
            if s.token_start <= pos < cap_end:
                return i, s, list(segs[:i])
        raise RuntimeError(f"request {rid}: no KV segment holds position {pos}: {segs}")

    def _run(self, items: list[_Work], decode: bool) -> list[_Work]:
        """Dispatches one program over `items` (its tokens enter `generated` as placeholders, read
        by `_collect`); returns the work left (ranges cut at segment ends). Dispatches nothing when
        every item's request has ended. Its compile (if any) lets other threads' cancels in
        (`_unlocked`): a request ended meanwhile still fills its rows (the page numbers read before,
        freed now, taken again only by a later launch), and its tokens are dropped."""
        items = [w for w in items if not w.req.done]
        if not items:
            return []
        by_model, rest = self._cut(items, decode)
        groups, lane_group = self._lanes(by_model, decode)
        # each lane's shape: the smallest bucket holding its rows
        wanted, sorted_rows, tail_lens, k_steps = [], [], [], 1
        for cls, names, rows in groups:
            shape, placed_rows, tails, k = self._lane_shape(cls, names, rows, decode)
            wanted.append(shape)
            sorted_rows.append(placed_rows)
            tail_lens.append(tails)
            k_steps = max(k_steps, k)
        steps = (self.steps_per_call if self.buckets.fixed_steps else _pow2(k_steps)) if decode else 1
        blocked_before, fallbacks_before = self.blocked_compiles, self.fallback_calls
        programs, lanes = self._lane_programs(wanted, lane_group, tail_lens, decode, steps)
        outs, placements, dispatched, done_at = self._execute(programs, groups, lanes, sorted_rows, decode)
        places = self._placeholders(lanes, placements, outs, decode)
        prefill_tokens = 0 if decode else sum(q for place in placements for _, _, _, q, _ in place)
        self._dispatches += 1
        self._inflight.append(_Call(tuple(outs), tuple(lanes), places, decode, prefill_tokens,
                                    NO_WORK if decode else self._call_work(groups, lanes),
                                    frozenset(w.req.model for w in items), dispatched,
                                    (self.blocked_compiles, self.fallback_calls)
                                    != (blocked_before, fallbacks_before), done_at,
                                    None if done_at is not None else self._call_clock.watch(outs),
                                    sum(len(rows) for _, _, rows in groups),
                                    sum(s0 for _, _, rows in groups for _, s0, *_ in rows),
                                    self.launches, self._step_decoding))
        return rest

    def _cut(self, items: list[_Work], decode: bool) -> tuple[dict[str, list], list[_Work]]:
        """`items`' rows of this call per model, (work, start, end, segment, older segments,
        segment index), each cut at its KV segment's end (and a prefill at `max_prefill_tokens`:
        a request's span of a step runs in one call); and the work cut off, left for later."""
        by_model: dict[str, list[tuple[_Work, int, int, KVSegment, list[KVSegment], int]]] = {}
        rest: list[_Work] = []
        for w in items:
            si, seg, older, = self._segment_at(w.req.request_id, w.start)
            tpp = self.geoms[w.req.model].tokens_per_page
            end = min(w.end, seg.token_start + seg.pages_per_layer * tpp)
            if not decode:
                end = min(end, w.start + self.max_prefill_tokens)
            if end < w.end:
                rest.append(_Work(w.req, end, w.end, w.decode, w.samples))
            by_model.setdefault(w.req.model, []).append((w, w.start, end, seg, older, si))
        return by_model, rest

    def _lanes(self, by_model: dict[str, list], decode: bool) -> tuple[list[tuple[Any, list[str], list]],
                                                                        list[int]]:
        """The call's lanes, (class, model names of its groups, rows), one per model class (MLA:
        per model), or `micro_batches` ping-pong lanes of a decode class; and per lane the index
        of its program (a class's lanes share one)."""
        by_class: dict[Any, tuple[list[str], list]] = {}
        for model, rows in sorted(by_model.items()):
            names, all_rows = by_class.setdefault(self._lane_key(model), ([], []))
            names.append(model)
            all_rows.extend(rows)
        placed = ({self._lane_key(names[0]): names for _, names in self.lane_keys()}
                  if self.buckets.groups == "placed" else {})
        groups: list[tuple[Any, list[str], list]] = []
        lane_group: list[int] = []
        mb = self.micro_batches
        for gi, ((cls, one), (names, rows)) in enumerate(by_class.items()):
            names = placed.get((cls, one), names)
            if decode and mb > 1 and len(rows) >= mb and not any(r[4] for r in rows):
                groups += [(cls, names, rows[i::mb]) for i in range(mb)]
                lane_group += [gi] * mb
            else:
                groups.append((cls, names, rows))
                lane_group.append(gi)
        return groups, lane_group

    def _lane_shape(self, cls: Any, names: list[str], rows: list, decode: bool
                    ) -> tuple[LaneShape, tuple[list[list], dict[str, int]], np.ndarray, int]:
        """A lane's wanted shape (the smallest buckets holding its rows), its rows per KV device
        (slots sorted by model) with each model's group index, its slots' tail lengths (the
        attention schedule's input) and its decode steps (1 for a prefill)."""
        n, n_kv, bk = self.store.num_devices, self.store.num_kv, self.buckets
        gidx = {m: i for i, m in enumerate(names)}
        per_dev: list[list] = [[] for _ in range(n_kv)]
        for row in sorted(rows, key=lambda r: gidx[r[0].req.model]):
            per_dev[row[3].device].append(row)
        b = bk.round(max(len(d) for d in per_dev), bk.slots_floor)
        k = max(r[2] - r[1] for r in rows) if decode else 1
        t = b if decode else bk.round(max(sum(r[2] - r[1] for r in d) for d in per_dev), bk.tokens_floor)
        pages = bk.round(max(max(r[3].pages_per_layer for r in rows),
                             max((s.pages_per_layer for r in rows for s in r[4]), default=1)),
                         bk.pages_floor)
        n_extra_dev = [0] * n
        for row in rows:
            for s in row[4]:
                n_extra_dev[s.device] += 1
        x = _pow2(max(n_extra_dev)) if any(n_extra_dev) else 0
        c = 1 if decode or not x else _pow2(max(r[2] - r[1] for r in rows))  # only read with extras
        # one stop width: stop-id counts never select a program
        shape = LaneShape(cls, _pow2(len(names)), b, t, pages, x, c, self.stop_width)
        tails = np.array([(r[1] + 1 if decode else r[2]) - r[3].token_start for r in rows])
        return shape, (per_dev, gidx), tails, k

    def _lane_programs(self, wanted: list[LaneShape], lane_group: list[int], tail_lens: list[np.ndarray],
                       decode: bool, steps: int) -> tuple[list[tuple[list[int], Callable]], list[LaneShape]]:
        """Each lane group's program, its shape's or a compiled larger one (`_program_for`), with
        the indices of its lanes; and every lane's shape in the program that runs it (the inputs
        are built at those)."""
        programs: list[tuple[list[int], Callable]] = []
        shapes = list(wanted)
        for gi in dict.fromkeys(lane_group):  # one program per lane group, in order
            idxs = [i for i, g in enumerate(lane_group) if g == gi]
            sched = attention_schedule(
                [tail_lens[i] for i in idxs], wanted[idxs[0]].cls.config,
                decode and self.platform == "gpu" and not any(wanted[i].extras for i in idxs))
            spec, prog = self._program_for(StepSpec(tuple(wanted[i] for i in idxs), decode, steps,
                                                    self.backend, attention_schedule=sched,
                                                    attention_kernels=self.attention_kernels))
            for i, shape in zip(idxs, spec.lanes, strict=True):
                shapes[i] = shape
            programs.append((idxs, prog))
        return programs, shapes

    def _placeholders(self, lanes: list[LaneShape], placements: list, outs: list, decode: bool
                      ) -> list[list[tuple[str, int, int, int, int]]]:
        """The call's tokens as placeholders in each request's `generated` (and the planner),
        until `_collect` reads them; per lane (request, KV device, slot, tokens, first index)."""
        n = self.store.num_devices
        places = []
        for lane, place, out in zip(lanes, placements, outs, strict=True):
            lane_places = []
            for rid, d, bi, q, samples in place:
                if not samples:
                    continue
                count = q if decode else 1  # a prefill samples one token, after its last row
                r = self.reqs.get(rid)
                if r is None or r.done:  # ended while the program compiled: tokens dropped
                    self.dropped_tokens += count
                    continue
                g0 = len(r.generated)
                r.generated.extend([PENDING] * count)
                r.pending += count
                last_step = count - 1 if decode else 0
                r.feed = (out, last_step * n * lane.slots + d * lane.slots + bi)
                self.planner.append_tokens(rid, [PENDING] * count)
                lane_places.append((rid, d, bi, count, g0))
            places.append(lane_places)
        return places

    def _call_work(self, groups: list[tuple[Any, list[str], list]], lanes: list[LaneShape]) -> PrefillWork:
        """A prefill call's `PrefillWork`: its lanes' tokens, and the rows their programs (the
        shapes that ran) compute beyond them."""
        n_kv = self.store.num_kv
        work = NO_WORK
        for (_, _, rows), lane in zip(groups, lanes, strict=True):
            costs = self._model_costs(rows[0][0].req.model)
            for _, s0, e0, *_ in rows:
                work = work + chunk_work(costs, s0, e0)
            padded = lane.tokens * n_kv - sum(e0 - s0 for _, s0, e0, *_ in rows)
            work = work + PrefillWork(0, 0.0, 0.0, max(0, padded) * dense_flops_per_token(costs))
        return work

    def _execute(self, programs: list[tuple[list[int], Callable]], groups: list[tuple[Any, list[str], list]],
                 shapes: list[LaneShape], sorted_rows: list[tuple[list[list], dict[str, int]]], decode: bool
                 ) -> tuple[list[Any], list[list[tuple[str, int, int, int, bool]]], float, float | None]:
        """Builds the lanes' inputs (at `shapes`, the shapes of the programs that run them) and calls
        each lane group's program on the arena. Returns per lane its output ([steps, N * slots]
        sampled tokens, on the device) and its placements (request id, KV device, slot, tokens
        computed, samples), the `_now()` at dispatch, and None (the calls' end is known by reading
        them; a simulated executor returns its virtual end time there instead)."""
        host_inputs: list[dict[str, np.ndarray]] = []
        placements: list[list[tuple[str, int, int, int, bool]]] = []
        feeds: list[list[tuple[int, Any, int]]] = []  # per lane: (tokens row, source, flat index)
        for (cls, names, _), shape, (per_dev, gidx) in zip(groups, shapes, sorted_rows, strict=True):
            arr, feed = self._lane_inputs(cls, names, shape, per_dev, gidx, decode)
            host_inputs.append(arr)
            placements.append(lane_placements(per_dev, decode))
            feeds.append(feed)
        outs, dispatched = self._dispatch(programs, host_inputs, feeds)
        return outs, placements, dispatched, None

    def _lane_inputs(self, cls: Any, names: list[str], shape: LaneShape, per_dev: list[list],
                     gidx: dict[str, int], decode: bool
                     ) -> tuple[dict[str, np.ndarray], list[tuple[int, Any, int]]]:
        """One lane's host inputs at `shape` ([N, ...] per key: `pooled_step.input_shapes`) from its
        rows per KV device, and its feeds: tokens still on the device, (flat tokens row, source
        call output, flat index into it)."""
        store = self.store
        n, n_kv = store.num_devices, store.num_kv
        g_count, b, t, pages = shape.groups, shape.slots, shape.tokens, shape.max_pages
        x, c, s_w = shape.extras, shape.extra_rows, shape.stop_width
        L = cls.config.num_layers
        arr = empty_lane_inputs(n, b, t, L, pages, s_w, decode)
        a_base = [store.models[m].base[Role.KV] for m in names]
        f_base = [store.models[m].base[Role.WEIGHTS] for m in names]
        arr["a_base"] = np.tile(np.array(a_base + a_base[:1] * (g_count - len(names)), np.int32), (n, 1))
        arr["f_base"] = np.tile(np.array(f_base + f_base[:1] * (g_count - len(names)), np.int32), (n, 1))
        arr["grp_rows"] = np.zeros((n, g_count), np.int32)
        arr["grp_slots"] = np.zeros((n, g_count), np.int32)
        arr["tok_grp"] = np.zeros((n, t), np.int32)
        arr["slot_grp"] = np.zeros((n, b), np.int32)
        if x:
            arr["x_rows"] = np.full((n, x, c), -1, np.int32)
            arr["x_pages"] = np.full((n, x, L, pages), -1, np.int32)
            arr["x_len"] = np.zeros((n, x), np.int32)
        feed: list[tuple[int, Any, int]] = []
        x_fill = [0] * n
        for d in range(n_kv):
            row_ptr = 0
            for bi, row in enumerate(per_dev[d]):
                row_ptr = self._fill_slot(arr, feed, x_fill, d, bi, row_ptr, row, gidx, t, decode)
            if not decode:
                arr["cu_q"][d, len(per_dev[d]) + 1:] = row_ptr
        return arr, feed

    def _fill_slot(self, arr: dict[str, np.ndarray], feed: list[tuple[int, Any, int]], x_fill: list[int],
                   d: int, bi: int, row_ptr: int, row: tuple, gidx: dict[str, int], t: int,
                   decode: bool) -> int:
        """Writes slot `bi` of KV device `d` into `arr` (its token rows from `row_ptr` for a
        prefill, row `bi` for a decode; its pages, sampling and older segments as extras, counted
        per device in `x_fill`); returns the next free token row."""
        w, s0, e0, seg, older, _ = row
        r = w.req
        base = self.store.kv_first_page
        q = e0 - s0
        rows_idx = (np.arange(q) + row_ptr) if not decode else np.array([bi])
        gi = gidx[r.model]
        arr["grp_rows"][d, gi] += len(rows_idx)
        arr["grp_slots"][d, gi] += 1
        arr["tok_grp"][d, rows_idx] = gi
        arr["slot_grp"][d, bi] = gi
        if decode:
            tok = _tokens_at(r, [], s0, s0 + 1)[0]
            if tok == PENDING:  # sampled by a call still in flight: read on device
                feed.append(_device_feed(r, s0, d * t + bi))
            arr["tokens"][d, bi] = tok
            arr["positions"][d, bi] = s0
            arr["tok_slot"][d, bi] = bi
            arr["sample_row"][d, bi] = bi
            arr["tail_len"][d, bi] = s0 - seg.token_start + 1
            arr["remaining"][d, bi] = e0 - s0
        else:
            toks = _tokens_at(r, [], s0, e0)
            if PENDING in toks:
                # a mixed step's decode row (`mixed_steps`): its one input token, the last one
                # sampled, is read on the device as a decode call's is
                if q != 1:
                    raise RuntimeError(f"request {r.request_id}: prefill of positions "
                                       f"[{s0}, {e0}) reads tokens still on the device")
                feed.append(_device_feed(r, s0, d * t + row_ptr))
                toks = [0]
            arr["tokens"][d, rows_idx] = toks
            arr["positions"][d, rows_idx] = np.arange(s0, e0)
            arr["tok_slot"][d, rows_idx] = bi
            arr["cu_q"][d, bi + 1:] = row_ptr + q
            arr["tail_len"][d, bi] = e0 - seg.token_start
            if w.samples and e0 == w.end:
                arr["sample_row"][d, bi] = row_ptr + q - 1
            arr["remaining"][d, bi] = 1
            row_ptr += q
        lp = seg.layer_pages  # [L, pages]
        arr["tail_pages"][d, bi, :, : lp.shape[1]] = lp + base
        arr["tail_start"][d, bi] = seg.token_start
        sp = r.sampling
        arr["temperature"][d, bi] = sp.temperature
        arr["top_k"][d, bi] = sp.top_k
        arr["top_p"][d, bi] = sp.top_p
        arr["seed"][d, bi] = seed_words(sp.seed)
        arr["stop_ids"][d, bi, : len(r.stop_ids)] = r.stop_ids
        for s in older:
            xd = s.device
            xi = x_fill[xd]
            x_fill[xd] += 1
            arr["x_rows"][xd, xi, : len(rows_idx)] = d * t + rows_idx
            lp = s.layer_pages
            arr["x_pages"][xd, xi, :, : lp.shape[1]] = lp + base
            arr["x_len"][xd, xi] = s.num_tokens
        return row_ptr

    def _dispatch(self, programs: list[tuple[list[int], Callable]], host_inputs: list[dict[str, np.ndarray]],
                  feeds: list[list[tuple[int, Any, int]]]) -> tuple[list[Any], float]:
        """The device side of `_execute`: copies each lane's host inputs ([N, ...] per key) to the
        devices, feeds tokens still on the device (`feeds`: per lane, (flat tokens row, source
        call output, flat index into it)) and calls each lane group's program on the arena.
        Returns per lane its output and the `_now()` at dispatch. (A multi-process leader
        overrides it to send the same step to its followers first: crosspool_jax/distributed.)"""
        store = self.store
        sharding = store.sharding
        dev_feeds: list[dict[int, tuple[Any, list[int], list[int]]]] = []
        for arr, feed in zip(host_inputs, feeds, strict=True):
            by_src: dict[int, tuple[Any, list[int], list[int]]] = {}
            for row, src, idx in feed:
                if isinstance(src, np.ndarray):  # a host-scheduled call's tokens: already here
                    arr["tokens"].reshape(-1)[row] = src.reshape(-1)[idx]
                else:
                    _, rows, idxs = by_src.setdefault(id(src), (src, [], []))
                    rows.append(row)
                    idxs.append(idx)
            dev_feeds.append(by_src)
        dev_inputs = tuple({key: jax.device_put(v.reshape(-1, *v.shape[2:]), sharding)
                            for key, v in arr.items()} for arr in host_inputs)
        for inp, by_src in zip(dev_inputs, dev_feeds, strict=True):
            for src, rows, idx in by_src.values():
                m = _pow2(len(rows), 8)  # padded: out-of-range rows are dropped
                rows_a = np.full(m, inp["tokens"].shape[0], np.int32)
                rows_a[: len(rows)] = rows
                idx_a = np.zeros(m, np.int32)
                idx_a[: len(idx)] = idx
                inp["tokens"] = self._feed(inp["tokens"], rows_a, src, idx_a)
        dispatched = self._now()
        outs: list[Any] = [None] * len(host_inputs)
        for idxs, prog in programs:
            store.arena, group_outs = prog(store.arena, tuple(dev_inputs[i] for i in idxs))
            for i, o in zip(idxs, group_outs, strict=True):
                outs[i] = o
        return outs, dispatched


# Decode attention switches from the split grid to the persistent work list at this raggedness
# (longest tail / mean tail of the call's live slots). Measured on one H200 (benchmarks/
# schedule_rule.py, docs/kernels.md): at >= 8 persistent won all 8 batches measured (1.05-2.6x);
# from 1 to 4 either won (0.67-1.48x; 3.0x once), so split, the better on uniform long batches, stays.
PERSISTENT_RAGGEDNESS = 8.0


def attention_schedule(tail_lens: Sequence[np.ndarray], cfg: ModelConfig, eligible: bool) -> str:
    """"persistent" or "split" for a decode call of slots with these tail lengths (0: empty
    slot): persistent when the batch is ragged (`PERSISTENT_RAGGEDNESS`), for GQA models on GPU
    (`eligible`: a GPU decode call without split-KV extras). MLA stays split (its persistent
    kernel was slower even on uniform batches: docs/benchmarks.md case (d))."""
    if not eligible or cfg.attention != AttentionKind.GQA:
        return "split"
    lens = np.concatenate([np.asarray(t).reshape(-1) for t in tail_lens])
    lens = lens[lens > 0]
    if lens.size < 2:
        return "split"
    return "persistent" if lens.max() >= PERSISTENT_RAGGEDNESS * lens.mean() else "split"


def lane_placements(per_dev: Sequence[Sequence[tuple]], decode: bool
                    ) -> list[tuple[str, int, int, int, bool]]:
    """Where a lane's rows run: per row of `per_dev` (per KV device, its rows in slot order, each
    (work, start, end, segment, older segments, segment index)), (request id, KV device, slot,
    tokens computed, whether the row samples a token: every decode row, and a prefill row that
    ends its work's range with `samples`)."""
    return [(w.req.request_id, d, bi, e0 - s0, decode or (w.samples and e0 == w.end))
            for d, rows in enumerate(per_dev) for bi, (w, s0, e0, *_) in enumerate(rows)]


def _device_feed(r: _Req, pos: int, row: int) -> tuple[int, Any, int]:
    """(flat tokens row, source call output, flat index) feeding `r`'s input token at `pos` from the
    call still in flight that sampled it (`r.feed`); RuntimeError unless it is the request's last."""
    if r.feed is None or pos != len(r.prompt) + len(r.generated) - 1:
        raise RuntimeError(f"request {r.request_id}: input token at {pos} is on the device but not its last")
    return (row, *r.feed)


def _tokens_at(r: _Req, new: list[int], start: int, end: int) -> list[int]:
    """The request's tokens at positions [start, end) of prompt + generated + `new` (this step's),
    without building the whole sequence (a long prompt would be copied every step)."""
    p, g = len(r.prompt), len(r.generated)
    out = list(r.prompt[start:min(end, p)]) if start < p else []
    if end > p:
        a, b = max(start, p) - p, end - p
        out += r.generated[a:min(b, g)]
        if b > g:
            out += new[max(a - g, 0):b - g]
    if len(out) != end - start:
        raise RuntimeError(f"request {r.request_id}: positions [{start}, {end}) past its "
                           f"{p + g + len(new)} known tokens")
    return out


def _feed_tokens(tokens: jax.Array, rows: jax.Array, src: jax.Array, idx: jax.Array) -> jax.Array:
    """tokens [N * T] with tokens[rows[i]] = src.flat[idx[i]]: decode input tokens taken from the
    output [steps, N * B] of the call that sampled them, on the device (rows past the end: padding,
    dropped). Jitted per runner with the step inputs' sharding; donates: tokens."""
    return tokens.at[rows].set(src.reshape(-1)[idx], mode="drop")


@functools.partial(jax.jit)
def _gather_pages(arena: jax.Array, idx: jax.Array) -> jax.Array:
    """[n] global page indices -> [n, rows_per_page, R] (a device-to-host swap's source)."""
    return arena[idx]


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_pages(arena: jax.Array, idx: jax.Array, pages: jax.Array) -> jax.Array:
    """Writes [n, rows_per_page, R] pages back at global page indices. donates: the arena."""
    return arena.at[idx].set(pages.astype(arena.dtype))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def as_device_array(x: np.ndarray, sharding: Any) -> jax.Array:
    return jax.device_put(jnp.asarray(x), sharding)
