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

`GroupRunner` is spread over ten modules: this one (its settings, state and requests),
`step_plan` (a step's plan from the planner, its swaps, the prefill budget), `step_calls` (a
step's work as program calls: lanes, dispatch), `lane_inputs` (a lane's host inputs),
`step_reading` (the calls in flight and reading them), `step_programs` (which compiled program
serves a call, compiling off the serving path), `step_grid` (the bucket grid of program shapes),
`warm_programs` (a new lane's warm-up plan and the admission holds that wait for it),
`runner_models` (placing, sleeping, waking and removing models) and `runner_records` (the
records: requests, calls, results).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax

from crosspool_jax.errors import InvalidRequestError
from crosspool_jax.execution.compile_cache import enable_compilation_cache
from crosspool_jax.execution.host_step import EXECUTIONS, StrategyTrial
from crosspool_jax.execution.lane_inputs import LaneInputs
from crosspool_jax.execution.prefill_cost import (
    PrefillCostFit,
)
from crosspool_jax.execution.runner_models import RunnerModels
from crosspool_jax.execution.runner_records import _Req
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.execution.step_calls import StepCalls
from crosspool_jax.execution.step_grid import StepGrid
from crosspool_jax.execution.step_plan import StepPlanning
from crosspool_jax.execution.step_programs import ShapeBuckets, StepPrograms, _pow2
from crosspool_jax.execution.step_reading import StepReading
from crosspool_jax.execution.warm_programs import WarmPrograms
from crosspool_jax.memory.arena import ArenaBook, ArenaStore
from crosspool_jax.memory.kv_virtualizer import KVPoolConfig, KVVirtualizer
from crosspool_jax.memory.planner import (
    KVPlanner,
    PlannerConfig,
    PreemptionChoice,
    RequestSpec,
)
from crosspool_jax.memory.topology import PoolTopology
from crosspool_jax.models.costs import ModelCosts
from pallas_kernels import dispatch
from pallas_kernels.page_layout import PageGeometry, PoolLayout

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
# the experts, and doubled TTFT without lowering TBT P99. With the floor at one whole chunk (4,096
# tokens on GPU) 0.8 measured on one H100 (docs/benchmarks.md, "One H100, 2026-12-06/07
# (midnight)"): the smoke replay's gaps 1.90x their decode call at q0.96 against 2.01x at 1.0,
# TTFT P99 17.41 against 15.02 s.
DEFAULT_PREFILL_SHARE = 0.8


def stop_width(max_stop_ids: int) -> int:
    """The stop-id width S of every lane of a runner that takes up to `max_stop_ids` stop ids per
    request: the power of two >= it (ids, not bytes)."""
    return _pow2(max_stop_ids)


class GroupRunner(RunnerModels, StepPlanning, StepPrograms, StepGrid, WarmPrograms, StepReading,
                  StepCalls, LaneInputs):
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
    the serving path. None (both): `$CROSSPOOL_WARM_PROGRAMS` / `$CROSSPOOL_COMPILE_FALLBACK` when
    set (`step_programs.env_setting`), else the defaults above (fallback on). JAX's persistent
    compilation cache is turned on (`compile_cache`).
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
        fallback: bool | None = None,
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
        self._init_programs(max_programs, buckets, fallback, compiler_options, compile_process,
                            compile_workers)
        self._init_warm(warm_programs, warm_slots, warm_context)
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

    @functools.cached_property
    def _feed(self) -> Callable:
        """`_feed_tokens` jitted with the step inputs' sharding (built on first use)."""
        return jax.jit(_feed_tokens, out_shardings=self.store.sharding, donate_argnums=(0,))


def _feed_tokens(tokens: jax.Array, rows: jax.Array, src: jax.Array, idx: jax.Array) -> jax.Array:
    """tokens [N * T] with tokens[rows[i]] = src.flat[idx[i]]: decode input tokens taken from the
    output [steps, N * B] of the call that sampled them, on the device (rows past the end: padding,
    dropped). Jitted per runner with the step inputs' sharding; donates: tokens."""
    return tokens.at[rows].set(src.reshape(-1)[idx], mode="drop")
