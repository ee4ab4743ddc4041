"""What sits between consecutive decode calls of a replay: the token gaps behind TBT, from a call log.

    PYTHONPATH=. python -m benchmarks.call_gaps RUN/calls_shared.jsonl.gz [--json OUT]

`crosspool bench` (and `crosspool simulate --out`) write every program call of a measured pass to
`calls_<mode>.jsonl` (`GroupRunner.call_log`: dispatch, ready, device seconds, decode or not, the
lanes, prompt tokens, requests). A request's tokens of a K-step decode call arrive together, so
the gap before a call's first token is the time from the previous decode call of its group to
this one; the other K - 1 tokens come at once. This tool lists, per decode call after the first of
its group: that gap, the call's own device seconds, and the calls in between (in dispatch order:
the `ready` stamps of calls that finish together can swap), and summarises them weighted by the
call's requests (each request takes one gap token per call, so a per-token TBT P99 is about the
weighted 96th percentile at K = 4): the gap, the gap over the call's own seconds, how many prefill
calls the gaps hold (all gaps, and those at or above the weighted 96th percentile), and how many of
those tail calls (decode and prefill) ran in a larger program (`compiled`), and when the tail
gaps fall (seconds after the log's first call: a cold start's padded calls cluster early). Call
logs written since 2026-12-05 also carry each call's `step` (the launch that dispatched it) and
`step_decoding` (requests decoding then): the steps that dispatched prefill calls and no decode
call while requests decoded are counted. It only reads the log: nothing runs on a device.
"""

from __future__ import annotations

import argparse
import collections
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.sim.from_calls import read_calls

TAIL = 0.96  # the weighted percentile of call gaps that a per-token TBT P99 matches at K = 4


def decode_gaps(calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per decode call after its group's first: gap (s, from the previous decode call's ready to
    this one's), when it ended (`at_s`, s after the log's first dispatch), own device seconds (None
    if not measured), requests, compiled (ran in a larger program), and the prefill calls
    dispatched between the two (count, prompt tokens, how many ran in a larger program). Calls are
    taken in dispatch order per group."""
    out = []
    start = min((c["dispatched"] for c in calls), default=0.0)
    by_group: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for c in calls:
        by_group[int(c.get("group", 0))].append(c)
    for group_calls in by_group.values():
        group_calls.sort(key=lambda c: c["dispatched"])
        prev, between = None, []
        for c in group_calls:
            if not c["decode"]:
                between.append(c)
                continue
            if prev is not None:
                out.append({"gap_s": c["ready"] - prev["ready"], "busy_s": c.get("busy"),
                            "at_s": c["ready"] - start,
                            "requests": int(c.get("requests") or 1), "compiled": bool(c["compiled"]),
                            "prefill_calls": len(between),
                            "prefill_tokens": sum(int(p["prefill_tokens"]) for p in between),
                            "prefill_padded": sum(1 for p in between if p["compiled"])})
            prev, between = c, []
    return out


def prefill_only_steps(calls: Sequence[dict[str, Any]]) -> int | None:
    """Steps (per group) that dispatched a prefill call and no decode call while the planner had
    requests decoding; None for a log without `step` / `step_decoding` (before 2026-12-05)."""
    if not calls or "step" not in calls[0]:
        return None
    steps: dict[tuple[int, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for c in calls:
        steps[(int(c.get("group", 0)), int(c["step"]))].append(c)
    return sum(1 for cs in steps.values()
               if not any(c["decode"] for c in cs) and max(int(c["step_decoding"]) for c in cs) > 0)


def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float:
    """The smallest value whose cumulative weight reaches q of the total."""
    v, w = np.asarray(values, float), np.asarray(weights, float)
    order = np.argsort(v, kind="stable")
    cum = np.cumsum(w[order])
    return float(v[order][min(len(v) - 1, int(np.searchsorted(cum, q * cum[-1])))])


def summary(gaps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The weighted quantiles and prefill-call counts of `gaps` (module docstring)."""
    timed = [g for g in gaps if g["busy_s"]]
    w = [g["requests"] for g in timed]
    out: dict[str, Any] = {"gaps": len(gaps), "quantiles": {}}
    for q in (0.5, 0.9, TAIL):
        out["quantiles"][str(q)] = {
            "gap_s": weighted_quantile([g["gap_s"] for g in timed], w, q),
            "gap_over_own_call": weighted_quantile([g["gap_s"] / g["busy_s"] for g in timed], w, q),
            "own_call_s": weighted_quantile([g["busy_s"] for g in timed], w, q)}
    edge = out["quantiles"][str(TAIL)]["gap_s"]
    tail = [g for g in timed if g["gap_s"] >= edge]
    out["prefill_calls_between"] = dict(sorted(collections.Counter(g["prefill_calls"] for g in gaps).items()))
    out["tail"] = {"gaps": len(tail),
                   "prefill_calls_between": dict(sorted(collections.Counter(
                       g["prefill_calls"] for g in tail).items())),
                   "decode_call_padded": sum(g["compiled"] for g in tail),
                   "prefill_calls_padded": sum(g["prefill_padded"] for g in tail),
                   "at_s": ([round(min(g["at_s"] for g in tail), 3), round(max(g["at_s"] for g in tail), 3)]
                            if tail else None),
                   "mean_prefill_tokens": (float(np.mean([g["prefill_tokens"] for g in tail]))
                                           if tail else 0.0)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("calls", help="calls_<mode>.jsonl or .jsonl.gz of a bench or simulate run")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    args = ap.parse_args(argv)
    calls = read_calls(args.calls)
    s = summary(decode_gaps(calls)) | {"prefill_only_steps": prefill_only_steps(calls)}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(s, f, indent=1)
    print(f"{s['gaps']} gaps between decode calls; weighted by requests:")
    for q, v in s["quantiles"].items():
        print(f"  q{float(q):.2f}: gap {v['gap_s'] * 1e3:.1f} ms, gap / own call "
              f"{v['gap_over_own_call']:.2f}, own call {v['own_call_s'] * 1e3:.1f} ms")
    print(f"  prefill calls between (all gaps): {s['prefill_calls_between']}")
    t = s["tail"]
    print(f"  gaps at or above q{TAIL}: {t['gaps']}; prefill calls between: {t['prefill_calls_between']}; "
          f"own decode call padded: {t['decode_call_padded']}; prefill calls between padded: "
          f"{t['prefill_calls_padded']}; mean prompt tokens between: {t['mean_prefill_tokens']:.0f}")
    if t["at_s"] is not None:
        print(f"  those gaps end {t['at_s'][0]:.1f}-{t['at_s'][1]:.1f} s after the first call")
    if s["prefill_only_steps"] is not None:
        print(f"  steps with prefill calls and no decode call while requests decoded: "
              f"{s['prefill_only_steps']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
