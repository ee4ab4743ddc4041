"""Who waits longest for a first token in a replay, and behind whom (issue 16's TTFT P99).

    PYTHONPATH=. python -m benchmarks.ttft_tail RUN/requests_shared.jsonl [--top 8] [--json OUT]

`crosspool bench` (and `crosspool simulate --out`) write each request of a measured pass to
`requests_<mode>.jsonl`: model, prompt and output lengths, when it was sent (`arrival_s`) and its
tokens' arrival times (`token_s`). With tens of requests a TTFT P99 is the slowest one or two, so
this lists the `--top` slowest first tokens: when each arrived (seconds after the first request),
its model and prompt, its TTFT, and the request of the same model whose first token came last
before its own (the one it most likely waited behind: admission is FCFS within a model unless
the planner backfills), with that request's prompt. It also sums the prompt tokens that arrived
before each listed request and had no first token yet when it arrived (the prefill backlog it
joined). It only reads the file: nothing runs on a device.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any


def read_requests(path: str) -> list[dict[str, Any]]:
    """The requests of a `requests_<mode>.jsonl` that have a first token."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("token_s")]


def slowest(requests: Sequence[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The `top` requests with the longest TTFT, slowest first (keys: `arrived_s` after the
    first arrival, model, prompt_len, `ttft_s`, `backlog_tokens` (prompt tokens sent before it
    still without a first token when it came), `behind` (the same model's request whose first
    token came last before this one's: its index, prompt_len and first token, s after the first
    arrival; None if there is none))."""
    if not requests:
        return []
    t0 = min(r["arrival_s"] for r in requests)
    first = {r["index"]: r["token_s"][0] for r in requests}
    out = []
    for r in sorted(requests, key=lambda r: r["arrival_s"] - r["token_s"][0])[:top]:
        mine = first[r["index"]]
        backlog = sum(o["prompt_len"] for o in requests
                      if o["arrival_s"] < r["arrival_s"] and first[o["index"]] > r["arrival_s"])
        before = [o for o in requests if o["model"] == r["model"] and o["index"] != r["index"]
                  and first[o["index"]] <= mine]
        prev = max(before, key=lambda o: first[o["index"]], default=None)
        out.append({
            "index": r["index"], "arrived_s": r["arrival_s"] - t0, "model": r["model"],
            "prompt_len": r["prompt_len"], "ttft_s": mine - r["arrival_s"],
            "backlog_tokens": backlog,
            "behind": None if prev is None else {
                "index": prev["index"], "prompt_len": prev["prompt_len"],
                "first_token_s": first[prev["index"]] - t0},
        })
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("requests", help="a replay's requests_<mode>.jsonl")
    ap.add_argument("--top", type=int, default=8, help="requests listed (default 8)")
    ap.add_argument("--json", default=None, metavar="OUT.json")
    args = ap.parse_args(argv)
    if args.top < 1:
        ap.error(f"--top must be >= 1, got {args.top}")
    rows = slowest(read_requests(args.requests), args.top)
    print(f"{'arrived s':>9s} {'model':24s} {'prompt':>7s} {'TTFT s':>7s} {'backlog':>9s}  behind")
    for r in rows:
        b = r["behind"]
        behind = ("-" if b is None else
                  f"#{b['index']} ({b['prompt_len']:,} tokens, first token at {b['first_token_s']:.2f} s)")
        print(f"{r['arrived_s']:9.2f} {r['model']:24s} {r['prompt_len']:7,d} {r['ttft_s']:7.2f} "
              f"{r['backlog_tokens']:9,d}  {behind}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
