"""Bounded loopback load test of the crosspool.v1 server (gRPC, or its OpenAI-compatible HTTP API).

Starts a server with the demo models in this process (default: the pooled engine in mode crosspool,
built by `serving.settings.make_engine` exactly as `crosspool serve` does, warmed up the same way),
or uses --server ADDR; runs --streams concurrent client threads for --duration seconds; each thread
sends greedy Generate calls back to back (seeded random demo model, prompt and max_new_tokens) and
checks every stream:
- not lost: it ends with a finish reason, or with RESOURCE_EXHAUSTED (engine full; the thread backs
  off and retries); any other status, a deadline or a stream without a final message is an error;
- not duplicated or corrupted: indices 0..n-1 in order, one final message, one request id per stream
  and never the same id in two streams, usage matches, and the token ids equal
  `crosspool_jax.models.reference.ReferenceGenerator` on the same demo weights (in the engine's arena
  dtype, float32 on CPU) for that (prompt, max_new_tokens) (precomputed once per distinct pair);
- afterwards GetStats shows 0 live requests and 0 KV pages in use on every KV device.
A sampler reads GetStats every 0.5 s (peak KV pages in use, peak live requests).
Prints a summary table; --json PATH writes the numbers. Exit code 1 when any check failed.
`--api openai`: the same over HTTP with the `openai` client (streamed /v1/completions, one SSE chunk
per token; 429 backs off and retries; checked: one final chunk, one id per stream, usage =
chunks = reference tokens, text = the reference tokens decoded).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
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
from crosspool_jax.models.reference import ReferenceGenerator
from serving.client import CrossPoolClient

MAX_NEW = (4, 8, 16)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def build_cases(seed: int, prompts_per_model: int, dtype: str = "float32") -> list[dict]:
    """Distinct (model, prompt, max_new_tokens) cases with their reference tokens (weights in
    `dtype`, the engine's arena dtype)."""
    import jax

    rng = random.Random(seed)
    cases = []
    for name, m in demo_models().items():
        gen = ReferenceGenerator(m.config, jax.tree.map(lambda a: a.astype(dtype), m.weights))
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


def start_local_server(args: argparse.Namespace) -> tuple[object, str]:
    """A server over the demo models, built as `crosspool serve` builds it."""
    from serving.server import start_server
    from serving.settings import ServeSettings, make_engine
    from serving.warmup import warm_up

    def log(msg: str) -> None:
        print(f"load_test: {msg}", flush=True)

    settings = ServeSettings(mode=args.mode, pools=args.pools, max_live_requests=args.max_live_requests,
                             demo=True)
    engine = make_engine(settings, log=log)
    if args.warmup and getattr(engine, "mode", "reference") != "reference":
        warm_up(engine, log=log)
    if hasattr(engine, "on_compile"):
        engine.on_compile = lambda note: log(f"engine: {note}")
    # gRPC threads as `crosspool serve` sizes them; with --api openai the HTTP API too
    running = start_server(engine, port=0, http_port=0 if args.api == "openai" else None)
    return running, running.address


def _openai_stream(client: object, case: dict, timeout: float) -> tuple[list[float], list, object]:
    """One greedy streamed /v1/completions call: (chunk receive times, token chunks, usage). Each
    token is one SSE chunk (serving/openai_api.py), so chunk times are token times."""
    times, chunks, usage = [], [], None
    for c in client.completions.create(model=case["model"], prompt=case["prompt"], max_tokens=case["max_new"],
                                       temperature=0, stream=True, stream_options={"include_usage": True},
                                       timeout=timeout):
        if c.usage is not None:
            usage = c.usage
        if c.choices:
            times.append(time.monotonic())
            chunks.append(c)
    return times, chunks, usage


def _check_openai(chunks: list, usage: object, case: dict) -> str | None:
    """Why an HTTP stream is bad (None: good): lost/duplicated final, ids, usage, text vs reference."""
    tok = demo_models()[case["model"]].tokenizer
    fins = [c.choices[0].finish_reason for c in chunks]
    if not chunks or fins[-1] is None:
        return "lost: no final chunk"
    if any(f is not None for f in fins[:-1]):
        return "duplicated final chunk"
    if len({c.id for c in chunks}) != 1:
        return "several ids in one stream"
    if usage is None or usage.completion_tokens != len(chunks) or len(chunks) != len(case["ref"]):
        return f"usage/token count mismatch ({len(chunks)} chunks, ref {len(case['ref'])})"
    if "".join(c.choices[0].text for c in chunks) != tok.decode(case["ref"]):
        return "text differs from the reference"
    return None


class _PassTally:
    """What one pass's client threads saw; every method takes the one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts = {"ok": 0, "exhausted": 0, "errors": 0, "mismatch": 0, "tokens": 0}
        self.errors: list[str] = []
        self.ttft: list[float] = []
        self.tbt: list[float] = []
        self.seen_ids: set[str] = set()
        self.peak = {"kv_pages_used": 0, "live": 0, "samples": 0}

    def exhausted(self) -> None:
        with self.lock:
            self.counts["exhausted"] += 1

    def error(self, message: str) -> None:
        with self.lock:
            self.counts["errors"] += 1
            self.errors.append(message)

    def stream(self, case: dict, ids: set[str], bad: str | None, t0: float, times: list[float]) -> None:
        """One finished stream (`bad`: why its content is wrong, None if right; `times`: arrival
        of each token, monotonic seconds, `t0` its send)."""
        with self.lock:
            first = min(ids) if ids else ""
            if bad is None and first in self.seen_ids:
                bad = f"request id {first} streamed twice"
            self.seen_ids.update(ids)
            if bad:
                self.counts["mismatch"] += 1
                self.errors.append(f"{case['model']} {case['prompt']!r} k={case['max_new']}: {bad}")
                return
            self.counts["ok"] += 1
            self.counts["tokens"] += len(times)
            self.ttft.append(times[0] - t0)
            self.tbt.extend(b - a for a, b in itertools.pairwise(times))

    def sample(self, st: object) -> None:
        used = sum(k.pages_used for k in st.kv_pages)
        with self.lock:
            self.peak["kv_pages_used"] = max(self.peak["kv_pages_used"], used)
            self.peak["live"] = max(self.peak["live"], len(st.live_request_ids))
            self.peak["samples"] += 1


def _sampler(addr: str, done: threading.Event, tally: _PassTally) -> None:
    """GetStats every 0.5 s until `done`: the peaks of KV pages in use and live requests."""
    with CrossPoolClient(addr) as c:
        while not done.wait(0.5):
            try:
                tally.sample(c.stats())
            except grpc.RpcError:
                continue


def _check_grpc(resps: list, case: dict) -> str | None:
    """Why a finished gRPC stream is wrong, None if it is right (module doc)."""
    ids = {r.request_id for r in resps}
    if not resps or resps[-1].finish_reason == 0:
        return "lost: no final message"
    if any(r.finish_reason != 0 for r in resps[:-1]):
        return "duplicated final message"
    if len(ids) != 1:
        return f"several request ids in one stream: {sorted(ids)}"
    if [r.index for r in resps] != list(range(len(resps))):
        return f"bad indices {[r.index for r in resps]}"
    if resps[-1].usage.completion_tokens != len(resps):
        return "usage mismatch"
    if [r.token_id for r in resps] != case["ref"]:
        return "tokens differ from the reference"
    return None


def _grpc_worker(addr: str, args: argparse.Namespace, cases: list[dict], rng: random.Random,
                 deadline: float, tally: _PassTally) -> None:
    """Greedy Generate streams back to back until `deadline` (time.time()), each checked."""
    with CrossPoolClient(addr) as c:
        while time.time() < deadline:
            case = rng.choice(cases)
            t0 = time.monotonic()
            times: list[float] = []
            resps = []
            try:
                for r in c.generate_stream(case["model"], prompt=case["prompt"],
                                           max_new_tokens=case["max_new"], timeout=args.stream_timeout):
                    times.append(time.monotonic())
                    resps.append(r)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not resps:
                    tally.exhausted()
                    time.sleep(rng.uniform(0.05, 0.3))
                else:
                    tally.error(f"{e.code().name}: {e.details()}")
                continue
            tally.stream(case, {r.request_id for r in resps}, _check_grpc(resps, case), t0, times)


def _http_worker(args: argparse.Namespace, cases: list[dict], rng: random.Random, deadline: float,
                 tally: _PassTally) -> None:
    """The same over the OpenAI-compatible HTTP API (`--api openai`)."""
    import openai

    client = openai.OpenAI(base_url=args.http_url + "/v1", api_key="unused", max_retries=0)
    while time.time() < deadline:
        case = rng.choice(cases)
        t0 = time.monotonic()
        try:
            times, chunks, usage = _openai_stream(client, case, args.stream_timeout)
        except openai.RateLimitError:
            tally.exhausted()
            time.sleep(rng.uniform(0.05, 0.3))
            continue
        except openai.OpenAIError as e:
            tally.error(f"{type(e).__name__}: {e}")
            continue
        tally.stream(case, {chunks[0].id} if chunks else set(), _check_openai(chunks, usage, case),
                     t0, times)
    client.close()


def _drain(addr: str, wait_s: float = 30.0) -> object:
    """GetStats once nothing is live and no KV page is in use, or after `wait_s` seconds."""
    end = time.time() + wait_s
    with CrossPoolClient(addr) as c:
        st = c.stats()
        while (st.live_request_ids or any(k.pages_used for k in st.kv_pages)) and time.time() < end:
            time.sleep(0.05)
            st = c.stats()
    return st


def run_pass(index: int, addr: str, args: argparse.Namespace, cases: list[dict]) -> dict:
    """One load phase of --duration seconds against `addr`; returns its numbers (see main)."""
    with CrossPoolClient(addr) as c:
        st0 = c.stats()
    tally = _PassTally()
    t_start = time.time()
    deadline = t_start + args.duration
    done = threading.Event()
    sampler = threading.Thread(target=_sampler, args=(addr, done, tally), daemon=True)
    sampler.start()
    threads = []
    for i in range(args.streams):
        rng = random.Random((args.seed + 7919 * index) * 100003 + i)
        work = ((_http_worker, (args, cases, rng, deadline, tally)) if args.api == "openai"
                else (_grpc_worker, (addr, args, cases, rng, deadline, tally)))
        threads.append(threading.Thread(target=work[0], args=work[1], daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t_start
    done.set()
    sampler.join()
    return _pass_result(index, args, tally, wall, st0, _drain(addr), len(cases))


def _pass_result(index: int, args: argparse.Namespace, tally: _PassTally, wall: float, st0: object,
                 st: object, num_cases: int) -> dict:
    """The numbers of one pass (main prints them); ok: nothing failed, lost or left behind."""
    tot, ttft, tbt = tally.counts, tally.ttft, tally.tbt
    live = list(st.live_request_ids)
    pages_after = sum(k.pages_used for k in st.kv_pages)
    return {
        "pass": index + 1,
        "api": args.api,
        "mode": st.mode,
        "topology": st.topology,
        "streams": args.streams,
        "duration_s": args.duration,
        "wall_s": round(wall, 1),
        "requests_completed_ok": tot["ok"],
        "resource_exhausted": tot["exhausted"],
        "errors": tot["errors"],
        "corrupted_or_lost": tot["mismatch"],
        "distinct_request_ids": len(tally.seen_ids),
        "tokens": tot["tokens"],
        "tokens_per_s": round(tot["tokens"] / wall, 1),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "ttft_max_s": max(ttft) if ttft else None,
        "tbt_p50_s": _pct(tbt, 50),
        "tbt_p99_s": _pct(tbt, 99),
        "tbt_max_s": max(tbt) if tbt else None,
        "live_after": len(live),
        "kv_pages_used_after": pages_after,
        "kv_pages_total": sum(k.pages_total for k in st.kv_pages),
        "kv_pages_used_peak": tally.peak["kv_pages_used"],
        "live_requests_peak": tally.peak["live"],
        "stats_samples": tally.peak["samples"],
        "preemptions": st.preemptions,
        "programs_compiled_before_load": st0.programs_compiled,
        "programs_compiled_after_load": st.programs_compiled,
        "server_completed": st.completed,
        "server_cancelled": st.cancelled,
        "server_failed": st.failed,
        "reference_cases": num_cases,
        "error_samples": tally.errors[:10],
        "ok": tot["errors"] == 0 and tot["mismatch"] == 0 and not live and pages_after == 0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default=None, help="ADDR of a running `crosspool serve` (default: start one)")
    ap.add_argument("--mode", default="crosspool", help="mode of the started server (default crosspool)")
    ap.add_argument("--pools", default=None, help="its device split (default: the engine's)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the start-up warm-up")
    ap.add_argument("--streams", type=int, default=200, help="concurrent client streams")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds to keep sending")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts-per-model", type=int, default=6)
    ap.add_argument("--max-live-requests", type=int, default=64, help="engine limit of the started server")
    ap.add_argument("--stream-timeout", type=float, default=300.0, help="gRPC deadline of one stream")
    ap.add_argument("--passes", type=int, default=1,
                    help="load phases in a row against the same server (pass 2 on: its programs compiled)")
    ap.add_argument("--api", choices=("grpc", "openai"), default="grpc",
                    help="openai: the streams go over the OpenAI-compatible HTTP API (/v1/completions, "
                    "SSE, the openai client) of the same server; GetStats still over gRPC")
    ap.add_argument("--http-url", default=None,
                    help="with --server and --api openai: the server's HTTP API, e.g. http://127.0.0.1:8000")
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args(argv)

    t_ref = time.time()
    cases = build_cases(args.seed, args.prompts_per_model)
    t_ref = time.time() - t_ref
    running = None
    addr = args.server
    t_up = time.time()
    if addr is None:
        running, addr = start_local_server(args)
        if running.http is not None:
            args.http_url = running.http.url
    if args.api == "openai" and not args.http_url:
        ap.error("--api openai with --server needs --http-url")
    t_up = time.time() - t_up
    with CrossPoolClient(addr) as c:
        st0 = c.stats()
    print(f"load_test: {len(cases)} reference cases in {t_ref:.1f} s; server {addr} "
          f"({st0.topology or st0.mode}) up in {t_up:.1f} s", flush=True)

    results = []
    try:
        for index in range(args.passes):
            res = run_pass(index, addr, args, cases)
            res["server_start_s"] = round(t_up, 1)
            results.append(res)
            print(f"load_test: pass {index + 1} of {args.passes}", flush=True)
            rows = [(k, v) for k, v in res.items() if k != "error_samples"]
            w = max(len(k) for k, _ in rows)
            for k, v in rows:
                print(f"{k:<{w}}  {v:.4f}" if isinstance(v, float) else f"{k:<{w}}  {v}")
            for e in res["error_samples"]:
                print("  error:", e)
    finally:
        if running is not None:
            running.stop(grace=0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if args.passes > 1 else results[0], f, indent=2)
    ok = all(r["ok"] for r in results)
    print("load_test:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
