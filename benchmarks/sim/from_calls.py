"""A calibration whose colocated prefill points are a measured run's own prefill calls.

    PYTHONPATH=. python -m benchmarks.sim.from_calls --calls RUN/calls_static.jsonl.gz \\
        --model olmoe-1b-7b-00 --base benchmarks/calibrations/h200_calibrate_2026-12-04.json \\
        --json OUT.json

`benchmarks/calibrate.py` times isolated prefill chunks (one request, one model, short contexts);
a replay's prefill calls are what the engine really ran: several requests and models per call,
deep contexts, the programs the step picked. `crosspool bench` logs every call
(`calls_<mode>.jsonl`, `GroupRunner.call_log`); each uncompiled prefill call whose device time
was seen becomes a point of `tokens` prompt tokens at the context that gives the call's measured
attention FLOPs (pairs = tokens x context + tokens x (tokens + 1) / 2, `models.costs`), with its
measured seconds. Everything else (decode, compile, host, transfer points; the split topology's
prefill points) is the base calibration's. The file names the run it came from in every point.
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
        pairs = float(c["attention_flops"]) / costs.attn_flops_per_pair
        context = max(0, round(pairs / t - (t + 1) / 2))
        out.append({"topology": "colocated", "model": model, "dtype": "bfloat16", "page_bytes": page_bytes,
                    "platform": "gpu", "card": card, "date": date, "source": source,
                    "tokens": t, "context": context, "seconds": float(c["busy"])})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", required=True, metavar="FILE", help="a calls_<mode>.jsonl(.gz)")
    ap.add_argument("--model", required=True, help="the trace model whose shapes price the calls")
    ap.add_argument("--base", required=True, metavar="CAL.json")
    ap.add_argument("--card", default="NVIDIA H200")
    ap.add_argument("--date", required=True, help="the date the run was measured (YYYY-MM-DD)")
    ap.add_argument("--page-bytes", type=int, default=262144)
    ap.add_argument("--name", default=None, help="the calibration's name (default: from the file)")
    ap.add_argument("--json", required=True, metavar="OUT.json")
    args = ap.parse_args(argv)
    with open(args.base, encoding="utf-8") as f:
        cal = json.load(f)
    points = call_points(read_calls(args.calls), args.model, args.page_bytes, args.calls, args.card,
                         args.date)
    if not points:
        raise SystemExit(f"{args.calls}: no measured uncompiled prefill call")
    others = [p for p in cal.get("prefill_points", []) if p["topology"] != "colocated"]
    cal["prefill_points"] = points + others
    cal["name"] = args.name or os.path.splitext(os.path.basename(args.json))[0].replace("_", "-")
    cal["made_by"] = (f"benchmarks/sim/from_calls.py: colocated prefill points from {args.calls}; "
                      f"the rest from {os.path.basename(args.base)} ({cal.get('made_by', '')})")
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(cal, f, indent=1)
    print(f"{len(points)} prefill points from {args.calls} -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
