"""What a replay's decode calls spend their device time on, from its call log (issues 15 and 16).

    PYTHONPATH=. python -m benchmarks.decode_costs RUN/calls_shared.jsonl.gz [...] [--json OUT]

Fits each decode call's device seconds (`busy`, from `crosspool bench`'s `calls_<mode>.jsonl`)
by least squares as

    busy = fixed + per_request x requests + per_kv x KV tokens

over the calls that ran in their own program (a call padded into a larger one, `compiled`, is left
out, as `benchmarks.sim.from_calls` does), and reports the fit (ms per call, ms per request, ms per
1,000 KV tokens; R^2), how much of the log's decode time the fixed term is (calls x fixed / decode
busy), and the one-request calls' median milliseconds by context band. The fixed term is what a
call costs whatever it holds: the launches and small kernels of every layer of every step, the
empty slots of its bucket. Which kernels make it up needs a profile (`benchmarks/profile_step.py
--decode 1 --decode-slots 8 ...`); this only says how large it is, from the log alone.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.sim.from_calls import read_calls

BANDS = (0, 8192, 16384, 32768, 65536)  # KV-token band edges of the one-request table


def decode_calls(calls: Sequence[dict[str, Any]], padded: bool = False) -> list[dict[str, Any]]:
    """The decode calls with a measured `busy`; those padded into a larger program only if asked."""
    return [c for c in calls if c.get("decode") and c.get("busy") is not None
            and (padded or not c.get("compiled"))]


def fit(calls: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Least squares of busy (ms) on [1, requests, KV tokens / 1000] over decode calls."""
    if len(calls) < 3:
        raise ValueError(f"{len(calls)} decode calls: at least 3 are needed for the fit")
    x = np.array([[1.0, c["requests"], c["kv_tokens"] / 1e3] for c in calls])
    y = np.array([c["busy"] * 1e3 for c in calls])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    spread = float(((y - y.mean()) ** 2).sum())
    return {"fixed_ms": float(coef[0]), "per_request_ms": float(coef[1]),
            "per_1k_kv_tokens_ms": float(coef[2]),
            "r2": 1.0 - float((resid ** 2).sum()) / spread if spread else 1.0}


def one_request_bands(calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per KV band (`BANDS`), the one-request calls: count, median ms, median KV tokens."""
    out = []
    for lo, hi in zip(BANDS, (*BANDS[1:], None), strict=True):
        ms = [(c["busy"] * 1e3, c["kv_tokens"]) for c in calls if c["requests"] == 1
              and c["kv_tokens"] >= lo and (hi is None or c["kv_tokens"] < hi)]
        if ms:
            out.append({"kv_from": lo, "kv_to": hi, "calls": len(ms),
                        "median_ms": float(np.median([m for m, _ in ms])),
                        "median_kv_tokens": float(np.median([k for _, k in ms]))})
    return out


def analyse(calls: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fit, the fixed term's share of the decode time, and the one-request bands of one log."""
    dec = decode_calls(calls)
    res = fit(dec)
    busy = sum(c["busy"] for c in dec)
    return {"decode_calls": len(dec), "padded_left_out": len(decode_calls(calls, True)) - len(dec),
            "decode_busy_s": busy, "all_busy_s": sum(c.get("busy") or 0.0 for c in calls),
            **res, "fixed_share": len(dec) * res["fixed_ms"] / 1e3 / busy if busy else 0.0,
            "one_request": one_request_bands(dec)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("logs", nargs="+", help="calls_<mode>.jsonl[.gz] of measured replays")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    args = ap.parse_args(argv)
    rows, status = [], 0
    for p in args.logs:
        try:
            rows.append({"log": p, **analyse(read_calls(p))})
        except ValueError as e:  # too few decode calls to fit: say so, go on with the next log
            print(f"{p}: {e}")
            status = 1
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        print(f"\n{r['log']}: {r['decode_calls']} decode calls in their own programs "
              f"({r['padded_left_out']} padded left out), {r['decode_busy_s']:.1f} s of "
              f"{r['all_busy_s']:.1f} s device time")
        print(f"  busy = {r['fixed_ms']:.2f} ms + {r['per_request_ms']:.3f} ms x requests + "
              f"{r['per_1k_kv_tokens_ms']:.4f} ms x KV tokens / 1,000   (R^2 {r['r2']:.2f}); "
              f"fixed term {r['fixed_share']:.0%} of the decode time")
        for b in r["one_request"]:
            to = f"{b['kv_to']:,}" if b["kv_to"] else "..."
            print(f"  one request, KV {b['kv_from']:,}-{to}: {b['calls']} calls, median "
                  f"{b['median_ms']:.1f} ms at {b['median_kv_tokens']:,.0f} tokens")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
