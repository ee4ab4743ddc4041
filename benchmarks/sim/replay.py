"""`crosspool simulate`: a trace replayed through the engine's own scheduling in simulated time.

    crosspool simulate --preset NAME | --trace FILE [--modes crosspool,shared,static]
                       [--devices N --pools KV+W] [--calibration FILE.json] [--json OUT.json] [--out DIR]

What runs is the engine's host code: per mode, the same memory plan as `crosspool bench`
(`runner.memory_plan`), the same `EngineConfig` and arena layout (`engine.arena_layout`), the same
groups (crosspool: one KV+weights group; shared / static: one colocated group per device), the
same model placement (`engine_models.placement_order`: least loaded by weight bytes, heaviest model
first as the bench adds them) and static's floors = caps (`engine_models.static_limits`), and in every
group the engine's own `GroupRunner` (planner, virtualizer, prefill budget, lane grouping, shape
buckets, program lookup, token bookkeeping) as a `SimulatedGroup` (benchmarks/sim/group.py), whose
device calls take the cost model's seconds (benchmarks/sim/costmodel.py).

Time: every group has its own clock (its worker thread, `_GroupWorker`), and the groups run
independently; one global event queue orders request arrivals (the trace's arrival x time_scale),
group steps, request ends and the 0.2 s KV samples, so the engine-wide live-request limit
(`max_live_requests`: one more is rejected, as RESOURCE_EXHAUSTED) sees the other groups' requests
as they are at that moment. A request's tokens are stamped with its group's clock when the step
that reads them returns (the engine streams them then); TTFT is measured from the arrival.
Precompile (`--precompile`, default on for a GPU calibration, as the bench): every one-lane
program of the bucket grid is compiled before the replay (`GroupRunner.bucket_specs`); programs
outside it compile as the engine does (a larger compiled program runs the call meanwhile, or the
call waits), at the calibrated compile seconds. The SLO, as the bench's: each shape alone in
crosspool mode, sent its isolated requests one at a time, simulated the same way.

Results: the bench's results.json keys for each mode (`runner.mode_metrics`), the plots when
matplotlib is there, plus per mode `simulation` (steps, calls, device busy seconds, calls outside
the calibrated ranges, wall seconds of the simulation) and a top-level `calibration` (its name,
file, fitted parameters, notes on what was borrowed, and every source). A prediction, not a
measurement: the numbers are only as good as the calibration named in them.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import heapq
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import runner as bench
from benchmarks.sim.costmodel import DEFAULT_CALIBRATION, CostModel, fit, load_calibration
from benchmarks.sim.group import SimulatedGroup
from benchmarks.workload.presets import PRESETS, model_shape
from benchmarks.workload.stats import summarize
from benchmarks.workload.trace import TraceFormatError
from crosspool_jax.engine import arena_layout, resolve_config, runner_kwargs
from crosspool_jax.engine_models import placement_order, static_limits
from crosspool_jax.errors import CapacityError
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.memory.arena import ArenaBook, placed_weight_bytes
from crosspool_jax.memory.planner import RequestRejected

MODES = bench.MODES


@dataclasses.dataclass(frozen=True)
class SimEngine:
    """One mode's simulated engine: its groups, which group runs each model, and its description."""

    mode: str
    groups: tuple[SimulatedGroup, ...]
    model_group: dict[str, int]
    describe: str


