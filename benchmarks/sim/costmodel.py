"""The simulator's cost model: seconds of one step-program call, fitted from measured calls.

A calibration (JSON, `load_calibration`; written by `benchmarks/calibrate.py`, or the default
`benchmarks/calibrations/h200_docs_2026-12-03.json` built from numbers in docs/benchmarks.md) holds
measured points, each with its card, date and source:

- decode points: seconds per decode step of a call of K steps, `batch` requests of one model (or
  `groups` models of one class, batch split evenly) with `context` tokens of KV each, on a
  `colocated` device or a `split` KV+weights group;
- prefill points: seconds (or tokens/s) of prefill calls of `tokens` prompt tokens at `context`
  tokens of KV already written, or a whole request prefilled in chunks;
- compile points (seconds per step program, decode and prefill), host launch seconds per call
  (planning, inputs, dispatch), transfer rates (host <-> device, device <-> device).

The model (per topology kind, "colocated" or "split"), from the shapes of the models in the call:

    decode call  = K x (layers x a + f x bytes / BW)
    prefill call = layers x a + f x bytes / BW + flops / F

`bytes` is what a step must read (benchmarks/step.py's roofline): on the KV side the attention
weights and LM head of each model in the lane (replicated, read in parallel on every KV device) and
the KV of the busiest KV device; on the weights side the routed experts the call's tokens touch
(E x (1 - (1 - k/E)^tokens) per MoE layer, for uniform routing) and the shared / dense FFN, both
split over the weights devices, and the routers. `flops` likewise: attention projections,
attention over the context and the LM head on the KV side (busiest device), experts and shared /
dense FFN over the weights devices. BW is the copy bandwidth measured with the points. a (seconds
of fixed cost per layer: launches, collectives) and f (bytes efficiency) are least squares over the
decode points, F (effective FLOP/s) over the prefill points given a and f. A topology without
points of its own borrows the other's parameters, and says so (`CostModel.notes`).

Everything is plain Python (no JAX tracing); a model's per-token constants come from
`crosspool_jax.models.costs` (its shapes alone).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from crosspool_jax.models.costs import ModelCosts

CALIBRATION_FORMAT = "crosspool-calibration"
CALIBRATION_VERSION = 1
TOPOLOGIES = ("colocated", "split")
DEFAULT_CALIBRATION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "calibrations", "h200_docs_2026-12-03.json")


# ---- one call's work ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SlotWork:
    """One request's part of a call: `tokens` query tokens (decode: 1 per step) at `context` tokens
    of KV before them, on KV device `device`; `extra` holds (device, tokens) of its older KV
    segments on other KV devices (split-KV), read by attention there."""

    model: str
    device: int
    tokens: int
    context: int
    samples: bool = True
    extra: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class Work:
    """What one lane group (one program call of a model class) computes: bytes read per step (or per
    prefill call) and flops, both as the busiest device of each pool sees them (module docstring)."""

    layers: int
    bytes: float
    flops: float
    slots_per_device: int  # most slots on one KV device (the calibrated "batch")
    max_context: int  # longest context of a slot (tokens)
    tokens: int  # query tokens of the call (prefill), or slots (decode)
    attention_flops: float = 0.0  # of `flops`: attention over the context on the busiest KV device


def lane_work(slots: Sequence[SlotWork], costs: dict[str, ModelCosts], num_kv: int, num_weights: int,
              decode: bool) -> Work:
    """`Work` of one lane group's call. Decode: per step (every slot one token at its context);
    prefill: the whole chunk of each slot."""
    by_model: dict[str, int] = {}
    kv_tokens = [0.0] * num_kv
    kv_flops = [0.0] * num_kv
    attn_flops = [0.0] * num_kv  # the part of kv_flops that is attention over the context
    per_dev = [0] * num_kv
    for s in slots:
        c = costs[s.model]
        q = 1 if decode else s.tokens
        by_model[s.model] = by_model.get(s.model, 0) + q
        ctx = s.context + (0 if decode else (s.tokens + 1) / 2)  # mean context a query row sees
        kv_tokens[s.device] += s.context + (0 if decode else s.tokens)
        kv_flops[s.device] += q * (c.kv_flops_per_token + c.attn_flops_per_pair * ctx)
        attn_flops[s.device] += q * c.attn_flops_per_pair * ctx
        kv_flops[s.device] += c.lm_head_flops if s.samples else 0.0
        per_dev[s.device] += 1
        for d, t in s.extra:  # older segments: attention reads them on their own device
            kv_tokens[d] += t
            kv_flops[d] += q * c.attn_flops_per_pair * t
            attn_flops[d] += q * c.attn_flops_per_pair * t
    kvb = max(costs[m].kv_bytes_per_token for m in by_model)
    kv_side = sum(costs[m].attn_bytes + costs[m].lm_head_bytes + q * costs[m].embed_row_bytes
                  for m, q in by_model.items())
    kv_side += max(kv_tokens) * kvb
    w_side = sum((costs[m].experts_touched_bytes(q) + costs[m].shared_dense_bytes) / num_weights
                 + costs[m].router_bytes for m, q in by_model.items())
    w_flops = sum(q * costs[m].w_flops_per_token for m, q in by_model.items()) / num_weights
    layers = max(costs[m].layers for m in by_model)
    busiest = int(np.argmax(kv_flops))
    return Work(layers, kv_side + w_side, kv_flops[busiest] + w_flops, max(per_dev),
                max(s.context + (0 if decode else s.tokens) for s in slots),
                sum(1 if decode else s.tokens for s in slots), attn_flops[busiest])


# ---- calibration ----------------------------------------------------------------------------------


class CalibrationError(ValueError):
    """A calibration file that cannot be read or fitted."""


def load_calibration(path: str | None = None) -> dict[str, Any]:
    """The calibration JSON at `path` (default: `DEFAULT_CALIBRATION`); a file that names a `base`
    calibration (next to it, else among the checked-in calibrations) gets the base's points for
    what it does not measure (per kind of point and topology), each point keeping its own source."""
    path = path or DEFAULT_CALIBRATION
    with open(path, encoding="utf-8") as f:
        cal = json.load(f)
    if cal.get("format") != CALIBRATION_FORMAT or cal.get("version") != CALIBRATION_VERSION:
        raise CalibrationError(f"{path}: not a {CALIBRATION_FORMAT} v{CALIBRATION_VERSION} file")
    cal["path"] = os.path.relpath(path)
    base = cal.get("base")
    if base:
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):  # a fresh file written elsewhere ($OUT): the checked-in one
            base_path = os.path.join(os.path.dirname(DEFAULT_CALIBRATION), base)
        b = load_calibration(base_path)
        for key in ("decode_points", "prefill_points"):
            have = {p["topology"] for p in cal.get(key, [])}
            cal[key] = cal.get(key, []) + [p for p in b.get(key, []) if p["topology"] not in have]
        if not cal.get("compile_points"):
            cal["compile_points"] = b.get("compile_points", [])
        for key in ("host", "transfers", "copy_bandwidth"):
            merged = dict(b.get(key) or {})
            merged.update({k: v for k, v in (cal.get(key) or {}).items() if v is not None})
            cal[key] = merged
        cal["based_on"] = b["path"]
    return cal


@dataclasses.dataclass(frozen=True)
class TopologyParams:
    """Fitted parameters of one topology kind: a (seconds per layer per call or step), f (bytes
    efficiency: time / bandwidth time), flops_per_s (F, effective), and where they came from."""

    a: float
    f: float
    flops_per_s: float
    decode_points: int
    prefill_points: int
    borrowed: str = ""  # "": fitted on this topology's points; else which parameters came from where


@dataclasses.dataclass(frozen=True)
class Ranges:
    """What the calibration measured (outside: extrapolated): decode batch (slots per KV device) and
    context, prefill tokens per call and context, and the model shapes."""

    decode_batch: tuple[int, int]
    decode_context: tuple[int, int]
    prefill_tokens: tuple[int, int]
    prefill_context: tuple[int, int]
    models: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Padding:
    """What a call run in a larger compiled program (the engine's fallback while its own compiles)
    costs beyond its own work: seconds per padded decode slot per step and per padded prefill
    query row, fitted by `benchmarks/sim/from_calls.py` on a replay's fallback calls (0: the
    calibration has none; such calls are then priced by their own work alone)."""

    decode_s_per_slot_step: float
    prefill_s_per_token: float
    source: str


def padding_of(cal: dict[str, Any]) -> Padding:
    """The calibration's `padding` entry (zeros when it has none)."""
    p = cal.get("padding") or {}
    return Padding(float(p.get("decode_s_per_slot_step", 0.0)), float(p.get("prefill_s_per_token", 0.0)),
                   str(p.get("source", "")))


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds of step-program calls (module docstring). `params` per topology kind."""

    name: str
    bandwidth: float  # bytes/s, the copy bandwidth measured with the points
    params: dict[str, TopologyParams]
    compile_s: dict[str, float]  # "decode" / "prefill": seconds per program
    host_launch_s: float  # host seconds per call (plan, inputs, dispatch)
    transfers: dict[str, float | None]
    ranges: Ranges
    notes: tuple[str, ...]
    sources: tuple[str, ...]
    # seconds per padded row of a call run in a larger program than its own (`Padding`)
    padding: Padding = dataclasses.field(default_factory=lambda: Padding(0.0, 0.0, ""))
    # what-ifs (`crosspool simulate --prefill-attention-speedup X --prefill-dense-speedup Y`): a
    # prefill call's attention FLOPs priced at X times the fitted rate, its other FLOPs at Y times
    # (1: as calibrated)
    prefill_attention_speedup: float = 1.0
    prefill_dense_speedup: float = 1.0
    # what-if (`--layer-fixed-speedup Z`): the fitted fixed seconds per layer (`a`: what the fit
    # charges every call per layer whatever it holds) divided by Z, in decode and prefill calls
    layer_fixed_speedup: float = 1.0

    def decode_s(self, topology: str, work: Work, steps: int, padded_slots: int = 0) -> float:
        """A decode call of `steps` steps; `padded_slots`: slots of its program beyond its own
        requests (per KV device), each priced at `padding.decode_s_per_slot_step` per step."""
        p = self.params[topology]
        return steps * (work.layers * p.a / self.layer_fixed_speedup + p.f * work.bytes / self.bandwidth
                        + padded_slots * self.padding.decode_s_per_slot_step)

    def padded_prefill_s(self, padded_tokens: int) -> float:
        """What `padded_tokens` query rows of a prefill program beyond the call's own tokens add."""
        return padded_tokens * self.padding.prefill_s_per_token

    def prefill_s(self, topology: str, work: Work) -> float:
        p = self.params[topology]
        flops = (work.attention_flops / self.prefill_attention_speedup
                 + (work.flops - work.attention_flops) / self.prefill_dense_speedup)
        return (work.layers * p.a / self.layer_fixed_speedup + p.f * work.bytes / self.bandwidth
                + flops / p.flops_per_s)

    def outside(self, work: Work, decode: bool, model_shapes: Sequence[str]) -> list[str]:
        """Which calibrated ranges this call leaves ([]: inside all)."""
        r = self.ranges
        out = []
        if decode:
            if not r.decode_batch[0] <= work.slots_per_device <= r.decode_batch[1]:
                out.append("decode_batch")
            if work.max_context > r.decode_context[1]:
                out.append("decode_context")
        else:
            if not r.prefill_tokens[0] <= work.tokens <= r.prefill_tokens[1]:
                out.append("prefill_tokens")
            if work.max_context > r.prefill_context[1]:
                out.append("prefill_context")
        if any(m not in r.models for m in model_shapes):
            out.append("model_shape")
        return out


