"""`PooledEngine`: the serving engine over the one-program pooled step, in three modes.

Modes (one switch, same devices, same kernels, batching, sampling and planner code):

* ``crosspool``: one device group split into a KV pool and a weights pool (``pools="KV+WEIGHTS"``,
  default half and half): every model's FFN weights consolidated on the weights devices, one KV
  pool shared by the requests of every model on the KV devices, split-KV across KV devices.
* ``shared`` (kvcached-like): every device is a colocated group holding whole models (placed to
  balance weight bytes) and a KV arena shared elastically by the models placed there.
* ``static``: the same placement as ``shared``, but each model gets a fixed KV reservation (an
  equal share of its device's KV pages, as planner floor = cap).

The engine interface (crosspool_jax.engine_api.EngineInterface) is the reference engine's: submit /
stream events / cancel / load / unload / stats (the bookkeeping is `engine_api.EngineCore`'s; the
engine keeps no copy of a model's weights outside its arenas). Each device group has its own worker
thread (`_GroupWorker`; shared / static: one per device, crosspool: one), so the groups step
independently: a long step of one (a big prefill, a compile) does not delay another's tokens.
Requests, cancels and unloads from other threads are handed to the right group's worker, so every
GroupRunner is stepped by one thread only (placing or removing a model holds the group's lock). A
cancel's (or an unload's) pages are free when the call returns, even during a compile or a running
call of the group (`GroupRunner`'s state lock, "Threads" in its docstring).

Example (docs/engine.md has a runnable version)::

    from crosspool_jax.engine import PooledEngine
    from crosspool_jax.engine_api import make_request
    eng = PooledEngine(mode="crosspool", pools="4+4")
    eng.add_model("m", cfg, weights)
    for ev in eng.submit(make_request("m", [1, 2, 3], max_new_tokens=8)):
        print(ev.token_id, ev.finish_reason)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from crosspool_jax.detokenize import IncrementalDetokenizer
from crosspool_jax.engine_api import (
    FINISH_ERROR,
    EngineCore,
    EngineStats,
    Event,
    Request,
    RequestHandle,
    Usage,
    _Live,
)
from crosspool_jax.engine_models import EngineModels
from crosspool_jax.engine_sleep import SleepingModels, WakeRecord
from crosspool_jax.errors import CrossPoolError, InvalidRequestError
from crosspool_jax.execution.host_step import EXECUTIONS
from crosspool_jax.execution.pool_runner import DEFAULT_MAX_STOP_IDS, DEFAULT_PREFILL_SHARE, GroupRunner
from crosspool_jax.execution.runner_records import StepResult
from crosspool_jax.memory.arena import HostModel, pinned_host_budget
from crosspool_jax.memory.model_states import ModelState, ModelStates
from crosspool_jax.memory.planner import (
    PlannerConfig,
    PreemptionChoice,
    RequestRejected,
)
from crosspool_jax.memory.topology import PoolTopology, devices_needed, ensure_cpu_devices
from pallas_kernels.dispatch import ATTENTION_KERNELS, DEFAULT_ATTENTION_KERNELS
from pallas_kernels.page_layout import PoolLayout

MODES = ("crosspool", "shared", "static")


# Compile worker processes an engine on GPUs starts by default (`EngineConfig.compile_workers`),
# shared out among its device groups: 4 ran the cold one-GPU smoke replay's compiles without a
# serving-path stall on one H200 (2026-12-05); a host with many groups gets one per group.
GPU_COMPILE_WORKERS = 4
# Most prompt tokens a GPU step prefills (`EngineConfig.max_prefill_tokens`), since 2026-12-06
# (night); 2,048 before. One H100 (docs/benchmarks.md "One H100, 2026-12-06 (night)"): a 4K prompt
# as one call prefilled 1.17-1.18x faster than as two (OLMoE-1B-7B, Qwen3-30B-A3B); the smoke
# replay with 4,096-token calls had TTFT P99 17.98 s against 19.53 s and TBT P99 126 against
# 92 ms, measured while such calls still ran padded to 8,192 rows (fixed since). With that fix
# and the precompile grid's (`StepPrograms.bucket_specs`), one H200 (2026-12-06 late,
# docs/benchmarks.md "One H200, then H100s, 2026-12-06 (late)"): TTFT P99 9.35 s, TBT P99
# 106 ms, 2.04x its own decode call per gap.
GPU_MAX_PREFILL_TOKENS = 4096


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine's arenas and its control knobs.

    arena_bytes: bytes of each device's arena (default: 64 MiB on CPU; 80% of the device's free
      memory on GPU). page_bytes: bytes of one KV page (default 16 KiB on CPU, 256 KiB on GPU: 32
      tokens of an OLMoE-1B-7B layer, so a long request's page table stays narrow).
      max_prefill_tokens: most prompt tokens of all requests per step (default 512 on CPU, 4096
      on GPU: `GPU_MAX_PREFILL_TOKENS`; prefill_chunk defaults to 64 / 512). weights_fraction:
      share of a KV device's arena (crosspool) or of a colocated device's arena (shared/static)
      reserved for weights.
    steps_per_call: decode tokens per host call (K). prefill_chunk: the least prompt tokens a
      step prefills while requests decode (the budget's floor); a request's prompt tokens of one
      step run in one program call (each MoE prefill call reads every expert). prefill_share:
      while requests decode, a step prefills the prompt tokens whose predicted seconds fit this
      share of a measured decode call, at least one chunk
      (default 0.8; the prediction is fitted on the group's own prefill calls,
      `execution.prefill_cost`), so a step that mixes prefill with decode costs ~2 decode steps;
      larger: faster first tokens, slower tokens between. mixed_steps: in a step that prefills a
      lane's prompts, its decoding requests take one token each as rows of the prefill call (one
      read of the experts for both; `GroupRunner`), default False (docs/engine.md "Mixed steps":
      precompiled smoke replays, 2026-12-06, cut TBT P99 1.9x / 2.0x and raised TTFT P99 1.34x /
      1.30x on one H200 / one H100, docs/benchmarks.md).
      compile_process: step programs are traced, lowered and compiled in worker processes and
      loaded here from their serialized executables, so that work never holds the serving
      process's GIL (`execution.compile_process`); None (default): on for GPU, off on CPU (where
      each worker would take one of few cores). compile_workers: background compiles at once per
      device group (with compile_process: worker processes); None (default): with
      compile_process, `GPU_COMPILE_WORKERS` per engine shared out among its device groups (at
      least one each), else 1. On one H200 the cold one-GPU smoke replay with 4 worker processes
      had TTFT P99 2.4x lower than with one compile thread and no serving-path compile, TBT P99
      3% higher (117.4 vs 113.6 ms; 2026-12-05, docs/benchmarks.md). dtype: the arena's
      (weights and KV)
      dtype, default the platform's ("float32" on CPU, "bfloat16" elsewhere). attention_kernels:
      "auto" (default: on Hopper GPUs the Mosaic GPU kernels where they were measured faster;
      inside the engine the Mosaic GQA prefill ran whole 4K prompts 1.08-1.12x faster on one
      H100, docs/kernels.md), "triton" or "mosaic"
      (`pallas_kernels.dispatch`). micro_batches:
      2 = ping-pong decode lanes.
    execution (crosspool mode): "lowered" = each step is one XLA program over both pools (default:
      1.12x the colocated step on 2 x H200; the host-scheduled step is not timed on GPUs yet, and
      DESIGN.md measured a host loop of toy layers ~3x slower than one program), "host" = the
      host-scheduled step (per-layer calls on each pool's own mesh, device-to-device transfers
      between them), "auto" = each lane structure runs both for its first calls and keeps the
      faster (`host_step.MeasuredChoice`).
      shared / static run one device per group: always "lowered"; "host" there is an error.
    overlap: host work overlaps device work (default): each step dispatches its calls, then reads
      the previous step's tokens, so planning, input building, detokenizing and streaming happen
      while the device computes, and every group's devices compute at the same time
      (`pool_runner` module docstring). False: each call's tokens are read right after it.
    max_stop_ids: most stop token ids of one request (default 16; `submit` refuses more with
      InvalidRequestError, and so does `add_model` a model with more eos ids). Every step program's
      stop-id width is this rounded up to a power of two, so no stop-id count compiles a program.
    idle_sleep_s: a resident model with no live request for this many seconds is put to sleep
      (weights to host memory, arena rows and KV registration freed); None (default): never.
    host_weights_bytes: bytes of sleeping models' weights kept in host memory; past it the least
      recently used sleeping model loaded from a checkpoint (`load_model`) is dropped to disk (its
      next request re-reads the checkpoint). Models added from memory have nothing to re-read and
      stay in host memory. None (default): `arena.pinned_host_budget()` (90% of XLA's pinned pool).
    admission_backfill / starving_after_steps: the KV planner's admission rules
      (`memory.planner.PlannerConfig`, docs/planner.md "Backfill and starving requests"): when a
      model's first waiting request does not fit the KV pool a later one that fits may start
      (default True); a request that has not fit for this many steps has its pages held back from
      every other admission until it starts (default 20; None: never).
    """

    arena_bytes: int | None = None
    page_bytes: int | None = None  # None: 16 KiB on CPU, 256 KiB on GPU
    weights_fraction: float = 0.5
    steps_per_call: int = 4
    prefill_chunk: int | None = None  # None: 64 on CPU, 512 on GPU
    max_prefill_tokens: int | None = None  # None: 512 on CPU, GPU_MAX_PREFILL_TOKENS on GPU
    prefill_share: float = DEFAULT_PREFILL_SHARE
    mixed_steps: bool = False
    compile_process: bool | None = None  # None: GPU on, CPU off
    compile_workers: int | None = None  # None: GPU_COMPILE_WORKERS among the groups, or 1
    dtype: str | None = None
    attention_backend: str | None = None
    attention_kernels: str = DEFAULT_ATTENTION_KERNELS
    micro_batches: int = 1
    execution: str = "lowered"
    overlap: bool = True
    max_stop_ids: int = DEFAULT_MAX_STOP_IDS
    idle_sleep_s: float | None = None
    host_weights_bytes: int | None = None
    admission_backfill: bool = True
    starving_after_steps: int | None = 20