def build_engine(mode: str, models: Sequence[str], setup: bench.BenchSetup, plan: dict[str, Any],
                 platform: str, cost: CostModel, precompile_context: int | None) -> SimEngine:
    """`mode`'s groups holding `models` (added in this order), as `PooledEngine` builds and places
    them for the bench's `EngineConfig`; with `precompile_context`, every group's one-lane bucket
    grid is compiled (`PooledEngine.precompile`'s specs, max_live_requests slots)."""
    cfg = resolve_config(bench._engine_config(setup, plan), platform,
                         1 if mode == "crosspool" else setup.devices)
    layout, wpages = arena_layout(cfg, platform, plan["arena_bytes"])
    kw = runner_kwargs(cfg, platform)
    if mode == "crosspool":
        kv, w = (int(x) for x in setup.crosspool_pools.split("+"))
        books = [ArenaBook(layout, wpages, kv, w)]
        where = f"{kv}+{w} (KV+weights), one group"
    else:
        books = [ArenaBook(layout, wpages, 1, 1, colocated=True) for _ in range(setup.devices)]
        where = f"{setup.devices} colocated devices, one group each"
    groups = tuple(SimulatedGroup(b, layout, cost, **kw) for b in books)
    model_group: dict[str, int] = {}
    for name in models:
        loads = [sum(placed_weight_bytes(g.store, n) for n in g.store.models) for g in groups]
        for gi in placement_order(loads):
            try:
                groups[gi].add_random_model(name, bench.model_config(name))
            except CapacityError:
                if len(groups) == 1:
                    raise
                continue
            model_group[name] = gi
            if mode == "static":
                g = groups[gi]
                g.set_limits(static_limits(list(g.geoms), g.kv.config.total_pages))
            break
        else:
            raise CapacityError(f"model {name} does not fit any device of mode {mode}")
    if precompile_context:
        for g in groups:
            # as the bench: the gate programs first (the replay's `ready_s`), then the grid, which
            # holds them too (`bucket_specs` has every page bucket's top programs)
            for fut in g.gate_compiles():
                fut.exception()
            g.precompile(g.bucket_specs(precompile_context, setup.max_live_requests))
    desc = (f"simulated mode {mode}: {where}, K={cfg.steps_per_call} tokens per host call, host work "
            f"{'overlaps device work' if cfg.overlap else 'not overlapped'}; cost model {cost.name}")
    return SimEngine(mode, groups, model_group, desc)


def _prompt(n: int) -> tuple[int, ...]:
    return (1,) * n  # token values do not matter to the scheduling; the length does


class _Replay:
    """The event loop of `replay`: arrivals, group steps, frees and KV samples in simulated time
    (the groups' clocks; `t0` the replay's start)."""

    def __init__(self, engine: SimEngine, records: list[bench.Record], max_live: int, period: float,
                 t0: float) -> None:
        self.engine, self.groups, self.max_live, self.period, self.t0 = (
            engine, engine.groups, max_live, period, t0)
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.by_id = {r.request_id: r for r in records}
        self.inbox: list[list[bench.Record]] = [[] for _ in self.groups]
        self.scheduled = [False] * len(self.groups)
        self.live = 0
        self.pending_arrivals = len(records)
        self.samples: list[dict[str, Any]] = []
        self.steps = 0
        self.t_end = 0.0
        for rec in records:
            self.push(t0 + rec.arrival_s, "arrive", rec)
        self.push(t0, "sample", None)

    def push(self, t: float, kind: str, payload: Any) -> None:
        heapq.heappush(self.events, (t, self.seq, kind, payload))
        self.seq += 1

    def run(self) -> None:
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self.arrive(t, payload)
            elif kind == "step":
                self.step(payload)
            elif kind == "free":
                self.live -= 1
            else:
                self.sample(t)

    def arrive(self, t: float, rec: bench.Record) -> None:
        """A request sent at `t`: rejected at the live-request limit, else queued for its group
        (whose step is scheduled if it was idle)."""
        self.pending_arrivals -= 1
        rec.sent_s = t - self.t0
        if self.live >= self.max_live:
            rec.outcome = "rejected"
            rec.reason = (f"RESOURCE_EXHAUSTED: the engine holds its maximum of {self.max_live} live "
                          "requests; retry later")
            rec.end_s = t - self.t0
            return
        self.live += 1
        gi = self.engine.model_group[rec.model]
        self.inbox[gi].append(rec)
        if not self.scheduled[gi]:
            g = self.groups[gi]
            g.clock = max(g.clock, t)
            self.scheduled[gi] = True
            self.push(g.clock, "step", gi)

    def step(self, gi: int) -> None:
        """Group `gi` submits its inbox and runs one step; tokens and ends are stamped at the
        group's clock after it."""
        g, t0 = self.groups[gi], self.t0
        self.scheduled[gi] = False
        for rec in self.inbox[gi]:
            try:
                g.submit(rec.request_id, rec.model, _prompt(rec.prompt_len), rec.output_len,
                         SamplingParams())
            except RequestRejected as e:
                rec.outcome, rec.reason, rec.end_s = "rejected", f"ABORTED: rejected: {e}", g.clock - t0
                self.live -= 1
        self.inbox[gi].clear()
        if not g.has_work:
            return
        g.launch()
        res = g.result()
        self.steps += 1
        if not res.calls and g.has_work:  # all held for compiles: the worker waits for one
            g.idle()
        now = g.clock - t0
        for rid, toks in res.tokens.items():
            self.by_id[rid].token_s.extend([now] * len(toks))
        for rid, (reason, _) in res.finished.items():
            rec = self.by_id[rid]
            rec.outcome, rec.reason, rec.end_s = "finished", reason, now
            self.push(now, "free", rid)
            self.t_end = max(self.t_end, now)
        if g.has_work or self.inbox[gi]:
            self.scheduled[gi] = True
            self.push(g.clock, "step", gi)

    def sample(self, t: float) -> None:
        """KV pages in use on every device, preemptions, running and waiting requests at `t`."""
        groups = self.groups
        running = sum(len(g.planner.running()) for g in groups)
        self.samples.append({"t": t - self.t0,
                             "used": [g.kv.config.pages_per_device - g.kv.pages_free(d)
                                      for g in groups for d in range(g.kv.config.num_devices)],
                             "preemptions": sum(g.preemptions for g in groups),
                             "running": running, "waiting": self.live - running})
        if self.pending_arrivals or self.live:
            self.push(t + self.period, "sample", None)


