"""Bounded loopback load test of the crosspool.v1 server.

Starts a server with the demo models in this process (or uses --server ADDR), runs --streams
concurrent client threads for --duration seconds; each thread sends greedy Generate calls back to
back (seeded random demo model, prompt and max_new_tokens) and checks every stream:
- not lost: it ends with a finish reason, or with RESOURCE_EXHAUSTED (engine full; the thread backs
  off and retries); any other status, a deadline or a stream without a final message is an error;
- not duplicated or corrupted: indices 0..n-1 in order, one final message, usage matches, and the
  token ids equal `crosspool_jax.reference.ReferenceGenerator` on the same demo weights for that
  (prompt, max_new_tokens) (precomputed once per distinct pair);
- afterwards GetStats shows 0 live requests.
Prints a summary table; --json PATH writes the numbers. Exit code 1 when any check failed.

    .venv/bin/python benchmarks/load_test.py --streams 200 --duration 60 --json /tmp/load.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import threading
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crosspool_jax.demo import demo_models
from crosspool_jax.reference import ReferenceGenerator
from serving.client import CrossPoolClient

MAX_NEW = (4, 8, 16)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def build_cases(seed: int, prompts_per_model: int) -> list[dict]:
    """Distinct (model, prompt, max_new_tokens) cases with their reference tokens."""
    rng = random.Random(seed)
    cases = []
    for name, m in demo_models().items():
        gen = ReferenceGenerator(m.config, m.weights)
        eos = list(m.config.eos_token_ids)
        for _ in range(prompts_per_model):
            text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(rng.randint(1, 48)))
            ids = m.tokenizer.encode(text)
            for k in MAX_NEW:
                ref = gen.generate(ids, k, stop_token_ids=eos)
                cases.append(
                    {"model": name, "prompt": text, "max_new": k, "ref": [int(t) for t in ref.token_ids]}
                )
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default=None, help="ADDR of a running `crosspool serve` (default: start one)")
    ap.add_argument("--streams", type=int, default=200, help="concurrent client streams")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds to keep sending")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts-per-model", type=int, default=6)
    ap.add_argument("--max-live-requests", type=int, default=64, help="engine limit of the started server")
    ap.add_argument("--stream-timeout", type=float, default=300.0, help="gRPC deadline of one stream")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)

    t_ref = time.time()
    cases = build_cases(args.seed, args.prompts_per_model)
    t_ref = time.time() - t_ref
    running = None
    addr = args.server
    if addr is None:
        from serving.server import demo_engine, start_server

        running = start_server(demo_engine(max_live_requests=args.max_live_requests), port=0, max_workers=256)
        addr = running.address
    print(f"load_test: {len(cases)} reference cases in {t_ref:.1f} s; server {addr}", flush=True)

    lock = threading.Lock()
    tot = {"ok": 0, "exhausted": 0, "errors": 0, "mismatch": 0, "tokens": 0}
    errors: list[str] = []
    ttft: list[float] = []
    tbt: list[float] = []
    t_start = time.time()
    deadline = t_start + args.duration

    def worker(i: int) -> None:
        rng = random.Random(args.seed * 100003 + i)
        with CrossPoolClient(addr) as c:
            while time.time() < deadline:
                case = rng.choice(cases)
                t0 = time.monotonic()
                times: list[float] = []
                resps = []
                try:
                    for r in c.generate_stream(
                        case["model"],
                        prompt=case["prompt"],
                        max_new_tokens=case["max_new"],
                        timeout=args.stream_timeout,
                    ):
                        times.append(time.monotonic())
                        resps.append(r)
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not resps:
                        with lock:
                            tot["exhausted"] += 1
                        time.sleep(rng.uniform(0.05, 0.3))
                        continue
                    with lock:
                        tot["errors"] += 1
                        errors.append(f"{e.code().name}: {e.details()}")
                    continue
                bad = None
                if not resps or resps[-1].finish_reason == 0:
                    bad = "lost: no final message"
                elif any(r.finish_reason != 0 for r in resps[:-1]):
                    bad = "duplicated final message"
                elif [r.index for r in resps] != list(range(len(resps))):
                    bad = f"bad indices {[r.index for r in resps]}"
                elif resps[-1].usage.completion_tokens != len(resps):
                    bad = "usage mismatch"
                elif [r.token_id for r in resps] != case["ref"]:
                    bad = "tokens differ from the reference"
                with lock:
                    if bad:
                        tot["mismatch"] += 1
                        errors.append(f"{case['model']} {case['prompt']!r} k={case['max_new']}: {bad}")
                    else:
                        tot["ok"] += 1
                        tot["tokens"] += len(resps)
                        ttft.append(times[0] - t0)
                        tbt.extend(b - a for a, b in itertools.pairwise(times))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t_start
    with CrossPoolClient(addr) as c:
        end = time.time() + 10
        live = list(c.stats().live_request_ids)
        while live and time.time() < end:
            time.sleep(0.05)
            live = list(c.stats().live_request_ids)
        st = c.stats()
    if running is not None:
        running.stop(grace=0)

    res = {
        "streams": args.streams,
        "duration_s": args.duration,
        "wall_s": round(wall, 1),
        "requests_completed_ok": tot["ok"],
        "resource_exhausted": tot["exhausted"],
        "errors": tot["errors"],
        "corrupted_or_lost": tot["mismatch"],
        "tokens": tot["tokens"],
        "tokens_per_s": round(tot["tokens"] / wall, 1),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "tbt_p50_s": _pct(tbt, 50),
        "tbt_p99_s": _pct(tbt, 99),
        "live_after": len(live),
        "server_completed": st.completed,
        "server_cancelled": st.cancelled,
        "server_failed": st.failed,
        "reference_cases": len(cases),
        "error_samples": errors[:10],
    }
    rows = [(k, v) for k, v in res.items() if k != "error_samples"]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) else f"{k:<{w}}  {v}")
    for e in errors[:10]:
        print("  error:", e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    ok = tot["errors"] == 0 and tot["mismatch"] == 0 and not live
    print("load_test:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