@dataclasses.dataclass
class _Pending:
    live: _Live
    tokens: list[int] = dataclasses.field(default_factory=list)
    detok: IncrementalDetokenizer | None = None  # None: the model has no tokenizer


class _GroupWorker:
    """One device group and the thread that steps it. Only this thread touches the GroupRunner,
    except model placement and removal from other threads, which hold `lock` (so does every step).
    Requests, cancels and unloads reach it through `inbox`; it streams its requests' tokens itself,
    so a long step of another group (a big prefill, a compile) never delays them."""

    def __init__(self, engine: PooledEngine, index: int, group: GroupRunner):
        self.engine, self.index, self.group = engine, index, group
        self.lock = threading.Lock()  # placing / removing models vs this group's steps
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.pending: dict[str, _Pending] = {}  # requests the group runs (this thread only)
        self.running = 0  # requests the group's planner runs, as of its last step (stats)
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name=f"crosspool-engine-group{index}", daemon=True)

    def run(self) -> None:
        self.engine._tls.worker = self
        busy = True
        while not self.stopping:
            try:
                self.drain(wait=0.0 if busy else 0.002)
                busy = not self.stopping and self.engine._step_groups()
            except Exception as e:  # an engine bug must not hang consumers: fail what is live here
                msg = " ".join(str(e).split()) or type(e).__name__
                self.fail_all(f"internal error: {type(e).__name__}: {msg}")
                busy = False
        with self.lock:  # stopped: queued warm-up compiles would only take CPU from what remains
            self.group.stop_background()

    def drain(self, wait: float) -> None:
        """Handles what the inbox holds (waiting up to `wait` seconds for the first message)."""
        while True:
            try:
                kind, arg = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
            except queue.Empty:
                return
            wait = 0.0
            if kind == "stop":
                self.stopping = True
            elif kind == "admit":
                self.admit(arg)
            elif kind == "cancel":
                p = self.pending.pop(arg, None)
                if p is not None:
                    with self.lock:
                        self.group.cancel(arg)
            elif kind == "unload":
                self.unload(arg)

    def admit(self, lv: _Live) -> None:
        r = lv.request
        if lv.done:  # cancelled or unloaded before it got here
            return
        try:
            with self.lock:
                if r.model not in self.group.geoms:  # unloaded meanwhile (its unload ends it too)
                    self.engine._finish(lv, FINISH_ERROR, error=f"model {r.model!r} is not loaded")
                    return
                self.group.submit(r.request_id, r.model, r.prompt_ids, r.max_new_tokens, r.sampling,
                                  r.stop_token_ids)
        except RequestRejected as e:
            self.engine._finish(lv, FINISH_ERROR, error=f"rejected: {e}")
            return
        lv.running = True
        tok = lv.model.tokenizer
        self.pending[r.request_id] = _Pending(lv, detok=None if tok is None else IncrementalDetokenizer(tok))

    def unload(self, name: str) -> None:
        """Ends the model's requests here (their final events are already sent) and frees its
        weights and KV registration; other models' requests keep running."""
        try:
            with self.lock:
                for rid in [r for r, p in self.pending.items() if p.live.request.model == name]:
                    self.group.fail(rid, "model unloaded")
                    del self.pending[rid]
                self.group.remove_model(name)
                if self.engine.mode == "static":
                    self.engine._set_static_limits(self.group)
        finally:
            self.engine._unloaded(name)

    def step(self) -> bool:
        """One step of the group if it has work (with overlap: dispatch this step's calls, read the
        previous step's), then streams what was read. False when idle."""
        group = self.group
        with self.lock:
            if not group.has_work:
                self.running = 0
                return False
            before = _programs_built(group)
            t0 = time.perf_counter()
            group.launch()
            res = group.result()
            new = _programs_built(group) - before
            self.running = group.running_count()
        if new > 0:
            models = sorted({self.pending[r].live.request.model for r in res.tokens if r in self.pending})
            self.engine._note_compiles(new, models, t0)
        self.engine._note_preemptions(len(res.preempted))
        self.stream(res)
        return True

    def stream(self, res: StepResult) -> None:
        for rid, toks in res.tokens.items():
            p = self.pending.get(rid)
            if p is None:
                continue
            fin = res.finished.get(rid)
            for i, t in enumerate(toks):
                last = fin is not None and i == len(toks) - 1
                self.emit(p, t, fin[0] if last else None)
        for rid, (reason, _) in res.finished.items():
            p = self.pending.pop(rid, None)
            if p is not None and not p.live.done:  # finished without a token this step
                tail = p.detok.flush() if p.detok is not None else ""  # held-back text
                self.engine._finish(p.live, reason, last=(-1, None, tail) if tail else None,
                                    completion_tokens=len(p.tokens))

    def emit(self, p: _Pending, t: int, reason: str | None) -> None:
        lv = p.live
        if lv.done:
            return
        p.tokens.append(t)
        piece = ""
        if p.detok is not None:
            piece = p.detok.push(t)
            if reason is not None:
                piece += p.detok.flush()  # a held-back tail
        self.engine._count_tokens()
        if reason is not None:
            self.pending.pop(lv.request.request_id, None)
            self.engine._finish(lv, reason, last=(len(p.tokens) - 1, t, piece),
                                completion_tokens=len(p.tokens))
        else:
            self.engine._put_token(lv, Event(lv.request.request_id, len(p.tokens) - 1, t, piece, time.time()))

    def fail_all(self, message: str) -> None:
        """Fails every request of this group (an internal error); other groups' keep running."""
        for rid, p in list(self.pending.items()):
            with contextlib.suppress(CrossPoolError, KeyError, RuntimeError), self.lock:
                self.group.fail(rid, message)
            self.engine._finish(p.live, FINISH_ERROR, error=message)
        self.pending.clear()