def replay(engine: SimEngine, records: list[bench.Record], max_live: int,
           period: float = bench.STATS_PERIOD_S) -> dict[str, Any]:
    """Replays `records` (arrival_s = when sent) through the engine's groups in simulated time
    (module docstring) and fills them; returns the bench's run dict (samples, preemptions, ...).
    As the bench, the replay starts once every placed model's gate programs are compiled
    (`PooledEngine.wait_warm`; the other warm-ups go on compiling during the replay): every time
    in the records and the run dict counts from then (`t0`, in the groups' clocks)."""
    groups = engine.groups
    for g in groups:
        for fut in g.gate_compiles():
            fut.exception()  # waits: the group's clock moves to the compile's end
    t0 = max(g.clock for g in groups)
    for g in groups:
        g.clock = t0
    rp = _Replay(engine, records, max_live, period, t0)
    rp.run()
    for r in records:
        r.engine_s = list(r.token_s)
        if r.outcome is None:  # the replay drains every accepted request: this is a simulator bug
            r.outcome, r.reason = "failed", "simulation ended with the request live"
    t_end = max([rp.t_end, *(r.end_s or 0.0 for r in records)])
    return _run_dict(groups, rp, t0, t_end)


def _run_dict(groups: list[Any], rp: _Replay, t0: float, t_end: float) -> dict[str, Any]:
    """The bench's run dict of a finished replay (pages after, compiles, calls, busy seconds)."""
    devices = [f"group{gi}/sim:{d}" if len(groups) > 1 else f"sim:{d}"
               for gi, g in enumerate(groups) for d in range(g.kv.config.num_devices)]
    totals = [g.kv.config.pages_per_device for g in groups for d in range(g.kv.config.num_devices)]
    used_after = [g.kv.config.pages_per_device - g.kv.pages_free(d)
                  for g in groups for d in range(g.kv.config.num_devices)]
    blocked = [(e, s) for g in groups for e, s in g.compile_log]
    for g in groups:  # the virtual compile thread's starts up to the end (assigned lazily)
        g.compile_queue.advance(t0 + t_end)
    background = [(f.done_at, f.seconds) for g in groups for f in g.background_futures
                  if not f.cancelled() and f.start is not None]
    return {"t0": 0.0, "t_end": t_end, "samples": rp.samples, "ready_s": round(t0, 3), "clock_t0": t0,
            "pages_after": [[d, u, tot] for d, u, tot in zip(devices, used_after, totals, strict=True)],
            "preemptions": sum(g.preemptions for g in groups), "devices": devices, "pages_total": totals,
            "live_after": rp.live, "build_s": 0.0,
            "serving_blocked_s": sum(g.blocked_compile_seconds for g in groups),
            "serving_blocked_compiles": sum(g.blocked_compiles for g in groups),
            "fallback_calls": sum(g.fallback_calls for g in groups),
            "held_prefill_steps": sum(g.held_prefill_steps for g in groups),
            "compiles": [s for e, s in blocked + background if t0 < e <= t0 + t_end],
            "steps": rp.steps, "calls": sum(g.calls for g in groups),
            "device_busy_s": round(sum(g.busy_seconds for g in groups), 3),
            "outside_calibration": _merge_counts([g.outside for g in groups]),
            "calls_priced": sum(g.calls_priced for g in groups)}


