"""Sleeping models (issue 20): wake time vs the host-to-device copy floor and vs a load from disk,
and a many-models replay (more models than the arena's weight space holds, bursty popularity).

    PYTHONPATH=. python -m benchmarks.wake --json OUT            # one GPU, OLMoE-1B-7B shapes
    PYTHONPATH=. python -m benchmarks.wake --quick --json OUT    # CPU smoke run (a tiny OLMoE)
    (--skip-replay / --skip-wake: one part only; --skip-disk: part 1 without (c); to keep a run short)

Part 1 (one model, mode shared on one device): a request's tokens; sleep (weights to host memory:
pinned host memory on GPUs); (a) the floor: `jax.device_put` of the very host arrays the sleeping
model holds onto its device, blocked until done; (b) `engine.wake` of the model (the same bytes
plus the arena writes); the request again (its tokens must equal the first run's); (c) a load of
the same shapes from a crosspool (orbax) checkpoint in a temp dir (`engine.load_model`; just
written, so mostly from the page cache), and the checkpoint read into host memory alone
(`disk_read_s`). Reports seconds, bytes, GB/s and the ratios wake/floor and disk/wake, and the
step programs compiled during the wake (must be 0).

Part 2 (replay): `--models` OLMoE-shaped models registered in an arena whose weight space holds
`--resident` of them (0: the engine's default arena); `--requests` requests arrive (Poisson,
`--rate` per second) in bursts: each burst of `--burst` requests goes to a hot set of 2 models
drawn anew (uniformly, or by Zipf popularity `--zipf`), so models go cold and come back. With
`--disk-checkpoints K` the models are registered on disk from K checkpoints (the disk tier: a
model read at its first request, dropped back to disk when sleeping models exceed `--host-gb` of
host memory). A request whose model was not resident when it was submitted is a cold hit, by the
tier it was in (host memory, disk, or joining a wake under way). Reports TTFT (submit -> first
token) per tier, peak resident models, and that every request finished with all its tokens.

    # one H200: 27 models from 2 checkpoints, the whole-GPU arena, the default host budget
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python -m benchmarks.wake --skip-wake \
        --resident 0 --models 27 --disk-checkpoints 2 --kv-bytes 8589934592 --zipf 1.0 --json OUT
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import tempfile
import threading
import time
from typing import Any

import jax
import numpy as np

from crosspool_jax.memory.arena import to_device


def _tiny() -> dict[str, Any]:
    return {"hidden_size": 256, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
            "vocab_size": 1024, "num_hidden_layers": 2}


def _weights_bytes(cfg: Any, dtype: str) -> int:
    """About the arena bytes of one model's weights on one colocated device: its parameters in the
    arena dtype (`engine_models.estimated_weight_bytes`) plus 5% for row padding (the replay reports the
    placed bytes)."""
    from crosspool_jax.engine_models import estimated_weight_bytes

    return int(estimated_weight_bytes(cfg, dtype) * 1.05)


def _engine(cfg: Any, resident: int, kv_bytes: int, quick: bool, host_bytes: int | None = None) -> Any:
    """Mode shared on one device, its weight space sized for `resident` models (+ 2 pages); 0: the
    engine's default arena (80% of the device's free memory) less `kv_bytes` for the KV cache."""
    from crosspool_jax.engine import EngineConfig, PooledEngine, _gpu_arena_bytes

    dev = jax.devices()[0]
    platform = "cpu" if dev.platform == "cpu" else "gpu"
    page = 16384 if platform == "cpu" else 262144
    if resident:
        wbytes = resident * _weights_bytes(cfg, "float32" if platform == "cpu" else "bfloat16") + 2 * page
        arena = wbytes + kv_bytes
    else:
        arena = _gpu_arena_bytes(dev) if platform == "gpu" else 64 << 20
        wbytes = arena - kv_bytes
    ec = EngineConfig(arena_bytes=arena, weights_fraction=wbytes / arena,
                      attention_backend="reference" if quick else None, host_weights_bytes=host_bytes)
    return PooledEngine(mode="shared", pools="1", config=ec, devices=[dev])


def _host_arrays(host: Any) -> list[Any]:
    """A sleeping model's host arrays (`HostModel`: per role, chunks of per-device arrays)."""
    return [p for chunks in host.blocks.values() for ps in chunks for p in ps]