class PooledEngine(EngineModels, SleepingModels, EngineCore):
    """The pooled engine (see module docstring). `mode`: "crosspool" | "shared" | "static";
    `pools`: the crosspool device split ("KV+WEIGHTS"; shared/static: "N" devices to use)."""

    # the crosspool group's runner (a multi-host leader's subclass: crosspool_jax/distributed)
    runner_class: type[GroupRunner] = GroupRunner

    def __init__(self, mode: str = "crosspool", pools: str | None = None, max_live_requests: int = 64,
                 config: EngineConfig | None = None, devices: list[jax.Device] | None = None):
        if mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        cfg = config or EngineConfig()
        if cfg.execution not in EXECUTIONS:
            raise InvalidRequestError(f"execution must be one of {EXECUTIONS}, got {cfg.execution!r}")
        if cfg.execution == "host" and mode != "crosspool":
            raise InvalidRequestError(f"execution 'host' schedules layers between the two pools of "
                                      f"mode crosspool; mode {mode} has one device per group")
        if devices is None:  # a CPU-only machine gets the virtual devices the split needs
            ensure_cpu_devices(devices_needed(mode, pools))
        devs = list(devices or jax.devices())
        platform = "gpu" if devs[0].platform in ("gpu", "cuda") else "cpu"
        arena = cfg.arena_bytes or (64 << 20 if platform == "cpu" else _gpu_arena_bytes(devs[0]))
        n = 1  # device groups: crosspool's one, or shared / static's one per device used
        if mode != "crosspool":
            n = len(devs) if pools is None else int(pools)
            if not 1 <= n <= len(devs):
                raise InvalidRequestError(f"mode {mode}: pools must be a device count in [1, {len(devs)}]")
        self.config = cfg = resolve_config(cfg, platform, n)
        layout, wpages = arena_layout(cfg, platform, arena)
        kw = runner_kwargs(cfg, platform)
        self.groups: list[GroupRunner] = []
        if mode == "crosspool":
            if pools is None:
                if len(devs) < 2:
                    raise InvalidRequestError(
                        "mode crosspool needs at least 2 devices (a KV and a weights pool)")
                pools = f"{len(devs) // 2}+{len(devs) - len(devs) // 2}"
            self.pools = pools
            self.groups.append(self.runner_class(PoolTopology.split(pools, devs), layout, wpages,
                                                 execution=cfg.execution, **kw))
        else:
            self.pools = str(n)
            self.groups = [GroupRunner(None, layout, wpages, colocated=d, **kw) for d in devs[:n]]
        super().__init__(max_live_requests=max_live_requests)
        self._gws = [_GroupWorker(self, i, g) for i, g in enumerate(self.groups)]
        self._model_group: dict[str, _GroupWorker] = {}  # under self._lock
        self._model_bytes: dict[str, int] = {}  # arena bytes of each model's weights (group balancing)
        self._unloading: dict[str, tuple[_GroupWorker, threading.Event]] = {}
        self._tls = threading.local()  # .worker: the group worker of the calling thread
        self._preemptions = 0
        self._programs_compiled = 0
        # called (on a group's worker thread) with a one-line note after each step that compiled
        # step programs: which models, how many, how long (the server logs it; compiles stall a step)
        self.on_compile: Callable[[str], None] | None = None
        # sleeping models (issue 20): states under self._lock; one sleep or wake at a time
        self._states = ModelStates()
        self._host: dict[str, HostModel] = {}  # weights of sleeping models (host memory)
        self._checkpoints: dict[str, str] = {}  # model -> the checkpoint a wake from disk re-reads
        self._host_budget = (pinned_host_budget() if cfg.host_weights_bytes is None
                             else cfg.host_weights_bytes)
        self._disk_reads = threading.Semaphore(1)
        self._wakes: dict[str, threading.Event] = {}  # set when the model's wake under way ends
        self.wake_log: collections.deque[WakeRecord] = collections.deque(maxlen=1024)
        self._waiting: dict[str, list[_Live]] = {}  # requests of a waking model
        self._transition = threading.Lock()
        self._start_workers([gw.thread for gw in self._gws])
        if cfg.idle_sleep_s is not None:
            threading.Thread(target=self._idle_sleeper, args=(cfg.idle_sleep_s,),
                             name="crosspool-idle-sleep", daemon=True).start()

    # ---- requests -----------------------------------------------------------------------------
    def _worker_of(self, lv: _Live) -> _GroupWorker | None:
        with self._lock:
            return self._model_group.get(lv.request.model)

    def _enqueue(self, lv: _Live) -> None:
        name = lv.request.model
        wake = queued = False
        with self._lock:
            gw = self._model_group.get(name)
            if gw is not None:
                self._states.request_started(name)
                state = self._states.state(name)
                if state != ModelState.RESIDENT:  # its requests wait for the wake
                    self._waiting.setdefault(name, []).append(lv)
                    queued = True
                    wake = state in (ModelState.SLEEPING, ModelState.ON_DISK)
                    if wake:
                        self._start_waking(name)
        if gw is None:  # unloaded since submit() looked it up
            self._finish(lv, FINISH_ERROR, error=f"model {name!r} is not loaded")
            return
        if wake:
            threading.Thread(target=self._wake_and_admit, args=(name,), name=f"crosspool-wake-{name}",
                             daemon=True).start()
        elif not queued:
            gw.inbox.put(("admit", lv))

    def _finish(self, lv: _Live, reason: str, error: str | None = None,
                last: tuple[int, int | None, str] | None = None, completion_tokens: int = 0) -> bool:
        done = super()._finish(lv, reason, error, last, completion_tokens)
        if done:
            with self._lock:
                self._states.request_ended(lv.request.model)
        return done

    def submit(self, request: Request) -> RequestHandle:
        """As `EngineCore.submit`; also refuses more stop ids than the step programs take
        (`EngineConfig.max_stop_ids`) before anything is queued."""
        n, limit = len(request.stop_token_ids), self.config.max_stop_ids
        if n > limit:
            raise InvalidRequestError(f"{n} stop token ids; the step programs take at most {limit} "
                                      "(max_stop_ids)")
        return super().submit(request)

    def _on_cancel(self, lv: _Live) -> None:
        gw = self._worker_of(lv)
        if gw is not None:  # else unloaded: the unload ends it in its group
            rid = lv.request.request_id
            # its pages are free now, even while the worker compiles or waits for the device (the
            # runner's state lock, not the step's); the worker then forgets it (inbox)
            gw.group.cancel(rid)
            gw.inbox.put(("cancel", rid))

    def _stop_workers(self) -> None:
        for gw in self._gws:
            gw.inbox.put(("stop", None))

    def stats(self) -> EngineStats:
        base = super().stats()
        # running = what the planners admitted (as of each group's last step); the rest of the live
        # requests wait: for a worker, or in a planner queue for KV pages
        live = base.queue_depth + base.running
        running = min(live, sum(gw.running for gw in self._gws))
        base = dataclasses.replace(base, queue_depth=live - running, running=running)
        pages = []
        for gi, g in enumerate(self.groups):  # read while the workers step: no request iteration
            total = g.kv.config.pages_per_device
            for d in range(g.kv.config.num_devices):
                dev = g.store.kv_devices[d]
                pages.append((f"{dev.platform}:{dev.id}" if len(self.groups) == 1 else
                              f"group{gi}/{dev.platform}:{dev.id}", total - g.kv.pages_free(d), total))
        with self._lock:
            preemptions = self._preemptions
            states = tuple((i.name, i.state.value) for i in self._states.snapshot())
        return dataclasses.replace(base, kv_pages=tuple(pages), preemptions=preemptions,
                                   model_states=states)

    @property
    def programs_compiled(self) -> int:
        """Step programs compiled since the engine started (all groups)."""
        return self._programs_compiled

    def describe(self) -> str:
        g = self.groups[0]
        topo = g.store.topology
        where = topo.describe() if topo is not None else (f"{len(self.groups)} colocated device"
                                                          f"{'s' if len(self.groups) > 1 else ''}")
        return (f"mode {self.mode}: {where}, {self.execution()}, "
                f"K={self.config.steps_per_call} tokens per host call, host work "
                f"{'overlaps device work' if self.config.overlap else 'not overlapped'}")

    def execution(self) -> str:
        """Which execution strategy runs the steps, in words (auto: per held step program)."""
        g = self.groups[0]
        if g.execution == "lowered":
            return "one-program step (lowered)"
        if g.execution == "host":
            return "host-scheduled step (per-layer calls on each pool's mesh)"
        n = g.execution_summary()
        return (f"auto step strategy ({n['lowered']} shapes lowered, {n['host']} host-scheduled, "
                f"{n['measuring']} measuring)")

    # ---- the workers (one per device group, `_GroupWorker`) ---------------------------------------
    def _step_groups(self) -> bool:
        """One step of the calling worker's group (each group's thread calls it in its loop; the
        hook tests and benchmarks wrap to hold or gate steps). False when the group was idle."""
        return self._tls.worker.step()

    def _note_compiles(self, new: int, models: list[str], t0: float) -> None:
        with self._lock:
            self._programs_compiled += new
            total = self._programs_compiled
        if self.on_compile is not None:
            self.on_compile(f"compiled {new} step program{'s' if new > 1 else ''} "
                            f"({', '.join(models) or 'no tokens'}) in "
                            f"{time.perf_counter() - t0:.1f} s; {total} so far")

    def _note_preemptions(self, n: int) -> None:
        if n:
            with self._lock:
                self._preemptions += n