def _merge_counts(ds: Sequence[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def run_sequential(engine: SimEngine, records: list[bench.Record]) -> None:
    """Sends `records` one after another (each when the previous one ended), as the bench's isolated
    reference runs do, and fills them."""
    for rec in records:
        g = engine.groups[engine.model_group[rec.model]]
        rec.arrival_s = rec.sent_s = g.clock
        g.submit(rec.request_id, rec.model, _prompt(rec.prompt_len), rec.output_len, SamplingParams())
        while g.has_work:
            g.launch()
            res = g.result()
            rec.token_s.extend([g.clock] * len(res.tokens.get(rec.request_id, [])))
            if rec.request_id in res.finished:
                rec.outcome, rec.reason, rec.end_s = "finished", res.finished[rec.request_id][0], g.clock
        rec.engine_s = list(rec.token_s)


def simulate_slo(trace: Any, setup: bench.BenchSetup, arena: int, platform: str, cost: CostModel,
                 scale: float, per_bucket: int) -> dict[str, Any]:
    """The bench's SLO rule (`runner.measure_slo`) on simulated isolated runs: each shape alone in
    crosspool mode (no precompile, as the bench's reference runs), its picks one at a time, twice."""
    picks = bench.reference_requests(trace, per_bucket)
    slo: dict[str, Any] = {}
    for shape, buckets in picks.items():
        name = next(m for m in trace.models if model_shape(m) == shape)
        plan = bench.memory_plan("crosspool", [name], setup, arena, platform)
        if not plan["fits"]:
            raise RuntimeError(f"isolated reference of {name}: {plan['why']}")
        eng = build_engine("crosspool", [name], setup, plan, platform, cost, None)
        recs = bench.reference_records(trace, buckets, name)
        run_sequential(eng, recs)
        slo[shape] = bench.slo_of_isolated(buckets, recs, scale)
    return slo


# ---- the run ------------------------------------------------------------------------------------


def _cost_model(args: argparse.Namespace) -> tuple[dict[str, Any], CostModel]:
    """The calibration (--calibration) and its fitted cost model, with any what-if speedups."""
    cal = load_calibration(args.calibration)
    cost = fit(cal)
    for key in ("prefill_attention_speedup", "prefill_dense_speedup", "layer_fixed_speedup"):
        speedup = getattr(args, key, None)
        if speedup is not None:
            if not speedup > 0:
                raise ValueError(f"--{key.replace('_', '-')} must be > 0, got {speedup}")
            cost = dataclasses.replace(cost, **{key: float(speedup)})
    return cal, cost


def _slo(args: argparse.Namespace, trace: Any, setup: bench.BenchSetup, arena: int, platform: str,
         cost: CostModel) -> dict[str, Any]:
    """The SLO per (model shape, prompt bucket) and its rule: from a measured results.json
    (--slo-from), fixed (--slo-ttft-s / --slo-tpot-s), or the bench's rule on simulated isolated
    runs."""
    if getattr(args, "slo_from", None):
        with open(args.slo_from, encoding="utf-8") as f:
            measured_slo = json.load(f)["slo"]
        slo, rule = measured_slo["per_shape"], f"from {args.slo_from}: {measured_slo['rule']}"
    elif args.slo_ttft_s is not None or args.slo_tpot_s is not None:
        if args.slo_ttft_s is None or args.slo_tpot_s is None:
            raise ValueError("--slo-ttft-s and --slo-tpot-s go together")
        per = {"ttft_s": args.slo_ttft_s, "tpot_s": args.slo_tpot_s}
        slo = {model_shape(n): {b: per for b, _, _ in bench.LENGTH_BUCKETS} for n in trace.models}
        rule = f"fixed: TTFT <= {args.slo_ttft_s} s and TPOT <= {args.slo_tpot_s} s"
    else:
        slo = simulate_slo(trace, setup, arena, platform, cost, args.slo_scale, args.reference_requests)
        rule = (f"SLO = {args.slo_scale:g} x the isolated P99 (nearest rank) of TTFT and mean TPOT per "
                "(model shape, prompt bucket), the bench's rule, on simulated isolated runs")
    return {"rule": rule, "scale": args.slo_scale, "per_shape": slo}


def _results_header(args: argparse.Namespace, cal: dict[str, Any], cost: CostModel, trace: Any,
                    setup: bench.BenchSetup, arena: int, order: list[str], plans: dict[str, Any],
                    window: float, precompile_context: int | None) -> dict[str, Any]:
    """The results dict before any mode ran: what was simulated, how, and its notes."""
    platform = cal.get("platform", "gpu")
    results: dict[str, Any] = {
        "benchmark": "crosspool simulate (benchmarks/sim/replay.py): a prediction from the cost model "
                     "named under 'calibration', not a measurement",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": getattr(args, "command_line", None) or " ".join(sys.argv),
        "machine": {"platform": f"simulated {platform}", "device_kind": cal.get("card"),
                    "devices_used": [], "devices_visible": None, "host_cpus": os.cpu_count(),
                    "python": sys.version.split()[0], "jax": None},
        "preset": args.preset, "trace_file": args.trace, "seed": args.seed, "time_scale": args.time_scale,
        "max_duration_s": args.max_duration_s, "replay_window_s": window, "warmup_passes": 0,
        "compile_cache": None,
        "trace": {"requests": len(trace), "models": trace.models, "add_order": order,
                  "duration_s": trace.meta.get("duration_s"), "summary": summarize(trace)},
        "setup": dataclasses.asdict(setup) | {"arena_bytes": arena},
        "memory": plans,
        "precompile_context": precompile_context,
        "calibration": calibration_summary(cal, cost),
        "slo": None,
        "modes": {},
        "notes": [
            "simulated: the engine's own planner, virtualizer and batching (GroupRunner) with device "
            "calls priced by the cost model named under 'calibration'; a prediction, not a measurement",
            "token times are the engine's emission times in simulated seconds (client_clock = "
            "engine_clock: gRPC transport is not modelled); TTFT from the arrival",
            f"tokens are emitted in groups of K = {setup.steps_per_call} per host call, so most gaps "
            "inside a group are 0",
            "rejected = the live-request limit (RESOURCE_EXHAUSTED) or the KV planner (never fits)",
            "goodput = requests meeting both SLOs / replay_window_s (the trace duration x time_scale)",
            "KV pages are sampled every 0.2 s of simulated time, each group as of its last step",
        ],
    }
    if not setup.arena_bytes:
        results["notes"].append(f"arena per device: {arena / 2**30:.1f} GiB assumed (the bench's "
                                "--plan-only assumption for one H200); set --arena-mib to change it")
    return results


def _simulate_mode(args: argparse.Namespace, mode: str, trace: Any, setup: bench.BenchSetup,
                   order: list[str], plan: dict[str, Any], platform: str, cost: CostModel,
                   precompile_context: int | None, slo: dict[str, Any], window: float
                   ) -> tuple[dict[str, Any], list[bench.Record], dict[str, Any]]:
    """One mode's replay: (its metrics as the bench reports them, its records, the run). With
    --out, writes calls_<mode>.jsonl (virtual seconds from the replay's start)."""
    t0 = time.time()
    eng = build_engine(mode, order, setup, plan, platform, cost, precompile_context)
    if args.out:  # calls_<mode>.jsonl as the bench writes it (virtual seconds)
        for g in eng.groups:
            g.call_log = collections.deque(maxlen=bench.CALL_LOG)
    recs = [bench.Record(i, r.request_id, r.model, r.prompt_len, r.output_len,
                         r.arrival_s * args.time_scale) for i, r in enumerate(trace.requests)]
    run = replay(eng, recs, setup.max_live_requests)
    wall = time.time() - t0
    m = bench.mode_metrics(recs, run, slo, window, run["compiles"])
    m["engine"] = eng.describe
    m["weights"] = {n: "simulated (no values)" for n in order}
    m["precompile"] = ({"programs": sum(len(g._programs) for g in eng.groups), "seconds": None,
                        "max_context": precompile_context} if precompile_context else None)
    m["simulation"] = {"steps": run["steps"], "calls": run["calls"],
                       "device_busy_s": run["device_busy_s"], "calls_priced": run["calls_priced"],
                       "calls_outside_calibration": run["outside_calibration"],
                       "placement": {n: eng.model_group[n] for n in order}, "wall_s": round(wall, 2)}
    if args.out:
        t0 = run["clock_t0"]  # the replay's start in the groups' clocks
        calls = sorted(({**dataclasses.asdict(c), "group": gi, "dispatched": c.dispatched - t0,
                         "ready": c.ready - t0} for gi, g in enumerate(eng.groups)
                        for c in g.call_log), key=lambda d: d["dispatched"])
        m["calls"] = bench.call_summary(calls) | {"compile_spans": [
            [gi, round(f.start - t0, 6), round(f.done_at - t0, 6), f.program.spec.decode]
            for gi, g in enumerate(eng.groups) for f in g.background_futures
            if f.start is not None and not f.cancelled() and t0 <= f.done_at <= t0 + run["t_end"]]}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"calls_{mode}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(c) + "\n" for c in calls)
    return m, recs, run


def _write_outputs(args: argparse.Namespace, results: dict[str, Any], cost: CostModel,
                   records: dict[str, list[bench.Record]], runs: dict[str, dict[str, Any]]) -> None:
    """--out (results.json, requests_<mode>.jsonl, plot data and plots) and --json."""
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        files = bench.write_plot_data(args.out, records, runs)
        pngs = bench.write_plots(args.out, records, runs, f"{args.preset} (simulated: {cost.name})")
        for mode, recs in records.items():
            with open(os.path.join(args.out, f"requests_{mode}.jsonl"), "w", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(dataclasses.asdict(r)) + "\n")
        results["files"] = ["results.json", *(f"requests_{m}.jsonl" for m in records),
                            *(f"calls_{m}.jsonl" for m in records), *files, *pngs]
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=bench._json_default)
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=bench._json_default)


