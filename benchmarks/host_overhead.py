"""Host time the engine spends building one decode call for long requests, device-free: the KV
virtualizer's segments of every request, the page-table rows the call carries (as
`GroupRunner._run` fills them) and each request's input token. OLMoE-1B-7B geometry by default
(16 layers, 32 tokens per 256 KiB page), `--requests` decoding requests of `--context` tokens.

    PYTHONPATH=. python -m benchmarks.host_overhead [--requests 64] [--context 32768] [--repeat 5]

Prints the median milliseconds of each part per call, as the engine does it now and as it did before
2026-11-29 (Python tuples of page ids copied out of the virtualizer and converted layer by layer;
the whole prompt + output list built per request to read one token), both timed in the same run
on the same requests (the two must give equal tables and tokens). The host does this work once per
call of K decode steps: with `EngineConfig.overlap` (default on) while the device computes the
previous call, without it while the device waits (benchmarks/overlap.py measures the difference).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from crosspool_jax.execution.lane_inputs import _tokens_at
from crosspool_jax.execution.runner_records import _Req
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.memory.kv_virtualizer import KVGeometry, KVPoolConfig, KVVirtualizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tokens-per-page", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    tpp, L, B = args.tokens_per_page, args.layers, args.requests
    rows = -(-(args.context + 1) // tpp)
    kv = KVVirtualizer(KVPoolConfig(1, B * rows * L + 64, 262144))
    kv.register_model("m", KVGeometry(L, 8192, tokens_per_page_override=tpp))
    prompts = {}
    for i in range(B):
        kv.add_request(f"r{i}", "m")
        kv.grow(f"r{i}", args.context + 1)
        prompts[f"r{i}"] = tuple(range(args.context))
    reqs = {r: _Req(r, "m", prompts[r], 8, SamplingParams(), (), [1]) for r in prompts}
    times: dict[str, list[float]] = {k: [] for k in (
        "segments (numpy views)", "segments + tuple copies (before)", "page rows (one slice)",
        "page rows (per layer, from tuples: before)", "input tokens (_tokens_at)",
        "input tokens (whole-sequence copy: before)")}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        segs = {r: kv.segments(r) for r in prompts}
        t1 = time.perf_counter()
        old = {r: tuple(tuple(p) for p in s[0].layer_pages.tolist()) for r, s in segs.items()}
        t2 = time.perf_counter()
        pages = np.full((B, L, rows), -1, np.int32)
        for bi, r in enumerate(prompts):
            lp = segs[r][0].layer_pages  # [L, rows], as GroupRunner._run fills it
            pages[bi, :, : lp.shape[1]] = lp + 7
        t3 = time.perf_counter()
        pages_old = np.full((B, L, rows), -1, np.int32)
        for bi, r in enumerate(prompts):
            for layer in range(L):
                pl = old[r][layer]
                pages_old[bi, layer, : len(pl)] = np.asarray(pl) + 7
        t4 = time.perf_counter()
        toks = [_tokens_at(reqs[r], [], args.context, args.context + 1)[0] for r in prompts]
        t5 = time.perf_counter()
        toks_old = [(list(reqs[r].prompt) + reqs[r].generated)[args.context] for r in prompts]
        t6 = time.perf_counter()
        assert np.array_equal(pages, pages_old) and toks == toks_old
        for k, dt in zip(times, (t1 - t0, t2 - t1 + t1 - t0, t3 - t2, t4 - t3, t5 - t4, t6 - t5),
                         strict=True):
            times[k].append(dt)
    print(f"{B} requests x {args.context} tokens, {L} layers, {tpp} tokens per page "
          f"({rows} pages per layer row); median of {args.repeat}, ms per decode call:")
    for k, v in times.items():
        print(f"  {k:45s} {statistics.median(v) * 1e3:8.2f}")

if __name__ == "__main__":
    main()
