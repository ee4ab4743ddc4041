"""A calibration whose colocated points are a measured run's own program calls.

    PYTHONPATH=. python -m benchmarks.sim.from_calls --calls RUN/calls_static.jsonl.gz \\
        --results RUN/results.json --model olmoe-1b-7b-00 \\
        --base benchmarks/calibrations/h200_calibrate_2026-12-04.json --json OUT.json

`benchmarks/calibrate.py` times isolated prefill chunks (one request, one model, short contexts);
a replay's prefill calls are what the engine really ran: several requests and models per call,
deep contexts, the programs the step picked. `crosspool bench` logs every call
(`calls_<mode>.jsonl`, `GroupRunner.call_log`); each uncompiled prefill call whose device time
was seen becomes a point of `tokens` prompt tokens at the context that gives the call's measured
attention FLOPs (pairs = tokens x context + tokens x (tokens + 1) / 2, `models.costs`), with its
measured seconds. Decode calls (records with `requests` and `kv_tokens`, since 2026-12-04) that
ran their own program become decode points: `requests` slots at their mean context, spread over
`models` models (the record's, else at most `--decode-models`), seconds per step = the call's
device seconds / K. Calls that ran in a larger program give the padding prices
(`padding_fit`). With `--results`, the run's background compiles (`calls.compile_spans`: as long
as they took while serving, i.e. under the step loop's load) are the compile points. Everything
else (host, transfer points; the split topology's points) is the base calibration's. The file
names the run it came from in every point. A replay run cold compiles all along (the spans cover
most of it), so its points price calls under that load, as the replays they are checked against.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from typing import Any

from benchmarks.sim.shapes import costs_for


def read_calls(path: str) -> list[dict[str, Any]]:
    """The records of a calls_<mode>.jsonl (or .jsonl.gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _prefill_context(c: dict[str, Any], costs: Any) -> int:
    """The context (tokens of KV before it) at which a prefill call of `prefill_tokens` tokens has
    the record's attention FLOPs: pairs = t x context + t x (t + 1) / 2."""
    t = int(c["prefill_tokens"])
    pairs = float(c["attention_flops"]) / costs.attn_flops_per_pair
    return max(0, round(pairs / t - (t + 1) / 2))


def _decode_shape(c: dict[str, Any], max_models: int) -> tuple[int, int, int] | None:
    """(requests, mean context, models) of a decode call record; None when it lacks `requests` /
    `kv_tokens` (records from before 2026-12-04). Models: the record's, else at most `max_models`."""
    n = int(c.get("requests") or 0)
    if n <= 0 or "kv_tokens" not in c:
        return None
    return n, max(1, round(int(c["kv_tokens"]) / n)), int(c.get("models") or min(n, max_models))


def call_points(calls: list[dict[str, Any]], model: str, page_bytes: int, source: str,
                card: str, date: str) -> list[dict[str, Any]]:
    """Colocated prefill points (module docstring) from call records; decode calls, calls that
    compiled or ran in a larger program, and calls without a measured time are left out."""
    costs = costs_for(model, "bfloat16", page_bytes, "gpu")
    out = []
    for c in calls:
        t = int(c["prefill_tokens"])
        if c["decode"] or c["compiled"] or c["busy"] is None or t <= 0:
            continue
        context = _prefill_context(c, costs)
        out.append({"topology": "colocated", "model": model, "dtype": "bfloat16", "page_bytes": page_bytes,
                    "platform": "gpu", "card": card, "date": date, "source": source,
                    "tokens": t, "context": context, "seconds": float(c["busy"])})
    return out


def decode_points(calls: list[dict[str, Any]], model: str, page_bytes: int, source: str, card: str,
                  date: str, steps_per_call: int, max_models: int) -> list[dict[str, Any]]:
    """Colocated decode points (module docstring) from call records that carry `requests` and
    `kv_tokens`; prefill calls, calls that compiled or ran in a larger program and calls without
    a measured time are left out."""
    out = []
    for c in calls:
        shape = _decode_shape(c, max_models) if c["decode"] else None
        if shape is None or c["compiled"] or c["busy"] is None:
            continue
        n, context, models = shape
        out.append({"topology": "colocated", "model": model, "dtype": "bfloat16", "page_bytes": page_bytes,
                    "platform": "gpu", "card": card, "date": date, "source": source, "batch": n,
                    "context": context, "groups": models,
                    "steps_per_call": steps_per_call, "s_per_step": float(c["busy"]) / steps_per_call})
    return out


def _lane_rows(lanes: str, decode: bool) -> int:
    """Slots (decode) or query tokens (prefill) per KV device of a call's programs, from its
    `lanes` description ("[G4 B32 T32 P1024]", lanes joined by " + ")."""
    key = "B" if decode else "T"
    return sum(int(tok[1:]) for lane in lanes.split(" + ") for tok in lane.strip("[]").split()
               if tok.startswith(key))


def padding_fit(calls: list[dict[str, Any]], cal: dict[str, Any], model: str, page_bytes: int,
                steps_per_call: int, max_models: int, source: str) -> dict[str, Any]:
    """Seconds per padded row (`costmodel.Padding`): over the calls that ran in a larger program
    (`compiled`; decode ones need `requests` and `kv_tokens`), least squares through 0 of (the
    call's device seconds - the cost model's price of its own work) against its padded rows."""
    from benchmarks.sim.costmodel import _point_work, fit

    cost = fit(cal)
    costs = costs_for(model, "bfloat16", page_bytes, "gpu")
    sums = {True: [0.0, 0.0, 0], False: [0.0, 0.0, 0]}  # decode?: [sum res x pad, sum pad^2, calls]
    for c in calls:
        if not c["compiled"] or c["busy"] is None:
            continue
        if c["decode"]:
            shape = _decode_shape(c, max_models)
            if shape is None:
                continue
            n, context, models = shape
            (w,) = _point_work({"model": model, "page_bytes": page_bytes, "batch": n, "context": context,
                                "groups": models}, True)
            own = cost.decode_s("colocated", w, steps_per_call)
            pad = (_lane_rows(c["lanes"], True) - n) * steps_per_call
        else:
            t = int(c["prefill_tokens"])
            if t <= 0:
                continue
            point = {"model": model, "page_bytes": page_bytes, "tokens": t,
                     "context": _prefill_context(c, costs)}
            own = sum(cost.prefill_s("colocated", w) for w in _point_work(point, False))
            pad = _lane_rows(c["lanes"], False) - t
        if pad > 0:
            acc = sums[bool(c["decode"])]
            acc[0] += (float(c["busy"]) - own) * pad
            acc[1] += pad * pad
            acc[2] += 1
    dec, pre = sums[True], sums[False]
    return {"decode_s_per_slot_step": max(0.0, dec[0] / dec[1]) if dec[1] else 0.0,
            "prefill_s_per_token": max(0.0, pre[0] / pre[1]) if pre[1] else 0.0,
            "decode_calls": dec[2], "prefill_calls": pre[2], "source": source}


def compile_points(results: dict[str, Any], model: str, source: str, card: str,
                   date: str) -> list[dict[str, Any]]:
    """Compile points: each background compile of the run (`calls.compile_spans` of every mode in
    a bench's results.json), its seconds as measured while the engine served."""
    out = []
    for m in results.get("modes", {}).values():
        for _, start, end, decode in (m.get("calls") or {}).get("compile_spans", []):
            out.append({"topology": "colocated", "model": model, "platform": "gpu", "card": card,
                        "date": date, "source": source, "kind": "decode" if decode else "prefill",
                        "seconds": float(end) - float(start)})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", required=True, metavar="FILE", help="a calls_<mode>.jsonl(.gz)")
    ap.add_argument("--model", required=True, help="the trace model whose shapes price the calls")
    ap.add_argument("--base", required=True, metavar="CAL.json")
    ap.add_argument("--card", default="NVIDIA H200", help="the card the run was measured on")
    ap.add_argument("--date", required=True, help="the date the run was measured (YYYY-MM-DD)")
    ap.add_argument("--page-bytes", type=int, default=262144)
    ap.add_argument("--results", default=None, metavar="RUN/results.json",
                    help="the run's results.json: its background compiles become the compile points")
    ap.add_argument("--steps-per-call", type=int, default=4, help="K of the run's decode calls (GPU: 4)")
    ap.add_argument("--decode-models", type=int, default=1,
                    help="the most models one decode call's requests spread over, for records that do "
                         "not say (the trace's live models)")
    ap.add_argument("--name", default=None, help="the calibration's name (default: from the file)")
    ap.add_argument("--json", required=True, metavar="OUT.json")
    args = ap.parse_args(argv)
    with open(args.base, encoding="utf-8") as f:
        cal = json.load(f)
    calls = read_calls(args.calls)
    points = call_points(calls, args.model, args.page_bytes, args.calls, args.card, args.date)
    if not points:
        raise SystemExit(f"{args.calls}: no measured uncompiled prefill call")
    others = [p for p in cal.get("prefill_points", []) if p["topology"] != "colocated"]
    cal["prefill_points"] = points + others
    dec = decode_points(calls, args.model, args.page_bytes, args.calls, args.card, args.date,
                        args.steps_per_call, args.decode_models)
    if dec:
        cal["decode_points"] = dec + [p for p in cal.get("decode_points", []) if p["topology"] != "colocated"]
    comp: list[dict[str, Any]] = []
    if args.results:
        with open(args.results, encoding="utf-8") as f:
            comp = compile_points(json.load(f), args.model, args.results, args.card, args.date)
        kinds = {p["kind"] for p in comp}
        if kinds != {"decode", "prefill"}:
            raise SystemExit(f"{args.results}: no background compile spans of both kinds (got "
                             f"{sorted(kinds) or 'none'}; a bench from before 2026-12-04 has none)")
        cal["compile_points"] = comp
    cal["padding"] = padding_fit(calls, cal, args.model, args.page_bytes, args.steps_per_call,
                                 args.decode_models, args.calls)
    cal["name"] = args.name or os.path.splitext(os.path.basename(args.json))[0].replace("_", "-")
    # the colocated points (what a one-GPU simulation prices) are the run's: label the calibration
    # with the run's card and date, not the base's (`made_by` names the base)
    cal["card"], cal["date"] = args.card, args.date
    what = "prefill" + (" and decode" if dec else "") + " points" + (", compile points" if comp else "")
    cal["made_by"] = (f"benchmarks/sim/from_calls.py: colocated {what} from {args.calls}"
                      f"{' and ' + args.results if comp else ''}; the rest from "
                      f"{os.path.basename(args.base)} ({cal.get('made_by', '')})")
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(cal, f, indent=1)
    pad = cal["padding"]
    print(f"{len(points)} prefill, {len(dec)} decode, {len(comp)} compile points; padding "
          f"{pad['decode_s_per_slot_step'] * 1e6:.1f} us per decode slot-step ({pad['decode_calls']} calls), "
          f"{pad['prefill_s_per_token'] * 1e6:.2f} us per prefill row ({pad['prefill_calls']} calls) "
          f"-> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