def run_simulation(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """The whole simulation (module docstring); returns the results dict (also written to --json
    and --out)."""
    t_start = time.time()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes: unknown {', '.join(bad) or '(none)'}; known: {', '.join(MODES)}")
    cal, cost = _cost_model(args)
    platform = cal.get("platform", "gpu")
    setup = bench.resolve_setup(args)
    if getattr(args, "max_prefill_tokens", None):
        setup = dataclasses.replace(setup, max_prefill_tokens=args.max_prefill_tokens)
    trace = bench.load_trace(args)
    for n in trace.models:
        bench.model_config(n)
    arena = setup.arena_bytes or bench.ASSUMED_GPU_ARENA_BYTES
    arena -= arena % setup.page_bytes
    order = bench.add_order(trace.models)
    plans = {m: bench.memory_plan(m, order, setup, arena, platform) for m in modes}
    for p in plans.values():
        p["never_fit_predicted"] = bench.never_fit(p, trace, setup, platform) if p["fits"] else None
    window = float(trace.meta.get("duration_s", trace.requests[-1].arrival_s)) * args.time_scale
    pre_on = args.precompile == "on" or (args.precompile == "auto" and platform == "gpu")
    precompile_context = max(r.prompt_len + r.output_len for r in trace.requests) if pre_on else None
    results = _results_header(args, cal, cost, trace, setup, arena, order, plans, window,
                              precompile_context)
    unfit = {m: p["why"] for m, p in plans.items() if not p["fits"]}
    for m, why in unfit.items():
        results["modes"][m] = {"error": f"the preset's models do not fit: {why}"}
    results["slo"] = _slo(args, trace, setup, arena, platform, cost)
    records: dict[str, list[bench.Record]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if mode in unfit:
            continue
        m, recs, run = _simulate_mode(args, mode, trace, setup, order, plans[mode], platform, cost,
                                      precompile_context, results["slo"]["per_shape"], window)
        results["modes"][mode] = m
        records[mode], runs[mode] = recs, run
        log(f"simulate {mode}: {len(recs)} requests in {m['simulation']['wall_s']:.1f} s of wall time "
            f"({run['steps']} steps): TTFT P99 {bench._fmt_ms(m['ttft_s']['p99'])} ms, TBT P99 "
            f"{bench._fmt_ms(m['tbt_s']['p99'])} ms, goodput {m['goodput_rps']:.3f} req/s, "
            f"{m['rejected']} rejected, {m['preemptions']} preemptions")
    results["simulator"] = {"wall_s": round(time.time() - t_start, 2)}
    if getattr(args, "compare", None):
        from benchmarks.sim.validate import compare

        with open(args.compare, encoding="utf-8") as f:
            results["comparison"] = {"measured": args.compare, "modes": compare(results, json.load(f))}
    _write_outputs(args, results, cost, records, runs)
    return results


def calibration_summary(cal: dict[str, Any], cost: CostModel) -> dict[str, Any]:
    """What the results say of the calibration: name, file, card, date, fitted parameters, ranges,
    notes (what was borrowed) and every source."""
    return {"name": cost.name, "file": cal.get("path"), "based_on": cal.get("based_on"),
            "card": cal.get("card"), "date": cal.get("date"), "platform": cal.get("platform"),
            "params": {t: dataclasses.asdict(p) for t, p in cost.params.items()},
            "bandwidth_bytes_per_s": cost.bandwidth, "compile_s": cost.compile_s,
            "host_launch_s_per_call": cost.host_launch_s, "ranges": dataclasses.asdict(cost.ranges),
            "notes": list(cost.notes), "sources": list(cost.sources),
            "prefill_attention_speedup": cost.prefill_attention_speedup,
            "prefill_dense_speedup": cost.prefill_dense_speedup,
            "layer_fixed_speedup": cost.layer_fixed_speedup}


def format_table(results: dict[str, Any]) -> str:
    """The bench's table (`runner.format_table`) headed by the calibration it predicts from."""
    c = results["calibration"]
    head = (f"PREDICTED by crosspool simulate from calibration {c['name']} ({c['card']}, {c['date']}); "
            "not a measurement")
    outside = {m: v["simulation"]["calls_outside_calibration"] for m, v in results["modes"].items()
               if "simulation" in v and v["simulation"]["calls_outside_calibration"]}
    tail = ""
    if outside:
        tail = "\nextrapolated (calls outside the calibrated ranges): " + "; ".join(
            f"{m}: " + ", ".join(f"{k} {n}" for k, n in sorted(o.items())) for m, o in outside.items())
    return head + "\n" + bench.format_table(results) + tail


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The simulate flags (shared by `crosspool simulate` and `python -m benchmarks.sim.replay`)."""
    p.add_argument("--preset", required=True, metavar="NAME",
                   help=f"workload preset (its setup: devices, pools, arena): {', '.join(PRESETS)}")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="replay this trace instead of the preset's: the project's JSONL, a Mooncake JSONL "
                        "or an Azure CSV (raw traces get the preset's models by its popularity rule)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated (default: all three)")
    p.add_argument("--calibration", default=None, metavar="FILE.json",
                   help=f"cost-model calibration (default: {os.path.relpath(DEFAULT_CALIBRATION)}); "
                        "benchmarks/calibrate.py writes one")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results here")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write results.json, requests_<mode>.jsonl and the plots here")
    p.add_argument("--seed", type=int, default=0, help="trace seed (default 0)")
    p.add_argument("--time-scale", type=float, default=1.0, metavar="X",
                   help="request i is sent at arrival_s * X (default 1)")
    p.add_argument("--max-duration-s", type=float, default=None, metavar="S",
                   help="keep only the requests arriving in the trace's first S seconds")
    p.add_argument("--precompile", choices=("auto", "on", "off"), default="auto",
                   help="the bucket grid compiled before the replay (auto: on for a GPU calibration, as "
                        "the bench)")
    p.add_argument("--slo-scale", type=float, default=5.0, help="SLO = this x the isolated P99 (default 5)")
    p.add_argument("--reference-requests", type=int, default=3, metavar="N",
                   help="isolated requests per (shape, prompt bucket) for the SLO (1-3, default 3)")
    p.add_argument("--slo-from", default=None, metavar="RESULTS.json",
                   help="take the SLO of this results.json (a measured bench run of the same trace)")
    p.add_argument("--compare", default=None, metavar="RESULTS.json",
                   help="compare the prediction with this measured bench results.json of the same trace "
                        "(per mode and metric; benchmarks/sim/validate.py)")
    p.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                   help="what-if: the engine's prefill tokens per step per group (default: the preset's)")
    p.add_argument("--prefill-share", type=float, default=None, metavar="F",
                   help="what-if: the engine's prefill_share (default: the engine's, 0.8)")
    p.add_argument("--slo-ttft-s", type=float, default=None, help="fixed TTFT SLO (skips the isolated runs)")
    p.add_argument("--slo-tpot-s", type=float, default=None, help="fixed TPOT SLO (with --slo-ttft-s)")
    g = p.add_argument_group("setup overrides (default: the preset's)")
    g.add_argument("--devices", type=int, default=None, help="devices used by every mode")
    g.add_argument("--pools", default=None, metavar="KV+W", help="crosspool split of those devices")
    g.add_argument("--arena-mib", type=float, default=None, help="arena per device (MiB), every mode")
    g.add_argument("--max-live-requests", type=int, default=None, metavar="N")
    g.add_argument("--steps-per-call", type=int, default=None, metavar="K")
    g.add_argument("--mixed-steps", action="store_true",
                   help="what-if: the engine's mixed_steps (decode rows inside their lane's prefill call)")
    from serving.cli import add_admission_flags

    add_admission_flags(g)
    g.add_argument("--compile-workers", type=int, default=None, metavar="N",
                   help="what-if: the engine's compile_workers (background compiles at once; each "
                        "takes the calibrated seconds)")
    g.add_argument("--prefill-attention-speedup", type=float, default=None, metavar="X",
                   help="what-if: prefill attention X times faster than calibrated (its FLOPs priced "
                        "at X times the fitted rate), e.g. another attention kernel")
    g.add_argument("--prefill-dense-speedup", type=float, default=None, metavar="Y",
                   help="what-if: a prefill call's other FLOPs (projections, experts) Y times faster "
                        "than calibrated, e.g. a higher model-FLOP utilisation")
    g.add_argument("--layer-fixed-speedup", type=float, default=None, metavar="Z",
                   help="what-if: the fitted fixed cost per layer (launches, small kernels: what a "
                        "call costs whatever it holds) Z times smaller, in decode and prefill calls")


def main_args(args: argparse.Namespace) -> int:
    """Runs the simulation from parsed flags; prints the table on stdout."""
    if args.preset not in PRESETS and not args.trace:
        raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    if not 1 <= args.reference_requests <= 3:
        raise ValueError("--reference-requests must be 1, 2 or 3")
    if args.time_scale <= 0 or not math.isfinite(args.time_scale):
        raise ValueError("--time-scale must be > 0")
    res = run_simulation(args, lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(res))
    if "comparison" in res:
        from benchmarks.sim.validate import format_comparison

        print(f"\npredicted vs measured ({res['comparison']['measured']}):")
        print(format_comparison(res["comparison"]["modes"]))
    for path in (args.json, args.out and os.path.join(args.out, "results.json")):
        if path:
            print(f"results: {path}")
    lost = {m: v["lost"] for m, v in res["modes"].items() if v.get("lost")}
    failed = {m: v["error"] for m, v in res["modes"].items() if "error" in v}
    if failed:
        print(f"modes not simulated: {failed}", file=sys.stderr)
    return 1 if lost or failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sim.replay", description=__doc__.split("\n")[0])
    add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.command_line = " ".join(["python -m benchmarks.sim.replay", *argv])
    try:
        return main_args(args)
    except (ValueError, RuntimeError, TraceFormatError, OSError) as e:
        print(f"simulate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
