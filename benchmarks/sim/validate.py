"""The simulator against a measurement: per mode and metric, predicted vs measured (issue 19).

    python -m benchmarks.sim.validate --predicted SIM.json --measured BENCH/results.json [--json OUT]
    crosspool simulate --preset P --trace BENCH/trace.jsonl --slo-from BENCH/results.json \\
        --compare BENCH/results.json --calibration CAL.json --json SIM.json

Both files are results.json of the same trace (`crosspool simulate` writes the bench's keys). For
each mode in both and each metric of `METRICS` (latency percentiles, TPOT, goodput, outcomes, KV
pages, preemptions): the predicted and measured values, the error (predicted - measured) and the
relative error (error / measured; None when measured is 0 or missing). Use the same SLO on both
sides (`--slo-from`) so that goodput compares like with like.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

METRICS: tuple[tuple[str, Callable[[dict[str, Any]], float | None]], ...] = (
    ("ttft_p50_s", lambda m: m["ttft_s"]["p50"]),
    ("ttft_p90_s", lambda m: m["ttft_s"]["p90"]),
    ("ttft_p99_s", lambda m: m["ttft_s"]["p99"]),
    ("tbt_p50_s", lambda m: m["tbt_s"]["p50"]),
    ("tbt_p90_s", lambda m: m["tbt_s"]["p90"]),
    ("tbt_p99_s", lambda m: m["tbt_s"]["p99"]),
    ("tbt_p99_9_s", lambda m: m["tbt_s"]["p99_9"]),
    ("tpot_p99_s", lambda m: m["tpot_p99_s"]),
    ("goodput_rps", lambda m: m["goodput_rps"]),
    ("finished", lambda m: m["finished"]),
    ("rejected", lambda m: m["rejected"]),
    ("preemptions", lambda m: m["preemptions"]),
    ("kv_pages_peak", lambda m: m["kv_pages"]["peak"]),
    ("kv_pages_mean", lambda m: m["kv_pages"]["mean"]),
    ("replay_s", lambda m: m["replay_s"]),
)


def compare(predicted: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """{mode: {metric: {predicted, measured, error, rel_error}}} for the modes both ran, plus the
    median absolute relative error per mode (`median_abs_rel_error`, over the metrics that have one)."""
    out: dict[str, Any] = {}
    for mode, pm in predicted.get("modes", {}).items():
        mm = measured.get("modes", {}).get(mode)
        if mm is None or "error" in pm or "error" in mm:
            continue
        rows: dict[str, Any] = {}
        for name, get in METRICS:
            try:
                p, m = get(pm), get(mm)
            except (KeyError, TypeError):
                continue
            err = None if p is None or m is None else p - m
            rel = None if err is None or not m else err / m
            rows[name] = {"predicted": p, "measured": m, "error": err, "rel_error": rel}
        rels = sorted(abs(r["rel_error"]) for r in rows.values() if r["rel_error"] is not None)
        out[mode] = {"metrics": rows,
                     "median_abs_rel_error": rels[len(rels) // 2] if rels else None}
    return out


def format_comparison(cmp: dict[str, Any]) -> str:
    """A plain-text table: metric, then predicted / measured / relative error per mode."""
    modes = list(cmp)
    head = "".join(f"{m + ' pred':>14s}{m + ' meas':>14s}{'rel err':>9s}" for m in modes)
    lines = ["metric".ljust(14) + head]
    for name, _ in METRICS:
        if not any(name in cmp[m]["metrics"] for m in modes):
            continue
        cells = []
        for m in modes:
            r = cmp[m]["metrics"].get(name)
            if r is None:
                cells.append(f"{'-':>14s}{'-':>14s}{'-':>9s}")
                continue
            rel = "-" if r["rel_error"] is None else f"{r['rel_error']:+.0%}"
            cells.append(f"{_fmt(r['predicted']):>14s}{_fmt(r['measured']):>14s}{rel:>9s}")
        lines.append(name.ljust(14) + "".join(cells))
    lines.append("median |rel err|".ljust(14) + "".join(
        f"{'':>28s}{_pct(cmp[m]['median_abs_rel_error']):>9s}" for m in modes))
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--predicted", required=True, metavar="SIM.json")
    ap.add_argument("--measured", required=True, metavar="BENCH_results.json")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    args = ap.parse_args(argv)
    with open(args.predicted, encoding="utf-8") as f:
        pred = json.load(f)
    with open(args.measured, encoding="utf-8") as f:
        meas = json.load(f)
    cmp = compare(pred, meas)
    print(format_comparison(cmp))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"predicted": args.predicted, "measured": args.measured, "comparison": cmp}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