def _point_work(p: dict[str, Any], decode: bool) -> list[Work]:
    """The calls a calibration point measured, as `Work` (one model class; colocated or 1+1)."""
    from benchmarks.sim.shapes import costs_for

    c = costs_for(p["model"], p.get("dtype", "bfloat16"), int(p.get("page_bytes", 262144)),
                  p.get("platform", "gpu"))
    costs = {"m": c}
    g = int(p.get("groups", 1))
    if g > 1:  # G models of one class, batch split evenly: same constants, distinct names
        costs = {f"m{i}": c for i in range(g)}
    names = list(costs)
    if decode:
        b = int(p["batch"])
        slots = [SlotWork(names[i % g], 0, 1, int(p["context"])) for i in range(b)]
        return [lane_work(slots, costs, 1, 1, True)]
    calls = p.get("calls") or [[int(p["tokens"]), int(p.get("context", 0))]]
    return [lane_work([SlotWork("m", 0, t, ctx, samples=i == len(calls) - 1)], costs, 1, 1, False)
            for i, (t, ctx) in enumerate(calls)]


def fit(cal: dict[str, Any]) -> CostModel:
    """The `CostModel` of a calibration (module docstring: what is fitted on what)."""
    bw = float(cal["copy_bandwidth"]["bytes_per_s"])
    params: dict[str, TopologyParams] = {}
    notes: list[str] = []
    def fitted_points(key: str, t: str) -> list[dict[str, Any]]:
        return [p for p in cal.get(key, []) if p["topology"] == t and p.get("use", "fit") == "fit"]

    dec = {t: fitted_points("decode_points", t) for t in TOPOLOGIES}
    pre = {t: fitted_points("prefill_points", t) for t in TOPOLOGIES}
    fitted: dict[str, tuple[float, float]] = {}
    for t in TOPOLOGIES:
        if not dec[t]:
            continue
        rows, y = [], []
        for p in dec[t]:
            (w,) = _point_work(p, True)
            rows.append([w.layers, w.bytes / float(p.get("copy_bandwidth_bytes_per_s", bw))])
            y.append(float(p["s_per_step"]))
        fitted[t] = _nonneg_lstsq(np.array(rows), np.array(y))
    if not fitted:
        raise CalibrationError("the calibration has no decode points to fit")
    flops: dict[str, float] = {}
    for t in TOPOLOGIES:
        a, f = fitted.get(t) or fitted[next(iter(fitted))]
        num = den = 0.0
        for p in pre[t]:
            works = _point_work(p, False)
            seconds = (float(p["seconds"]) if "seconds" in p
                       else sum(w.tokens for w in works) / float(p["tokens_per_s"]))
            fl = sum(w.flops for w in works)
            rest = seconds - sum(w.layers * a + f * w.bytes / bw for w in works)
            num += fl * rest
            den += fl * fl
        if den and num > 0:
            flops[t] = den / num  # least squares of seconds = flops x (1 / F)
    if not flops:
        raise CalibrationError("the calibration has no prefill points to fit")
    for t in TOPOLOGIES:
        borrowed = []
        if t in fitted:
            a, f = fitted[t]
        else:
            src = next(iter(fitted))
            a, f = fitted[src]
            borrowed.append(f"a, f from {src}")
        if t in flops:
            fl = flops[t]
        else:
            src = next(iter(flops))
            fl = flops[src]
            borrowed.append(f"F from {src}")
        params[t] = TopologyParams(a, f, fl, len(dec[t]), len(pre[t]), "; ".join(borrowed))
        if borrowed:
            notes.append(f"{t}: no measured points for {', '.join(borrowed)} (assumed equal)")
    comp: dict[str, float] = {}
    for kind in ("decode", "prefill"):
        xs = [float(p["seconds"]) for p in cal.get("compile_points", []) if p["kind"] == kind]
        if not xs:
            raise CalibrationError(f"the calibration has no {kind} compile points")
        comp[kind] = float(np.median(xs))
    host = cal.get("host") or {}
    if host.get("launch_s_per_call") is None:
        raise CalibrationError("the calibration has no host launch time per call")
    all_dec = [p for ps in dec.values() for p in ps]
    all_pre = [p for ps in pre.values() for p in ps]
    pre_calls = [c for p in all_pre for c in (p.get("calls") or [[p["tokens"], p.get("context", 0)]])]
    ranges = Ranges(
        decode_batch=(min(int(p["batch"]) // int(p.get("groups", 1)) or 1 for p in all_dec),
                      max(int(p["batch"]) for p in all_dec)),
        decode_context=(min(int(p["context"]) for p in all_dec), max(int(p["context"]) for p in all_dec)),
        prefill_tokens=(min(int(t) for t, _ in pre_calls), max(int(t) for t, _ in pre_calls)),
        prefill_context=(0, max(int(t) + int(c) for t, c in pre_calls)),
        models=tuple(sorted({_shape_of(p["model"]) for p in all_dec + all_pre})))
    sources = sorted({p.get("source", "") for p in (*all_dec, *all_pre, *cal.get("compile_points", []))}
                     | {str(host.get("source", "")), str(cal["copy_bandwidth"].get("source", ""))} - {""})
    return CostModel(cal.get("name", cal.get("path", "?")), bw, params, comp,
                     float(host["launch_s_per_call"]), dict(cal.get("transfers") or {}), ranges,
                     tuple(notes), tuple(sources), padding_of(cal))


def _shape_of(model: str) -> str:
    from benchmarks.workload.presets import model_shape

    return model_shape(model)


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares y ~ x @ (a, f) with a >= 0 and f >= 0: unconstrained first; a parameter that
    comes out negative is set to 0 and the other refitted alone (timing noise on a machine whose
    calls are all fixed cost, e.g. a CPU, can make the bytes term negative)."""
    sol, *_ = np.linalg.lstsq(x, y, rcond=None)
    a, f = float(sol[0]), float(sol[1])
    if a < 0 or not math.isfinite(a):
        a, f = 0.0, float(np.dot(x[:, 1], y) / np.dot(x[:, 1], x[:, 1]))
    if f < 0 or not math.isfinite(f):
        a, f = float(np.dot(x[:, 0], y) / np.dot(x[:, 0], x[:, 0])), 0.0
    if a <= 0 and f <= 0:
        raise CalibrationError("the decode points fit no positive cost")
    return a, f