def _memory_kind(a: Any) -> str:
    """"pinned_host" for a jax array in pinned host memory, "numpy" for a pageable numpy copy."""
    return (getattr(a, "sharding", None) and a.sharding.memory_kind) or "numpy"


def _generate(engine: Any, model: str, prompt: list[int], new: int) -> tuple[list[int], float]:
    """(tokens, seconds from submit to first token)."""
    from crosspool_jax.engine_api import make_request

    t0 = time.perf_counter()
    ttft, toks = None, []
    for ev in engine.submit(make_request(model, prompt, new)).events():
        if ev.token_id is not None:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            toks.append(ev.token_id)
        if ev.error:
            raise RuntimeError(ev.error)
    return toks, float(ttft or 0.0)


def wake_part(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from checkpoints.orbax_format import save
    from crosspool_jax.models.params import init_random_weights

    engine = _engine(cfg, 1, args.kv_bytes, args.quick)
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, cfg.vocab_size, args.prompt)]
    out: dict[str, Any] = {"device": jax.devices()[0].device_kind}
    try:
        engine.add_random_model("m", cfg, seed=0)
        before, _ = _generate(engine, "m", prompt, args.new)
        engine.sleep("m")
        host = engine._host["m"]
        dev = jax.devices()[0]
        arrays = _host_arrays(host)
        out["host_memory"] = sorted({_memory_kind(p) for p in arrays})
        out["chunks"] = len(arrays)
        floors = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready([to_device(p, dev) for p in arrays])
            floors.append(time.perf_counter() - t0)
        group = engine.groups[0]
        built, wakes = group.programs_built, []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            engine.wake("m")
            jax.block_until_ready(group.store.arena)
            wakes.append(time.perf_counter() - t0)
            if i < args.repeats - 1:
                engine.sleep("m")
        after, _ = _generate(engine, "m", prompt, args.new)
        # the sleep compiled the wake's chunk writers; the first wake is still reported apart
        best = min(wakes[1:]) if len(wakes) > 1 else wakes[0]
        out.update(bytes=host.nbytes, floor_s=min(floors), wake_first_s=wakes[0], wake_s=best,
                   floor_gbps=host.nbytes / min(floors) / 1e9, wake_over_floor=best / min(floors),
                   programs_compiled_on_wake=group.programs_built - built, tokens_equal=before == after)
        engine.sleep("m")
        if args.skip_disk:
            return out
        tmp = tempfile.mkdtemp(prefix="wake-bench-")
        try:
            save(f"{tmp}/ckpt", cfg, init_random_weights(cfg, seed=0, dtype=cfg.dtype))
            t0 = time.perf_counter()  # the checkpoint into host memory alone (page cache warm)
            jax.block_until_ready(engine._read_checkpoint(f"{tmp}/ckpt").weights)
            out["disk_read_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine.load_model("disk", f"{tmp}/ckpt")
            jax.block_until_ready(group.store.arena)
            out["disk_load_s"] = time.perf_counter() - t0
            out["disk_over_wake"] = out["disk_load_s"] / out["wake_s"]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        engine.shutdown()
    return out


def _checkpoints(cfg: Any, k: int, root: str) -> list[str]:
    """`k` crosspool checkpoints of random OLMoE-shaped weights (seeds 0..k-1) under `root`,
    uncompressed (zstd gains little on random weights and costs most of the write)."""
    from checkpoints.orbax_format import save
    from crosspool_jax.models.params import init_random_weights

    paths = []
    for i in range(k):
        t0 = time.perf_counter()
        save(f"{root}/ckpt{i}", cfg, init_random_weights(cfg, seed=i, dtype=cfg.dtype), compress=False)
        print(f"replay: checkpoint {i + 1}/{k} written in {time.perf_counter() - t0:.1f} s", flush=True)
        paths.append(f"{root}/ckpt{i}")
    return paths


def _popularity(n: int, zipf: float) -> np.ndarray:
    """Each model's share of the hot-set draws: uniform (zipf 0) or Zipf(`zipf`) by model index."""
    w = np.ones(n) if zipf <= 0 else 1.0 / np.arange(1, n + 1) ** zipf
    return w / w.sum()


def replay_part(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    host_bytes = int(args.host_gb * 1e9) if args.host_gb is not None else None
    engine = _engine(cfg, args.resident, args.kv_bytes, args.quick, host_bytes)
    rng = np.random.default_rng(1)
    names = [f"m{i}" for i in range(args.models)]
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    tmp = tempfile.mkdtemp(prefix="wake-replay-", dir=args.ckpt_dir) if args.disk_checkpoints else None

    def one(model: str, tier: str, prompt: list[int]) -> None:
        try:
            toks, ttft = _generate(engine, model, prompt, args.new)
            r = {"model": model, "tier": tier, "ttft_s": ttft, "tokens": len(toks)}
        except Exception as e:  # counted as lost
            r = {"model": model, "tier": tier, "error": str(e)}
        with lock:
            results.append(r)

    try:
        if tmp:  # every model registered on disk: its first request loads it
            paths = _checkpoints(cfg, args.disk_checkpoints, tmp)
            for i, n in enumerate(names):
                engine.load_model(n, paths[i % len(paths)], on_disk=True)
        else:
            for i, n in enumerate(names):
                engine.add_random_model(n, cfg, seed=i)  # beyond `resident`: the LRU idle one sleeps
        share = _popularity(len(names), args.zipf)
        threads, peak = [], 0
        t_start = time.perf_counter()
        for i in range(args.requests):
            if i % args.burst == 0:
                hot = list(rng.choice(names, 2, replace=False, p=share))
                with lock:
                    done = len(results)
                counts = collections.Counter(v for _, v in engine.stats().model_states)
                print(f"replay: {time.perf_counter() - t_start:.0f} s, {i} submitted, {done} ended, "
                      f"states {dict(counts)}, hot {hot}", flush=True)
            time.sleep(float(rng.exponential(1.0 / args.rate)))
            model = str(rng.choice(hot))
            states = dict(engine.stats().model_states)
            peak = max(peak, sum(1 for v in states.values() if v == "resident"))
            tier = {"resident": "warm", "sleeping": "host", "on_disk": "disk"}.get(states[model], "waking")
            prompt = [int(t) for t in rng.integers(3, cfg.vocab_size, args.prompt)]
            th = threading.Thread(target=one, args=(model, tier, prompt), daemon=True)
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        wall = time.perf_counter() - t_start
        states = engine.model_states()
        peak = max(peak, sum(1 for s in states if s.state.value == "resident"))
        model_bytes = max(engine._model_bytes.values())
        store = engine.groups[0].store
        from crosspool_jax.memory.topology import Role

        weight_space = store._alloc[Role.KV].capacity * store.row_bytes()
        host_kinds = sorted({_memory_kind(a) for h in engine._host.values() for a in _host_arrays(h)})
        host_budget = engine._host_budget
        wake_log = list(engine.wake_log)
    finally:
        engine.shutdown()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    # lost = ended with an error or never ended (a random model may stop early at an eos id: not lost)
    ok = [r for r in results if "error" not in r and r["tokens"] >= 1]
    errors = sorted({r["error"] for r in results if "error" in r})[:3]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None

    def ttft(tiers: tuple[str, ...]) -> dict[str, Any]:
        xs = sorted(r["ttft_s"] for r in ok if r["tier"] in tiers)
        return {"n": len(xs), "p50_s": pct(xs, 50), "p99_s": pct(xs, 99), "max_s": max(xs) if xs else None}

    return {"models": args.models, "model_bytes": model_bytes, "weight_space_bytes": weight_space,
            "weight_space_holds": weight_space // model_bytes, "peak_resident": peak,
            "device_memory_bytes": jax.devices()[0].memory_stats().get("bytes_limit")
            if jax.devices()[0].platform != "cpu" else None,
            "host_weights_budget_bytes": host_budget, "disk_checkpoints": args.disk_checkpoints,
            "zipf": args.zipf, "requests": args.requests, "completed": len(ok),
            "lost": args.requests - len(ok), "errors": errors, "wall_s": wall,
            "tokens": sum(r["tokens"] for r in ok),
            "ttft_warm": ttft(("warm",)), "ttft_cold": ttft(("host", "disk", "waking")),
            "ttft_cold_host": ttft(("host",)), "ttft_cold_disk": ttft(("disk",)),
            "ttft_joined_wake": ttft(("waking",)),
            "wakes": sum(s.wakes for s in states), "sleeps": sum(s.sleeps for s in states),
            "wakes_by_source": {src: {"n": len(xs := [w for w in wake_log if w.source == src]),
                                      "read_s_p50": pct([w.read_s for w in xs], 50),
                                      "place_s_p50": pct([w.place_s for w in xs], 50),
                                      "place_s_max": max((w.place_s for w in xs), default=None)}
                                for src in ("host", "disk")},
            "final_states": {st: sum(1 for s in states if s.state.value == st)
                             for st in ("resident", "sleeping", "on_disk", "waking")},
            "sleeping_host_memory": host_kinds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny OLMoE, few requests (CPU smoke run)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; quick 8)")
    ap.add_argument("--new", type=int, default=None, help="tokens per request (default 16; quick 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed floor copies and wakes (min kept; "
                    "the first wake, which compiles the row writers, is reported apart)")
    ap.add_argument("--models", type=int, default=None, help="replay: models (default 3 x resident)")
    ap.add_argument("--resident", type=int, default=None, help="replay: models the weight space holds "
                    "(default 4 on GPU: 4 x 13.9 GB of OLMoE bf16; quick 2); 0: the engine's default "
                    "arena (80%% of the device's free memory) less the KV bytes")
    ap.add_argument("--disk-checkpoints", type=int, default=0, help="replay: write this many "
                    "checkpoints and register every model on disk from them (model i reads "
                    "checkpoint i mod K); 0 (default): random models placed at start, host tier only")
    ap.add_argument("--ckpt-dir", default=None, help="replay: where the checkpoints go (default: a "
                    "temp dir)")
    ap.add_argument("--host-gb", type=float, default=None, help="replay: EngineConfig."
                    "host_weights_bytes in GB (default: the engine's)")
    ap.add_argument("--zipf", type=float, default=0.0, help="replay: hot sets drawn with Zipf(s) "
                    "popularity over the models (0, default: uniform)")
    ap.add_argument("--requests", type=int, default=None, help="replay requests (default 200; quick 12)")
    ap.add_argument("--burst", type=int, default=10, help="replay: requests per hot set")
    ap.add_argument("--rate", type=float, default=4.0, help="replay: arrivals per second")
    ap.add_argument("--kv-bytes", type=int, default=None, help="KV bytes of the arena "
                    "(default 16 GiB; quick 4 MiB)")
    ap.add_argument("--skip-replay", action="store_true")
    ap.add_argument("--skip-wake", action="store_true", help="only the replay")
    ap.add_argument("--skip-disk", action="store_true", help="part 1 without the load from disk")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    q = args.quick
    args.prompt = args.prompt or (8 if q else 128)
    args.new = args.new or (4 if q else 16)
    args.resident = (2 if q else 4) if args.resident is None else args.resident
    args.models = args.models or 3 * max(args.resident, 1)
    args.requests = args.requests or (12 if q else 200)
    args.kv_bytes = args.kv_bytes or ((4 << 20) if q else (16 << 30))
    if q:
        args.burst, args.rate = min(args.burst, 4), 50.0

    from benchmarks.step import olmoe_config

    cfg = olmoe_config(**(_tiny() if q else {}))
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "quick": q}
    if not args.skip_wake:
        res["wake"] = wake_part(cfg, args)
        print(json.dumps({"wake": res["wake"]}), flush=True)
    if not args.skip_replay:
        res["replay"] = replay_part(cfg, args)
        print(json.dumps({"replay": res["replay"]}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
