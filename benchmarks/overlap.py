"""Host work overlapping device work: the engine with `EngineConfig.overlap` on vs off, same run.

    PYTHONPATH=. python -m benchmarks.overlap [--model olmoe] [--mode shared] [--requests 64]
        [--prompt 1024] [--new 256] [--rounds 2] [--json out.json]

Builds one `PooledEngine` (default: mode shared on the first device; `--mode crosspool` splits the
devices into a KV and a weights pool) holding a model with random weights (`--model`, shapes from
benchmarks/step.py), then runs rounds of `--requests` concurrent greedy requests (`--prompt` tokens
each, `--new` tokens out) through the engine's submit/stream API, alternating overlap off and on
between rounds (the engine idle in between; the first round of each is a warm-up that compiles). Every round
starts with all its requests admitted (the engine's steps are gated until then), so every round
runs the same step plans and must stream the same tokens; the script counts requests equal to
round 0's.
Each measured round reports: wall seconds; decode tokens/s (tokens streamed after the last request
got its first token, over the time from then to the last token); per-request time between tokens
(P50 / P99 over the decode phase); and per program call the runner's host time (`launch_seconds`:
planning, inputs, dispatch) and the time it blocked reading tokens (`wait_seconds`). With overlap the
host's time is spent while the device computes; without it, it adds to every call. Checks first
that both settings stream the same tokens. The model has no tokenizer (no detokenizing cost).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from typing import Any

import jax
import numpy as np

from benchmarks.step import MODELS
from crosspool_jax.engine import EngineConfig, PooledEngine
from crosspool_jax.engine_api import make_request


class GatedEngine(PooledEngine):
    """The engine with a gate on its steps: while `gate` is clear the worker admits requests into
    the planners but runs no step, so a round starts with every request admitted (the same step
    plans in every round, whatever the submitting thread's timing)."""

    def __init__(self, *a: Any, **kw: Any):
        self.gate = threading.Event()
        self.gate.set()
        super().__init__(*a, **kw)

    def _step_groups(self) -> bool:
        if not self.gate.is_set():
            return False
        return super()._step_groups()


def _round(engine: GatedEngine, prompts: list[list[int]], new: int, tag: str) -> dict[str, Any]:
    """Submits every prompt at once; returns per-request token ids and event times."""
    g = engine.groups
    before = [(x.calls, x.launch_seconds, x.wait_seconds, x.dropped_tokens) for x in g]
    engine.gate.clear()
    handles = [engine.submit(make_request(engine.list_models()[0].name, p, max_new_tokens=new,
                                          request_id=f"{tag}-{i}")) for i, p in enumerate(prompts)]
    while sum(len(x.reqs) for x in g) < len(handles):  # the worker admits them into the planner
        time.sleep(0.001)
    t0 = time.perf_counter()
    engine.gate.set()
    out: list[tuple[list[int], list[float]]] = [([], []) for _ in handles]

    def consume(i: int) -> None:
        for ev in handles[i].events():
            if ev.token_id is not None:
                out[i][0].append(ev.token_id)
                out[i][1].append(ev.timestamp)
            if ev.final and ev.finish_reason not in ("length", "stop"):
                raise RuntimeError(f"request {handles[i].request_id}: {ev.finish_reason} {ev.error}")

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = [(x.calls, x.launch_seconds, x.wait_seconds, x.dropped_tokens) for x in g]
    calls, launch, wait, dropped = (sum(a[k] - b[k] for a, b in zip(after, before, strict=True))
                                    for k in range(4))
    firsts = [ts[0] for _, ts in out]
    start = max(firsts)
    end = max(ts[-1] for _, ts in out)
    decode_tokens = sum(sum(1 for x in ts if x > start) for _, ts in out)
    gaps = [b - a for _, ts in out for a, b in itertools.pairwise(ts) if a >= start]
    return {"tokens": [t for t, _ in out], "wall_s": wall, "calls": calls,
            "decode_tokens_per_s": decode_tokens / max(end - start, 1e-9),
            "decode_s": end - start, "decode_tokens": decode_tokens,
            "gap_p50_ms": 1e3 * statistics.median(gaps) if gaps else None,
            "gap_p99_ms": 1e3 * float(np.percentile(gaps, 99)) if gaps else None,
            "launch_ms_per_call": 1e3 * launch / max(calls, 1),
            "wait_ms_per_call": 1e3 * wait / max(calls, 1), "dropped_tokens": dropped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="olmoe")
    ap.add_argument("--mode", choices=("shared", "crosspool"), default="shared")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds per setting")
    ap.add_argument("--steps-per-call", type=int, default=4)
    ap.add_argument("--arena-mb", type=int, default=None, help="arena MiB per device (default: engine's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = jax.devices()[0]
    cfg = EngineConfig(steps_per_call=args.steps_per_call,
                       arena_bytes=args.arena_mb << 20 if args.arena_mb else None)
    engine = GatedEngine(mode=args.mode, pools="1" if args.mode == "shared" else None,
                          max_live_requests=args.requests, config=cfg)
    model_cfg = MODELS[args.model]()
    engine.add_random_model(args.model, model_cfg, seed=0)
    print(f"# {dev.device_kind} x{len(jax.devices())}, {engine.describe()}, model {args.model}, "
          f"{args.requests} requests x ({args.prompt} prompt + {args.new} new) tokens", flush=True)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, model_cfg.vocab_size, args.prompt)]
               for _ in range(args.requests)]

    def set_overlap(on: bool) -> None:
        for g in engine.groups:
            g.overlap = on

    rows: list[dict[str, Any]] = []
    all_tokens: list[list[list[int]]] = []
    ref_tokens: list[list[int]] | None = None
    try:
        schedule = [(on, True) for on in (False, True)] + [(on, False) for _ in range(args.rounds)
                                                          for on in (False, True)]
        for i, (on, warm) in enumerate(schedule):
            set_overlap(on)
            r = _round(engine, prompts, args.new, f"r{i}")
            toks = r.pop("tokens")
            all_tokens.append(toks)
            ref_tokens = ref_tokens or toks
            r["requests_equal_to_round0"] = sum(a == b for a, b in zip(toks, ref_tokens, strict=True))
            r["tokens_equal_to_round0"] = sum(x == y for a, b in zip(toks, ref_tokens, strict=True)
                                              for x, y in zip(a, b, strict=False))
            r.update(overlap=on, warmup=warm, round=i)
            rows.append(r)
            print(f"round {i} overlap={'on ' if on else 'off'} {'(warm-up)' if warm else '':9} "
                  f"wall {r['wall_s']:.2f} s, decode {r['decode_tokens_per_s']:.0f} tok/s, "
                  f"{r['requests_equal_to_round0']}/{len(prompts)} requests equal to round 0", flush=True)
    finally:
        engine.shutdown()
    same = all(r["requests_equal_to_round0"] == len(prompts) for r in rows)
    print(f"correctness: {'every round streamed the same tokens (greedy)' if same else 'ROUNDS DIFFER'}")
    if not same:  # which rounds agree, and where requests first diverge
        n = len(all_tokens)
        print("requests equal, round i (row) vs round j (column):")
        for i in range(n):
            eq = [sum(a == b for a, b in zip(all_tokens[i], all_tokens[j], strict=True)) for j in range(n)]
            print("  ", " ".join(f"{e:3d}" for e in eq))
        for i in range(1, n):
            first = [next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
                     for a, b in zip(all_tokens[i], all_tokens[0], strict=True)]
            first = sorted(k for k in first if k is not None)
            print(f"   round {i} vs 0: first differing token index of the {len(first)} differing "
                  f"requests: {first[:12]}{' ...' if len(first) > 12 else ''}")
    measured = [r for r in rows if not r["warmup"]]
    print("\n| overlap | wall s | decode tok/s | gap P50 ms | gap P99 ms | host ms/call | wait ms/call |"
          " dropped tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in measured:
        print(f"| {'on' if r['overlap'] else 'off'} | {r['wall_s']:.2f} | {r['decode_tokens_per_s']:.0f} | "
              f"{r['gap_p50_ms']:.2f} | {r['gap_p99_ms']:.2f} | {r['launch_ms_per_call']:.2f} | "
              f"{r['wait_ms_per_call']:.2f} | {r['dropped_tokens']} |")
    on = statistics.median(r["decode_tokens_per_s"] for r in measured if r["overlap"])
    off = statistics.median(r["decode_tokens_per_s"] for r in measured if not r["overlap"])
    print(f"\ndecode throughput overlap on / off: {on / off:.3f}x (medians of {args.rounds} rounds each)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev.device_kind, "devices": len(jax.devices()), "args": vars(args),
                       "engine": engine.describe(), "rounds": rows, "decode_speedup": on / off,
                       "all_rounds_equal": same}, f,
                      indent=1)


if __name__ == "__main__":
    main()