def resolve_config(cfg: EngineConfig, platform: str, groups: int = 1) -> EngineConfig:
    """`cfg` with the defaults of the platform ("gpu" or "cpu") and of an engine of `groups`
    device groups filled in (page_bytes, prefill_chunk, max_prefill_tokens, compile_process,
    compile_workers)."""
    gpu = platform == "gpu"
    process = gpu if cfg.compile_process is None else cfg.compile_process
    workers = cfg.compile_workers
    if workers is None:
        workers = max(1, GPU_COMPILE_WORKERS // max(1, groups)) if process and gpu else 1
    return dataclasses.replace(cfg, page_bytes=cfg.page_bytes or (262144 if gpu else 16384),
                               prefill_chunk=cfg.prefill_chunk or (512 if gpu else 64),
                               max_prefill_tokens=cfg.max_prefill_tokens
                               or (GPU_MAX_PREFILL_TOKENS if gpu else 512),
                               compile_process=process, compile_workers=workers)


def arena_layout(cfg: EngineConfig, platform: str, arena_bytes: int) -> tuple[PoolLayout, int]:
    """Each device's arena of `arena_bytes` bytes as pages of the resolved `cfg`, and the pages of
    it reserved for weights (`weights_fraction`); raises InvalidRequestError for a page size the
    rows cannot tile."""
    dtype = cfg.dtype or ("float32" if platform == "cpu" else "bfloat16")
    itemsize = jnp.dtype(dtype).itemsize
    row_elems = 128 if platform != "cpu" else 64
    if cfg.page_bytes % (row_elems * itemsize):
        raise InvalidRequestError(f"page_bytes {cfg.page_bytes} must be a multiple of {row_elems * itemsize}")
    num_pages = arena_bytes // cfg.page_bytes
    layout = PoolLayout(cfg.page_bytes, dtype, row_elems, num_pages)
    return layout, max(1, int(num_pages * cfg.weights_fraction))


def runner_kwargs(cfg: EngineConfig, platform: str) -> dict[str, Any]:
    """The `GroupRunner` keyword arguments of every group of an engine with the resolved `cfg`
    (`resolve_config`); raises InvalidRequestError for a `max_stop_ids`, `compile_workers` or
    `starving_after_steps` below 1 or a `prefill_share` not above 0."""
    if cfg.max_stop_ids < 1:
        raise InvalidRequestError(f"max_stop_ids must be >= 1, got {cfg.max_stop_ids}")
    if not cfg.prefill_share > 0:
        raise InvalidRequestError(f"prefill_share must be > 0, got {cfg.prefill_share}")
    if cfg.compile_workers < 1:
        raise InvalidRequestError(f"compile_workers must be >= 1, got {cfg.compile_workers}")
    if cfg.starving_after_steps is not None and cfg.starving_after_steps < 1:
        raise InvalidRequestError(f"starving_after_steps must be >= 1 or None, got "
                                  f"{cfg.starving_after_steps}")
    if cfg.attention_kernels not in ATTENTION_KERNELS:
        raise InvalidRequestError(f"attention_kernels must be one of {ATTENTION_KERNELS}, got "
                                  f"{cfg.attention_kernels!r}")
    return dict(steps_per_call=cfg.steps_per_call, prefill_chunk=cfg.prefill_chunk,
                max_prefill_tokens=cfg.max_prefill_tokens, backend=cfg.attention_backend,
                platform=platform, micro_batches=cfg.micro_batches, overlap=cfg.overlap,
                max_stop_ids=cfg.max_stop_ids, prefill_share=cfg.prefill_share,
                mixed_steps=cfg.mixed_steps, compile_process=cfg.compile_process,
                compile_workers=cfg.compile_workers, attention_kernels=cfg.attention_kernels,
                planner_config=PlannerConfig(preemption=PreemptionChoice.ALWAYS_RECOMPUTE,
                                             admission_backfill=cfg.admission_backfill,
                                             starving_after_steps=cfg.starving_after_steps))


def _programs_built(group: GroupRunner) -> int:
    """Step programs the group has compiled so far (its own counter where it keeps one, else the
    programs it holds; the difference across one step is what that step compiled)."""
    built = getattr(group, "programs_built", None)
    return int(built) if built is not None else len(group._programs)


def _gpu_arena_bytes(device: jax.Device) -> int:
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit", 16 << 30)
    used = stats.get("bytes_in_use", 0)
    return int((limit - used) * 0.8)


__all__ = ["MODES", "EngineConfig", "PooledEngine", "Usage"]
