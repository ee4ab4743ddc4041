"""`crosspool bench`: one workload trace replayed against crosspool, shared and static (issue 7, part 2).

    crosspool bench --preset cpu-tiny [--trace FILE.jsonl] [--modes crosspool,shared,static]
                    [--out DIR] [--seed S] [--time-scale X]
    python -m benchmarks.runner --preset gpu-2 --plan-only      # memory plan per mode, no engine

For each mode, in one invocation, on the same devices: the engine is built through
`serving.settings.make_engine` (demo models off), the preset's models are added (demo models with
their demo weights; `<shape>-NN` models with random weights at real size, generated on the devices
by `PooledEngine.add_random_model`), the gRPC server is started in-process on 127.0.0.1 (free
port), and the trace is replayed through `serving.client`: request i is sent at
`arrival_s * time_scale` seconds after the replay starts, each in its own thread and stream, with
deterministic prompt token ids of the trace's prompt_len, max_new_tokens = output_len, greedy, and
no stop ids (`ignore_eos`), so every finished stream has exactly output_len tokens. `engine.stats()`
is polled every 0.2 s (KV pages used per device, preemptions). Then the server is stopped and the
next mode starts on a fresh engine. Each engine lives in its own spawned child process (the parent
only plans, dispatches and computes the metrics), so device memory is free between modes and
compiled programs do not pile up in one process. `--precompile` (default on GPU) compiles every
one-lane step program of the shape grid before a mode serves (`PooledEngine.precompile`, in
threads, unmeasured). `--warmup N` replays the trace N times, unmeasured,
on the same engine first (the cold default measures a freshly started server, compiles included).
Each finished mode is saved as `OUT/mode_<mode>.json`; `--resume` keeps the modes an earlier run
in OUT finished with the same trace, setup and SLO (`OUT/resume.json`) and runs only the others,
so a comparison too long for one call (a device call is limited to 10 minutes) runs one mode per
call and the last call, with all modes and `--resume`, writes the one report and plots.

Outcomes: every request ends `finished` (a final message with a finish reason), `rejected` (gRPC
RESOURCE_EXHAUSTED: the engine's live-request limit; or ABORTED "rejected: ...": the KV planner
refused it because it could never fit) or `failed` (any other status, a deadline, or a stream
without a final message), each with its reason. Nothing is retried.

Memory (BENCHMARK.md, "say what fraction of HBM each mode gives to KV"): every mode gets the same
`arena_bytes` per device (`EngineConfig.arena_bytes`; on GPU 92% of device 0's free memory in a 95%
memory pool, measured once before the first mode). Within it, each mode reserves for weights the
fewest pages that hold the weights it places on a KV-holding device (crosspool: every model's
attention side on each KV device; shared/static: the heaviest device's whole models, the engine
using one reservation for every colocated device) and gives the rest to KV, as vLLM / kvcached give
KV what the weights leave. The plan (per-device weights and KV bytes, KV fraction) is in the
results.

SLO (BENCHMARK.md, after Prism): before the modes run, each model shape is served alone (an engine
in crosspool mode holding only that model, same devices and arena) and sent a few requests of the
trace one at a time: per prompt-length bucket (<8K, 8-32K, >=32K tokens), the bucket's longest,
median and shortest prompt of that shape, each sent twice (the first run compiles and is not
measured). SLO_TTFT and SLO_TPOT of (shape, bucket) = `slo_scale` (5) x the P99 (nearest rank:
the max of these few samples) of the isolated TTFT and mean TPOT. A request meets the SLO when it
finished with TTFT <= SLO_TTFT and mean TPOT <= SLO_TPOT (one-token requests: TTFT only); goodput
= requests meeting it / the replay window (trace duration x time_scale). Rejected and failed
requests are misses. `--slo-ttft-s/--slo-tpot-s` set fixed SLOs instead (no isolated runs).

Metrics (client clock: receive times in this process; TTFT from the moment the stream was
opened): TTFT P50/P90/P99; TBT = every gap between consecutive tokens of every request, pooled,
P50/P90/P99/P99.9; per-request mean TPOT P99; goodput; peak and mean KV pages in use; preemptions;
rejections; failures. The same TTFT/TBT from the server's per-token timestamps (when the engine
emitted the token) are under `engine_clock`. With K decode tokens per host call the engine emits
tokens in groups of K, so most gaps inside a group are ~0 and P50 TBT is small; the tail is what
the comparison is about. Compiles: `compiles.step_programs` / `step_program_seconds` count every
step-program compile of the measured pass (JAX's compile events, the engine's background thread
included); `compiles.serving_blocked_s` is the part a step waited for (`GroupRunner.
blocked_compile_seconds` summed over `engine.groups`, read before and after the measured pass), and
`fallback_calls` the calls that ran in a larger compiled program while theirs compiled.

Outputs in --out: results.json, trace.jsonl (the trace replayed), requests_<mode>.jsonl (every
request's times and outcome), calls_<mode>.jsonl (every program call of the measured pass:
`GroupRunner.call_log`, times in seconds since the replay's start, each call's step and the
requests decoding then: `benchmarks/call_gaps.py` reads it; summarised in results.json's
`calls`, with the background compiles' [group, start, end, decode] as `calls.compile_spans`),
tbt_cdf.csv and kv_pages.csv (the plot data), and tbt_cdf.png / kv_pages.png when
matplotlib is importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import hashlib
import itertools
import json
import math
import os
import platform as _platform
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.workload.generate import generate
from benchmarks.workload.presets import GPU_MAX_CONTEXT, PRESETS, get_preset, model_shape
from benchmarks.workload.stats import summarize
from benchmarks.workload.trace import Trace, TraceFormatError, load_jsonl, save_jsonl

MODES = ("crosspool", "shared", "static")
LENGTH_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("<8K", 0, 8192), ("8-32K", 8192, 32768), (">=32K", 32768, None))
STATS_PERIOD_S = 0.2
PROGRESS_PERIOD_S = 5.0
MIB = 1 << 20
# a compile longer than this counts as a step-program compile in the report (small jits are ~ms)
BIG_COMPILE_S = 0.25


# ---- setups: devices and memory per preset ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchSetup:
    """Where and with what memory a preset runs (the same for every mode).

    devices: the first N of jax.devices() are used by every mode. crosspool_pools: the crosspool
    KV+WEIGHTS split of those devices; shared and static use all N as colocated devices.
    arena_bytes: per device, the same in every mode (None: 92% of device 0's free memory, measured
    once). attention_backend: the kernels' backend (None: the platform's; "reference" on CPU, where
    the Pallas interpreter would dominate every step). max_live_requests: the engine's limit (one
    more is RESOURCE_EXHAUSTED).
    """

    devices: int
    crosspool_pools: str
    arena_bytes: int | None
    page_bytes: int = 16384
    attention_backend: str | None = None
    max_live_requests: int = 64
    steps_per_call: int = 4
    prefill_chunk: int = 64  # least prompt tokens a step prefills while requests decode
    max_prefill_tokens: int = 512  # most prompt tokens of all requests per step
    prefill_share: float | None = None  # EngineConfig.prefill_share (None: the engine's default)
    mixed_steps: bool = False  # EngineConfig.mixed_steps
    compile_process: bool | None = None  # EngineConfig.compile_process (None: the engine's)
    compile_workers: int | None = None  # EngineConfig.compile_workers (None: the engine's)
    attention_kernels: str = "auto"  # EngineConfig.attention_kernels
    admission_backfill: bool = True  # EngineConfig.admission_backfill
    starving_after_steps: int | None = 20  # EngineConfig.starving_after_steps (None: never)
    note: str = ""


# the engine's GPU default (`crosspool_jax.engine.GPU_MAX_PREFILL_TOKENS`, not imported here: the
# engine imports jax; tests/test_bench_runner.py keeps the two equal)
GPU_PRESET_MAX_PREFILL_TOKENS = 4096
SETUPS: dict[str, BenchSetup] = {
    # 2 of the 8 CPU devices, mirroring gpu-2 (1+1 vs 2 colocated); 3.25 MiB = 208 pages of 16 KiB:
    # the weights device holds the 3 demo models' FFN (97 pages) and, in static, the device shared by
    # demo-qwen3-moe and demo-deepseek-v3 still holds the longest request (448 tokens = 56 pages)
    "cpu-tiny": BenchSetup(
        devices=2, crosspool_pools="1+1", arena_bytes=13 * MIB // 4, attention_backend="reference",
        note="2 of the CPU devices; arena 3.25 MiB per device (208 pages of 16 KiB)"),
    # 256 KiB pages: 32 tokens of an OLMoE-1B-7B layer per page (16 KiB pages would hold 2, and a
    # 32K-token request would need a 16K-wide page table per layer)
    "gpu-2": BenchSetup(devices=2, crosspool_pools="1+1", arena_bytes=None, page_bytes=262144,
                        prefill_chunk=512, max_prefill_tokens=GPU_PRESET_MAX_PREFILL_TOKENS,
                        note="2 GPUs; arena = 92% of GPU 0's free memory (95% pool)"),
    "gpu-8": BenchSetup(devices=8, crosspool_pools="4+4", arena_bytes=None, page_bytes=262144,
                        prefill_chunk=512, max_prefill_tokens=GPU_PRESET_MAX_PREFILL_TOKENS,
                        note="8 GPUs; arena = 92% of GPU 0's free memory (95% pool)"),
    # 100 models: crosspool's FFN weights (1,945 GiB) need 16 weights GPUs of a ~122 GiB arena: 48+16 is
    # the split with the most KV devices that holds it (`--plan-only`); 32 live requests per GPU
    "gpu-64": BenchSetup(devices=64, crosspool_pools="48+16", arena_bytes=None, page_bytes=262144,
                         prefill_chunk=512, max_prefill_tokens=GPU_PRESET_MAX_PREFILL_TOKENS,
                         max_live_requests=2048,
                         note="64 GPUs; arena = 92% of GPU 0's free memory (95% pool)"),
}
# GPU: the memory pool JAX may take (the bench sets XLA_PYTHON_CLIENT_MEM_FRACTION to this unless it
# is set) and the share of the pool's free bytes the arena gets (the rest: step temporaries, which
# are small: benchmarks/arena_memory_probe.py measured 0.25 GiB over a 59.6 GiB arena)
GPU_MEM_FRACTION = "0.95"
GPU_ARENA_SHARE = 0.92
# assumed arena of one H200 for --plan-only without a GPU (139.8 GiB x 0.95 pool x 0.92)
ASSUMED_GPU_ARENA_BYTES = int(139.8 * (1 << 30) * 0.95 * GPU_ARENA_SHARE)


def setup_for(preset: str) -> BenchSetup:
    """The setup of a preset: the longest SETUPS key that prefixes its name (cpu-tiny-uniform -> cpu-tiny)."""
    keys = [k for k in SETUPS if preset == k or preset.startswith(k + "-")]
    if not keys:
        raise ValueError(f"no bench setup for preset {preset!r}; known: {', '.join(SETUPS)}")
    return SETUPS[max(keys, key=len)]


# ---- models ---------------------------------------------------------------------------------------


def _deepseek_v2_lite_config() -> Any:
    """DeepSeek-V2-Lite shapes (its HF config.json): 27 layers, D 2048, MLA (kv_lora 512, no q_lora),
    64 routed experts top-6 + 2 shared, first layer dense (I 10944), vocab 102400."""
    from crosspool_jax.models.config import from_hf_config

    return from_hf_config({
        "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
        "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6,
        "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": False,
    })


def _shape_configs() -> dict[str, Callable[[], Any]]:
    from benchmarks.step import olmoe_config, qwen3_config

    return {"olmoe-1b-7b": olmoe_config, "deepseek-v2-lite": _deepseek_v2_lite_config,
            "qwen3-30b-a3b": qwen3_config}


@functools.cache
def _demo() -> dict[str, Any]:
    from crosspool_jax.demo import demo_models

    return demo_models()


def model_config(name: str) -> Any:
    """The ModelConfig of a trace model: a demo model's, or a realistic shape's (`<shape>-NN`) with
    max_position_embeddings raised to the GPU presets' 128K context (random weights: RoPE has no
    trained range to respect; OLMoE's config says 4096)."""
    from crosspool_jax.demo import demo_configs

    demo = demo_configs()
    if name in demo:
        return demo[name]
    shape = model_shape(name)
    shapes = _shape_configs()
    if shape not in shapes:
        raise ValueError(f"model {name!r}: unknown shape {shape!r} (known: {', '.join([*demo, *shapes])})")
    cfg = shapes[shape]()
    return dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, GPU_MAX_CONTEXT))


# a host copy of random weights is acceptable up to this size (CPU runs, tests); larger models need
# the engine's on-device random fill (PooledEngine.add_random_model)
HOST_RANDOM_LIMIT_BYTES = 1 << 30


def add_model(engine: Any, name: str, seed: int) -> str:
    """Adds trace model `name` to `engine`; returns how its weights were made."""
    demo = _demo()
    if name in demo:
        m = demo[name]
        engine.add_model(name, m.config, m.weights, m.tokenizer, source="builtin-demo")
        return "demo weights"
    cfg = model_config(name)
    if hasattr(engine, "add_random_model"):
        engine.add_random_model(name, cfg, seed=seed)
        return f"random on device (seed {seed})"
    import jax.numpy as jnp

    from crosspool_jax.models.params import init_random_weights, tree_bytes, weight_specs

    dtype = jnp.dtype(engine.groups[0].store.layout.dtype)
    nbytes = tree_bytes(weight_specs(cfg, dtype))
    if nbytes > HOST_RANDOM_LIMIT_BYTES:
        raise RuntimeError(f"model {name!r} ({nbytes / 2**30:.1f} GiB) needs an on-device random fill "
                           "(PooledEngine.add_random_model); this engine has none")
    weights = init_random_weights(cfg, seed=seed, dtype=dtype)
    engine.add_model(name, cfg, weights, source=f"random(seed={seed})")
    return f"random on host (seed {seed})"


def add_order(models: Sequence[str]) -> list[str]:
    """The order models are added in every mode: heaviest first (ties: trace order), so that the
    engine's least-loaded placement of shared/static packs like longest-processing-time-first."""
    from crosspool_jax.models.params import tree_bytes, weight_specs

    size = {n: tree_bytes(weight_specs(model_config(n))) for n in models}
    return sorted(models, key=lambda n: -size[n])


def model_seed(trace_models: Sequence[str], name: str, seed: int) -> int:
    """Random-weights seed of a model: the bench seed times 1000 + its index in the trace's models."""
    return seed * 1000 + list(trace_models).index(name)


# ---- memory plan ------------------------------------------------------------------------------------


def _platform_of(devices: Sequence[Any]) -> str:
    return "gpu" if devices and devices[0].platform in ("gpu", "cuda") else "cpu"


def _layout(setup: BenchSetup, arena_bytes: int, platform: str) -> Any:
    import jax.numpy as jnp

    from pallas_kernels.page_layout import PoolLayout

    dtype = "float32" if platform == "cpu" else "bfloat16"
    row_elems = 64 if platform == "cpu" else 128
    itemsize = jnp.dtype(dtype).itemsize
    if setup.page_bytes % (row_elems * itemsize):
        raise ValueError(f"page_bytes {setup.page_bytes} must be a multiple of {row_elems * itemsize}")
    return PoolLayout(setup.page_bytes, dtype, row_elems, arena_bytes // setup.page_bytes)


def memory_plan(mode: str, models: Sequence[str], setup: BenchSetup, arena_bytes: int,
                platform: str) -> dict[str, Any]:
    """Per-device weights and KV of `mode` for `models` (added in this order) in `arena_bytes`.

    Returns weights_fraction (for EngineConfig), weights/KV pages per device, the KV fraction of
    each device, the shared/static placement, static's per-model KV cap, and `fits` (False with a
    `why` when the weights do not fit)."""
    import jax.numpy as jnp

    from crosspool_jax.memory.arena import model_rows
    from crosspool_jax.memory.topology import Role
    from crosspool_jax.models.params import tree_bytes, weight_specs

    layout = _layout(setup, arena_bytes, platform)
    pages, rpp, pb = layout.num_pages, layout.rows_per_page, setup.page_bytes
    dtype = jnp.dtype(layout.dtype)
    specs = {n: weight_specs(model_config(n), dtype) for n in models}
    out: dict[str, Any] = {"mode": mode, "arena_bytes": pages * pb, "page_bytes": pb,
                           "pages_per_device": pages, "dtype": layout.dtype, "fits": True}
    if mode == "crosspool":
        kv_n, w_n = (int(x) for x in setup.crosspool_pools.split("+"))
        rows = {n: model_rows(model_config(n), specs[n], w_n, layout) for n in models}
        attn_rows = sum(r[Role.KV] for r in rows.values())
        ffn_rows = sum(r[Role.WEIGHTS] for r in rows.values())
        wpages = max(1, math.ceil(attn_rows / rpp))
        kv_pages = pages - wpages
        out.update(pools=setup.crosspool_pools, kv_devices=kv_n, weights_devices=w_n, weights_pages=wpages,
                   kv_pages_per_kv_device=kv_pages, kv_pages_total=kv_n * max(kv_pages, 0),
                   attention_weights_bytes_per_kv_device=attn_rows * pb // rpp,
                   ffn_weights_bytes_per_weights_device=ffn_rows * pb // rpp,
                   kv_fraction_kv_device=round(max(kv_pages, 0) / pages, 4), kv_fraction_weights_device=0.0,
                   weights_device_used_fraction=round(ffn_rows / (pages * rpp), 4))
        if kv_pages < 1:
            out.update(fits=False, why=f"attention-side weights need {wpages} of {pages} pages per KV device")
        elif ffn_rows > pages * rpp:
            out.update(fits=False, why=f"FFN weights need {ffn_rows * pb // rpp / 2**30:.2f} GiB per weights "
                                       f"device, the arena is {pages * pb / 2**30:.2f} GiB")
    else:
        n_dev = setup.devices
        load = [0] * n_dev
        used = [0] * n_dev
        placed: list[list[str]] = [[] for _ in range(n_dev)]
        for n in models:  # PooledEngine._pick_group: least-loaded device (weight bytes) that fits
            r = model_rows(model_config(n), specs[n], 1, layout)
            need = r[Role.KV] + r[Role.WEIGHTS]
            for d in sorted(range(n_dev), key=lambda d: load[d]):
                if used[d] + need <= (pages - 1) * rpp:
                    used[d] += need
                    load[d] += tree_bytes(specs[n])
                    placed[d].append(n)
                    break
            else:
                out.update(fits=False, why=f"model {n} fits no device ({need * pb // rpp} bytes)")
        wpages = max(1, max(math.ceil(u / rpp) for u in used))
        kv_pages = pages - wpages
        out.update(devices=n_dev, weights_pages=wpages, kv_pages_per_device=kv_pages,
                   kv_pages_total=n_dev * kv_pages, kv_fraction=round(kv_pages / pages, 4),
                   placement=[{"device": d, "models": placed[d], "weights_bytes": used[d] * pb // rpp}
                              for d in range(n_dev)],
                   idle_devices=sum(1 for p in placed if not p))
        if mode == "static":
            out["static_kv_cap_pages"] = {n: kv_pages // len(p) for p in placed for n in p}
    out["weights_fraction"] = (out["weights_pages"] + 0.5) / pages
    return out


def request_pages(name: str, tokens: int, layout: Any, platform: str) -> int:
    """KV pages one request of `tokens` tokens takes (every layer, whole pages)."""
    from crosspool_jax.execution.pooled_step import model_geometry

    cfg = model_config(name)
    tpp = model_geometry(cfg, layout, platform).tokens_per_page
    return cfg.num_layers * math.ceil(tokens / tpp)


def never_fit(plan: dict[str, Any], trace: Trace, setup: BenchSetup, platform: str) -> dict[str, int]:
    """Trace requests that can never fit this mode's KV (predicted from the page geometry), by model."""
    layout = _layout(setup, plan["arena_bytes"], platform)
    out: Counter[str] = Counter()
    for r in trace.requests:
        need = request_pages(r.model, r.prompt_len + r.output_len, layout, platform)
        if plan["mode"] == "crosspool":
            cap = plan["kv_pages_total"]
        elif plan["mode"] == "shared":
            cap = plan["kv_pages_per_device"]
        else:
            cap = plan["static_kv_cap_pages"].get(r.model, 0)
        if need > cap:
            out[r.model] += 1
    return dict(out)


# ---- the engine and server of one mode ---------------------------------------------------------


def make_bench_engine(mode: str, pools: str, devices: Sequence[Any], engine_config: Any,
                      max_live_requests: int) -> Any:
    """The engine through `serving.settings.make_engine` (demo models off, no checkpoints), with
    the bench's EngineConfig (the same arena in every mode) on the chosen devices."""
    from serving import settings as serve_settings

    s = serve_settings.ServeSettings(mode=mode, pools=pools, demo=False, models={},
                                     max_live_requests=max_live_requests)
    return serve_settings.make_engine(s, engine_config=engine_config, devices=list(devices))


def _engine_config(setup: BenchSetup, plan: dict[str, Any]) -> Any:
    from crosspool_jax.engine import EngineConfig

    return EngineConfig(arena_bytes=plan["arena_bytes"], page_bytes=setup.page_bytes,
                        weights_fraction=plan["weights_fraction"], steps_per_call=setup.steps_per_call,
                        attention_backend=setup.attention_backend, prefill_chunk=setup.prefill_chunk,
                        max_prefill_tokens=setup.max_prefill_tokens,
                        mixed_steps=setup.mixed_steps, compile_process=setup.compile_process,
                        compile_workers=setup.compile_workers,
                        attention_kernels=setup.attention_kernels,
                        admission_backfill=setup.admission_backfill,
                        starving_after_steps=setup.starving_after_steps,
                        **({} if setup.prefill_share is None else {"prefill_share": setup.prefill_share}))


# ---- replay -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    """One request's replay (times in seconds from the replay start)."""

    index: int
    request_id: str
    model: str
    prompt_len: int
    output_len: int
    arrival_s: float  # scheduled (trace arrival x time_scale)
    sent_s: float | None = None
    token_s: list[float] = dataclasses.field(default_factory=list)  # client receive times
    engine_s: list[float] = dataclasses.field(default_factory=list)  # server per-token timestamps
    outcome: str | None = None  # finished / rejected / failed
    reason: str | None = None
    end_s: float | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_s[0] - self.sent_s if self.token_s and self.sent_s is not None else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_s)
        return (self.token_s[-1] - self.token_s[0]) / (n - 1) if n >= 2 else None


def prompt_ids(seed: int, index: int, length: int, vocab: int) -> list[int]:
    """Deterministic prompt token ids of request `index` (uniform over the vocabulary)."""
    rng = np.random.default_rng([seed, index])
    return [int(x) for x in rng.integers(0, vocab, size=length)]


def _classify(code: Any, details: str) -> tuple[str, str]:
    import grpc

    text = f"{code.name}: {details}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED or (
            code == grpc.StatusCode.ABORTED and details.startswith("rejected")):
        return "rejected", text
    return "failed", text


def _run_one(client: Any, rec: Record, ids: list[int], t0: float, timeout: float) -> None:
    import grpc

    from serving.client import FINISH_NAMES

    rec.sent_s = time.time() - t0
    final = None
    try:
        for r in client.generate_stream(rec.model, prompt_ids=ids, max_new_tokens=rec.output_len,
                                        ignore_eos=True, request_id=rec.request_id, timeout=timeout):
            rec.token_s.append(time.time() - t0)
            rec.engine_s.append(r.timestamp_unix_nanos / 1e9 - t0)
            if r.finish_reason:
                final = r
        if final is None:
            rec.outcome, rec.reason = "failed", "stream ended without a final message"
        else:
            rec.outcome = "finished"
            rec.reason = FINISH_NAMES.get(final.finish_reason, str(final.finish_reason))
            if len(rec.token_s) != rec.output_len:
                rec.reason += f" ({len(rec.token_s)} of {rec.output_len} tokens)"
    except grpc.RpcError as e:
        rec.outcome, rec.reason = _classify(e.code(), e.details() or "")
    except Exception as e:  # a client bug must not lose the request
        rec.outcome, rec.reason = "failed", f"client error: {type(e).__name__}: {e}"
    rec.end_s = time.time() - t0


def _run_one_openai(client: Any, rec: Record, ids: list[int], t0: float, timeout: float) -> None:
    """`_run_one` over the OpenAI-compatible HTTP API (`--api openai`): a streamed /v1/completions
    call with the prompt as token ids, greedy, eos ignored (the extension field `ignore_eos`). One SSE
    chunk per token; HTTP chunks carry no engine timestamp, so `engine_s` stays empty (the engine-clock
    latencies are not reported for this API)."""
    import openai

    rec.sent_s = time.time() - t0
    final = None
    try:
        for c in client.completions.create(model=rec.model, prompt=ids, max_tokens=rec.output_len,
                                           temperature=0, stream=True, timeout=timeout,
                                           extra_body={"ignore_eos": True}):
            if not c.choices:
                continue
            rec.token_s.append(time.time() - t0)
            if c.choices[0].finish_reason:
                final = c.choices[0].finish_reason
        if final is None:
            rec.outcome, rec.reason = "failed", "stream ended without a final chunk"
        else:
            rec.outcome, rec.reason = "finished", final.upper()
            if len(rec.token_s) != rec.output_len:
                rec.reason += f" ({len(rec.token_s)} of {rec.output_len} tokens)"
    except openai.RateLimitError as e:
        rec.outcome, rec.reason = "rejected", f"HTTP 429: {e}"
    except openai.APIStatusError as e:
        kind = "rejected" if e.status_code == 400 and "rejected" in str(e) else "failed"
        rec.outcome, rec.reason = kind, f"HTTP {e.status_code}: {e}"
    except Exception as e:  # a client bug must not lose the request
        rec.outcome, rec.reason = "failed", f"client error: {type(e).__name__}: {e}"
    rec.end_s = time.time() - t0


class _HTTPClients:
    """A few `openai` clients to one server's HTTP API, shared round-robin by the request threads."""

    def __init__(self, url: str, n: int):
        import openai

        self.clients = [openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
                        for _ in range(n)]

    def __getitem__(self, i: int) -> Any:
        return self.clients[i % len(self.clients)]

    def close(self) -> None:
        for c in self.clients:
            c.close()


class _Clients:
    """A few gRPC channels to one server, shared round-robin by the request threads."""

    def __init__(self, address: str, n: int):
        import grpc

        from serving.client import CrossPoolClient

        self.clients = [CrossPoolClient(address) for _ in range(n)]
        for c in self.clients:
            grpc.channel_ready_future(c.channel).result(timeout=30)

    def __getitem__(self, i: int) -> Any:
        return self.clients[i % len(self.clients)]

    def close(self) -> None:
        for c in self.clients:
            c.close()


class _CompileLog:
    """jax compile events (end time, seconds), collected process-wide once registered."""

    def __init__(self) -> None:
        self.events: list[tuple[float, float]] = []
        from jax import monitoring

        def on(name: str, dur: float, **kw: Any) -> None:
            if name == "/jax/core/compile/backend_compile_duration":
                self.events.append((time.time(), float(dur)))

        monitoring.register_event_duration_secs_listener(on)

    def between(self, a: float, b: float) -> list[float]:
        return [d for t, d in self.events if a <= t <= b]


@functools.cache
def _compile_log() -> _CompileLog:
    return _CompileLog()


def replay(engine: Any, address: str, records: list[Record], vocab: dict[str, int], seed: int,
           label: str, timeout: float, log: Callable[[str], None], progress: bool = True,
           sequential: bool = False, http_url: str | None = None) -> dict[str, Any]:
    """Sends every record's request at its arrival time (or one after another with `sequential`),
    polls engine.stats() every 0.2 s while they run, and fills the records. Returns the stats
    samples and timing. `http_url`: over the server's OpenAI-compatible HTTP API instead of gRPC."""
    n_clients = min(8, max(1, len(records)))
    clients = _HTTPClients(http_url, n_clients) if http_url else _Clients(address, n_clients)
    run_one = _run_one_openai if http_url else _run_one
    samples: list[dict[str, Any]] = []
    done = threading.Event()
    t0 = time.time()

    def poll() -> None:
        while not done.is_set():
            st = engine.stats()
            samples.append({"t": time.time() - t0, "used": [u for _, u, _ in st.kv_pages],
                            "preemptions": st.preemptions, "running": st.running, "waiting": st.queue_depth})
            done.wait(STATS_PERIOD_S)

    def report(final: bool = False) -> None:
        c = Counter(r.outcome for r in records)
        used = samples[-1]["used"] if samples else []
        log(f"bench {label}: {c['finished'] + c['rejected'] + c['failed']}/{len(records)} done "
            f"({c['rejected']} rejected, {c['failed']} failed), {time.time() - t0:.0f} s elapsed, "
            f"KV pages in use {sum(used)}" + (" (end)" if final else ""))

    def progress_loop() -> None:
        while not done.wait(PROGRESS_PERIOD_S):
            report()

    poller = threading.Thread(target=poll, name="bench-stats", daemon=True)
    poller.start()
    prog = threading.Thread(target=progress_loop, name="bench-progress", daemon=True)
    if progress:
        prog.start()
    threads = []
    try:
        for rec in records:
            ids = prompt_ids(seed, rec.index, rec.prompt_len, vocab[rec.model])
            if sequential:
                run_one(clients[rec.index], rec, ids, t0, timeout)
                continue
            wait = t0 + rec.arrival_s - time.time()
            if wait > 0:
                time.sleep(wait)
            th = threading.Thread(target=run_one, args=(clients[rec.index], rec, ids, t0, timeout),
                                  name=f"bench-{rec.request_id}", daemon=True)
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        t_end = time.time() - t0
        # pages back to 0: freed by the worker after the last stream ends
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = engine.stats()
            if sum(u for _, u, _ in st.kv_pages) == 0 and st.running + st.queue_depth == 0:
                break
            time.sleep(0.05)
    finally:
        done.set()
        poller.join()
        clients.close()
    if progress:
        report(final=True)
    st = engine.stats()
    return {"t0": t0, "t_end": t_end, "samples": samples,
            "pages_after": [[d, u, tot] for d, u, tot in st.kv_pages], "preemptions": st.preemptions,
            "devices": [d for d, _, _ in st.kv_pages], "pages_total": [tot for _, _, tot in st.kv_pages],
            "live_after": st.running + st.queue_depth}


def serve_and_replay(mode: str, models: Sequence[str], trace_models: Sequence[str], plan: dict[str, Any],
                     setup: BenchSetup, devices: Sequence[Any], records: list[Record], seed: int,
                     label: str, timeout: float, log: Callable[[str], None], progress: bool = True,
                     sequential: bool = False, warmup_passes: int = 0,
                     precompile_context: int | None = None, api: str = "grpc") -> dict[str, Any]:
    """Builds mode's engine with `models`, serves it on 127.0.0.1 (free port), replays (after
    `PooledEngine.precompile(precompile_context)` when given, then `warmup_passes` unmeasured
    replays of the same requests on the same engine), stops."""
    from serving.server import start_server

    pools = setup.crosspool_pools if mode == "crosspool" else str(setup.devices)
    t_build = time.time()
    engine = make_bench_engine(mode, pools, devices, _engine_config(setup, plan), setup.max_live_requests)
    running = None
    try:
        how = {n: add_model(engine, n, model_seed(trace_models, n, seed)) for n in models}
        t_build = time.time() - t_build
        if progress:
            log(f"bench {label}: {engine.describe()}; {len(models)} models in {t_build:.1f} s")
        # the models' gate programs, queued at load, compile before the replay as before a
        # served model's first request: a replay starting at load measures the load, not serving
        t_ready = time.time()
        engine.wait_warm()
        t_ready = time.time() - t_ready
        if progress:
            log(f"bench {label}: first programs of every model compiled in {t_ready:.1f} s")
        pre = None
        if precompile_context:
            t_pre = time.time()
            n_pre = engine.precompile(precompile_context, threads=max(1, (os.cpu_count() or 2) // 2),
                                      log=(lambda m: log(f"bench {label}: {m}")) if progress else None)
            pre = {"programs": n_pre, "seconds": round(time.time() - t_pre, 2),
                   "max_context": precompile_context}
        running = start_server(engine, "127.0.0.1", 0, max_workers=setup.max_live_requests + 32,
                               http_port=0 if api == "openai" else None)
        http_url = running.http.url if running.http is not None else None
        vocab = {n: model_config(n).vocab_size for n in models}
        warm = []
        for k in range(warmup_passes):
            recs = [dataclasses.replace(r, request_id=f"{r.request_id}-warmup{k}", token_s=[], engine_s=[])
                    for r in records]
            before = serving_stalls(engine)["blocked_s"]
            w = replay(engine, running.address, recs, vocab, seed, f"{label} warm-up {k + 1}", timeout, log,
                       progress, sequential, http_url)
            c = Counter(r.outcome for r in recs)
            warm.append({"replay_s": round(w["t_end"], 3), "finished": c["finished"],
                         "rejected": c["rejected"], "failed": c["failed"], "pages_after": w["pages_after"],
                         "serving_blocked_s": round(serving_stalls(engine)["blocked_s"] - before, 3),
                         "t0": w["t0"]})
        base_preempt = engine.stats().preemptions
        base_stalls = serving_stalls(engine)
        for g in getattr(engine, "groups", None) or []:  # the measured pass's calls (`CallRecord`)
            g.call_log = deque(maxlen=CALL_LOG)
        out = replay(engine, running.address, records, vocab, seed, label, timeout, log, progress, sequential,
                     http_url)
        out["calls"] = call_records(engine, out["t0"])
        out["compile_spans"] = compile_spans(engine, out["t0"])
        out["api"] = api
        out["preemptions"] -= base_preempt
        stalls = serving_stalls(engine)
        out["serving_blocked_s"] = stalls["blocked_s"] - base_stalls["blocked_s"]
        out["serving_blocked_compiles"] = stalls["blocked_compiles"] - base_stalls["blocked_compiles"]
        for key in STALL_COUNTS:  # the measured pass's share of each count
            out[key] = stalls[key] - base_stalls[key]
        out["decode_call_s"] = stalls["decode_call_s"]
        new = out["serving_blocked_compiles"]  # the log keeps the last 32 per group
        out["blocked_log"] = stalls["blocked_log"][-new:] if new else []
        out.update(build_s=t_build, ready_s=round(t_ready, 3), weights=how, describe=engine.describe(),
                   warmup=warm, precompile=pre)
        return out
    finally:
        if running is not None:
            running.stop(grace=1.0)
        else:
            engine.shutdown(timeout=0)
        del engine, running
        gc.collect()


CALL_LOG = 200_000  # most program calls kept per group for calls_<mode>.jsonl


def compile_spans(engine: Any, t0: float) -> list[list[Any]]:
    """Every group's background compiles that ended after the replay's start `t0` (wall clock), as
    [group, start, end, decode] with times in seconds since `t0` (`GroupRunner.compile_spans`)."""
    shift = time.time() - time.perf_counter() - t0
    return [[gi, round(s + shift, 6), round(e + shift, 6), d]
            for gi, g in enumerate(getattr(engine, "groups", None) or [])
            for s, e, d in getattr(g, "compile_spans", ()) if e + shift >= 0]


def call_records(engine: Any, t0: float) -> list[dict[str, Any]]:
    """Every group's logged calls (`GroupRunner.call_log`) as dicts, times in seconds since the
    replay's start `t0` (wall clock), ordered by dispatch."""
    shift = time.time() - time.perf_counter() - t0  # the runners' clock is time.perf_counter
    out = []
    for gi, g in enumerate(getattr(engine, "groups", None) or []):
        for c in getattr(g, "call_log", ()):
            d = dataclasses.asdict(c)
            d.update(group=gi, dispatched=round(c.dispatched + shift, 6), ready=round(c.ready + shift, 6),
                     busy=None if c.busy is None else round(c.busy, 6))
            out.append(d)
    return sorted(out, key=lambda d: d["dispatched"])


# `GroupRunner` counters reported per mode, summed over the groups: calls run in a larger compiled
# program, steps that held a prefill for its programs, programs the compile worker process built
# (`compile_process`; not this process's JAX compile events), worker failures compiled here, and
# programs compiled with the Triton attention after their Mosaic GPU build failed
STALL_COUNTS = ("fallback_calls", "held_prefill_steps", "process_compiles", "process_compile_failures",
                "kernel_fallbacks")


def serving_stalls(engine: Any) -> dict[str, Any]:
    """The engine's compile stalls so far, summed over its device groups (`engine.groups`,
    `GroupRunner`): seconds steps spent compiling a program (or waiting for one) on the serving
    path, how many such compiles, and calls run in a larger compiled program than their shape's."""
    groups = getattr(engine, "groups", None) or []
    calls = [g.decode_call_seconds for g in groups if getattr(g, "decode_call_seconds", None)]
    return {"blocked_s": float(sum(getattr(g, "blocked_compile_seconds", 0.0) for g in groups)),
            "blocked_compiles": int(sum(getattr(g, "blocked_compiles", 0) for g in groups)),
            **{key: int(sum(getattr(g, key, 0) for g in groups)) for key in STALL_COUNTS},
            "blocked_log": [(round(sec, 3), why, what) for g in groups
                            for sec, why, what in getattr(g, "blocked_log", ())],
            # the groups' measured device time of a decode call (EMA), for TBT / decode call
            "decode_call_s": sum(calls) / len(calls) if calls else None}


# ---- child processes ----------------------------------------------------------------------------
# Every engine (each mode, each isolated reference) runs in its own spawned process: device memory
# is surely free for the next mode, the parent never initializes a device backend, and compiled
# programs do not pile up in one process (on CPU, a few hundred compiled step programs in one
# process exhaust vm.max_map_count: "LLVM compilation error: Cannot allocate memory", then a crash).


class ChildCrashed(RuntimeError):
    """A child process died without a result (a crash or a kill)."""


def _child_entry(conn: Any, fn_name: str, kwargs: dict[str, Any]) -> None:
    import traceback

    try:
        conn.send(("ok", globals()[fn_name](**kwargs)))
    except BaseException as e:
        traceback.print_exc()
        conn.send(("error", f"{type(e).__name__}: {' '.join(str(e).split())}"))
    finally:
        conn.close()


def in_child(fn_name: str, **kwargs: Any) -> Any:
    """`fn_name(**kwargs)` (a function of this module) in a spawned process; its result."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_entry, args=(send, fn_name, kwargs), name=f"bench-{fn_name}")
    proc.start()
    send.close()
    try:
        msg = recv.recv()
    except EOFError:
        msg = None
    except BaseException:
        proc.terminate()
        proc.join()
        raise
    proc.join()
    if msg is None:
        raise ChildCrashed(f"the {fn_name} process died without a result (exit code {proc.exitcode})")
    if msg[0] != "ok":
        raise RuntimeError(f"{fn_name}: {msg[1]}")
    return msg[1]


def _probe(n_devices: int) -> dict[str, Any]:
    """(child) The devices the bench would use, and device 0's memory."""
    import jax

    visible = jax.devices()
    devs = visible[:n_devices]
    st = (devs[0].memory_stats() or {}) if devs else {}
    return {"platform": _platform_of(devs), "visible": len(visible), "devices": [str(d) for d in devs],
            "device_kind": devs[0].device_kind if devs else None, "jax": jax.__version__,
            "bytes_limit": st.get("bytes_limit"), "bytes_in_use": st.get("bytes_in_use", 0)}


def _mode_job(mode: str, models: Sequence[str], trace_models: Sequence[str], plan: dict[str, Any],
              setup: BenchSetup, records: list[Record], seed: int, label: str, timeout: float,
              warmup_passes: int = 0, progress: bool = True, sequential: bool = False,
              precompile_context: int | None = None, api: str = "grpc") -> dict[str, Any]:
    """(child) serve_and_replay on the setup's devices; the filled records, the run and its compiles."""
    import jax

    comp = _compile_log()
    run = serve_and_replay(mode, models, trace_models, plan, setup, jax.devices()[: setup.devices], records,
                           seed, label, timeout, _log, progress, sequential, warmup_passes,
                           precompile_context, api)
    warm = comp.between(run["warmup"][0]["t0"], run["t0"]) if run["warmup"] else None
    return {"records": records, "run": run, "compiles": comp.between(run["t0"], run["t0"] + run["t_end"]),
            "warmup_compiles": warm}


# ---- metrics ------------------------------------------------------------------------------------


def pct(xs: Sequence[float] | np.ndarray, qs: Sequence[float]) -> dict[str, float | None]:
    """Percentiles (numpy's linear interpolation) keyed p50, p90, p99, p99_9; None when empty."""
    a = np.asarray(xs, dtype=np.float64)
    return {f"p{q:g}".replace(".", "_"): (float(np.percentile(a, q)) if a.size else None) for q in qs}


def call_summary(calls: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What results.json keeps of calls_<mode>.jsonl: call counts, device seconds of decode and
    prefill calls (those whose end the call clock saw and that ran their own program), the gaps
    between one group's consecutive decode calls as the host read them (what a stream's tokens
    see), and prompt tokens per prefill call."""
    qs = (50, 90, 99)
    dec = [c for c in calls if c["decode"]]
    pre = [c for c in calls if not c["decode"]]

    def busy(cs: list[dict[str, Any]]) -> dict[str, float | None]:
        return pct([c["busy"] for c in cs if c["busy"] is not None and not c["compiled"]], qs)

    gaps: list[float] = []
    for gi in {c["group"] for c in dec}:
        ends = sorted(c["ready"] for c in dec if c["group"] == gi)
        gaps += [b - a for a, b in itertools.pairwise(ends)]
    return {"decode_calls": len(dec), "prefill_calls": len(pre),
            "unmeasured": sum(1 for c in calls if c["busy"] is None),
            "decode_busy_s": busy(dec), "prefill_busy_s": busy(pre),
            "decode_end_gap_s": {**pct(gaps, qs), "max": max(gaps) if gaps else None},
            "prefill_tokens": {**pct([c["prefill_tokens"] for c in pre], (50,)),
                               "max": max((c["prefill_tokens"] for c in pre), default=None)}}


def nearest_rank_p99(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]


def bucket_of(prompt_len: int) -> str:
    for name, lo, hi in LENGTH_BUCKETS:
        if prompt_len >= lo and (hi is None or prompt_len < hi):
            return name
    raise AssertionError(prompt_len)


def meets_slo(rec: Record, slo: dict[str, Any]) -> bool:
    """Finished with TTFT <= SLO_TTFT and mean TPOT <= SLO_TPOT of its (shape, bucket)."""
    if rec.outcome != "finished" or rec.ttft is None:
        return False
    s = slo.get(model_shape(rec.model), {}).get(bucket_of(rec.prompt_len))
    if s is None:
        return False
    return rec.ttft <= s["ttft_s"] and (rec.tpot is None or s["tpot_s"] is None or rec.tpot <= s["tpot_s"])


def _latency(recs: list[Record], clock: str) -> dict[str, Any]:
    ttft, gaps = [], []
    for r in recs:
        ts = r.token_s if clock == "client" else r.engine_s
        if ts and r.sent_s is not None and r.outcome == "finished":
            ttft.append(ts[0] - r.sent_s)
        if len(ts) >= 2:
            gaps.extend(np.diff(ts).tolist())
    return {"ttft_s": pct(ttft, (50, 90, 99)), "tbt_s": pct(gaps, (50, 90, 99, 99.9)), "tbt_gaps": len(gaps)}


def mode_metrics(records: list[Record], run: dict[str, Any], slo: dict[str, Any], window_s: float,
                 compiles: list[float]) -> dict[str, Any]:
    """Every number of one mode (see the module docstring)."""
    c = Counter(r.outcome for r in records)
    lat = _latency(records, "client")
    tpots = [r.tpot for r in records if r.outcome == "finished" and r.tpot is not None]
    met = sum(meets_slo(r, slo) for r in records)
    samples = run["samples"]
    # KV over the replay (until the last stream ended)
    active = [s for s in samples if s["t"] <= run["t_end"]] or samples
    used = np.array([s["used"] for s in active], dtype=np.float64) if active else np.zeros((0, 0))
    total_used = used.sum(axis=1) if used.size else np.zeros(0)
    per_dev = [{"device": d, "pages_total": tot,
                "peak": int(used[:, i].max()) if used.size else 0,
                "mean": round(float(used[:, i].mean()), 2) if used.size else 0.0}
               for i, (d, tot) in enumerate(zip(run["devices"], run["pages_total"], strict=True))]
    by_model: dict[str, Any] = {}
    for name in dict.fromkeys(r.model for r in records):
        rs = [r for r in records if r.model == name]
        cm = Counter(r.outcome for r in rs)
        lm = _latency(rs, "client")
        by_model[name] = {"requests": len(rs), "finished": cm["finished"], "rejected": cm["rejected"],
                          "failed": cm["failed"], "slo_met": sum(meets_slo(r, slo) for r in rs),
                          "ttft_p99_s": lm["ttft_s"]["p99"], "tbt_p99_s": lm["tbt_s"]["p99"]}
    lags = [r.sent_s - r.arrival_s for r in records if r.sent_s is not None]
    return {
        "requests": len(records),
        "finished": c["finished"],
        "rejected": c["rejected"],
        "failed": c["failed"],
        "lost": len(records) - c["finished"] - c["rejected"] - c["failed"],
        "short_streams": sum(1 for r in records
                             if r.outcome == "finished" and len(r.token_s) != r.output_len),
        "ttft_s": lat["ttft_s"],
        "tbt_s": lat["tbt_s"],
        "tbt_gaps": lat["tbt_gaps"],
        "tpot_p99_s": pct(tpots, (99,))["p99"],
        "slo_met": met,
        "goodput_rps": met / window_s if window_s > 0 else None,
        "goodput_fraction": met / len(records) if records else None,
        "tokens": sum(len(r.token_s) for r in records),
        "kv_pages": {"peak": int(total_used.max()) if total_used.size else 0,
                     "mean": round(float(total_used.mean()), 2) if total_used.size else 0.0,
                     "total": int(sum(run["pages_total"])), "per_device": per_dev,
                     "samples": len(active)},
        "pages_after": run["pages_after"],
        "live_after": run["live_after"],
        "preemptions": run["preemptions"],
        "rejection_reasons": dict(Counter(r.reason for r in records if r.outcome == "rejected")),
        "failure_reasons": dict(Counter(r.reason for r in records if r.outcome == "failed")),
        "engine_clock": _latency(records, "engine"),
        "dispatch_lag_s": {"max": max(lags) if lags else None, **pct(lags, (99,))},
        "replay_s": round(run["t_end"], 3),
        "build_s": round(run["build_s"], 3),
        "ready_s": run.get("ready_s"),
        "compiles": {"count": len(compiles), "seconds": round(sum(compiles), 3),
                     "step_programs": sum(1 for d in compiles if d >= BIG_COMPILE_S),
                     "step_program_seconds": round(sum(d for d in compiles if d >= BIG_COMPILE_S), 3),
                     # seconds steps waited for a compile (the rest compiled in the background)
                     "serving_blocked_s": round(run.get("serving_blocked_s", 0.0), 3),
                     "serving_blocked_compiles": run.get("serving_blocked_compiles", 0),
                     **{key: run.get(key, 0) for key in STALL_COUNTS},
                     # the measured pass's blocked waits: (seconds, waited for, wanted shape)
                     "serving_blocked_log": run.get("blocked_log", [])},
        # EMA of the engine's measured decode call (device time, K steps) at the replay's end
        "decode_call_s": run.get("decode_call_s"),
        "per_model": by_model,
    }


# ---- the isolated reference (SLO) ---------------------------------------------------------------


def reference_requests(trace: Trace, per_bucket: int) -> dict[str, dict[str, list[Any]]]:
    """Per shape and prompt bucket, the trace requests measured in isolation: the bucket's longest,
    median and shortest prompt (up to `per_bucket` of them, distinct)."""
    out: dict[str, dict[str, list[Any]]] = {}
    for r in trace.requests:
        out.setdefault(model_shape(r.model), {}).setdefault(bucket_of(r.prompt_len), []).append(r)
    for buckets in out.values():
        for b, rs in buckets.items():
            rs = sorted(rs, key=lambda r: (r.prompt_len, r.output_len, r.request_id))
            picks = [len(rs) - 1, len(rs) // 2, 0][:per_bucket]
            buckets[b] = [rs[i] for i in dict.fromkeys(picks)]
    return out


def measure_slo(trace: Trace, setup: BenchSetup, arena_bytes: int, platform: str, seed: int, scale: float,
                per_bucket: int, timeout: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Runs each shape alone (crosspool, one model; a child process per shape) on the same devices
    and arena; returns {shape: {bucket: {ttft_s, tpot_s, isolated...}}}."""
    picks = reference_requests(trace, per_bucket)
    trace_models = trace.models
    slo: dict[str, Any] = {}
    for shape, buckets in picks.items():
        name = next(m for m in trace_models if model_shape(m) == shape)
        plan = memory_plan("crosspool", [name], setup, arena_bytes, platform)
        if not plan["fits"]:
            raise RuntimeError(f"isolated reference of {name}: {plan['why']}")
        recs = reference_records(trace, buckets, name)  # the first of each pair compiles
        t = time.time()
        recs = in_child("_mode_job", mode="crosspool", models=[name], trace_models=trace_models, plan=plan,
                        setup=setup, records=recs, seed=seed, label=f"reference {shape}", timeout=timeout,
                        progress=False, sequential=True)["records"]
        slo[shape] = slo_of_isolated(buckets, recs, scale)
        log(f"bench reference {shape}: " + ", ".join(
            f"{b}: isolated TTFT P99 {v['isolated_ttft_p99_s'] * 1e3:.1f} ms, TPOT P99 "
            f"{(v['isolated_tpot_p99_s'] or 0) * 1e3:.1f} ms" if v else f"{b}: no finished request"
            for b, v in slo[shape].items()) + f" ({time.time() - t:.0f} s)")
    return slo



def reference_records(trace: Trace, picks: dict[str, list[Any]], name: str) -> list[Record]:
    """The isolated runs of one shape's picks (`reference_requests`): each request twice, in order
    (the first compiles and is not measured)."""
    recs = []
    for rs in picks.values():
        for r in rs:
            for rep in range(2):
                recs.append(Record(index=trace.requests.index(r), request_id=f"ref-{r.request_id}-{rep}",
                                   model=name, prompt_len=r.prompt_len, output_len=r.output_len,
                                   arrival_s=0.0))
    return recs


def slo_of_isolated(buckets: dict[str, list[Any]], recs: list[Record], scale: float) -> dict[str, Any]:
    """{bucket: SLO} from one shape's isolated runs (`reference_records`, filled): `scale` x the
    nearest-rank P99 of the measured (second) runs' TTFT and mean TPOT; None without a finished run."""
    out: dict[str, Any] = {}
    for b in buckets:
        measured = [r for r in recs[1::2] if bucket_of(r.prompt_len) == b]
        ok = [r for r in measured if r.outcome == "finished"]
        if not ok:
            out[b] = None
            continue
        ttft = nearest_rank_p99([r.ttft for r in ok])
        tpots = [r.tpot for r in ok if r.tpot is not None]
        tpot = nearest_rank_p99(tpots) if tpots else None
        out[b] = {
            "ttft_s": scale * ttft, "tpot_s": scale * tpot if tpot is not None else None,
            "isolated_ttft_p99_s": ttft, "isolated_tpot_p99_s": tpot,
            "requests": [{"prompt_len": r.prompt_len, "output_len": r.output_len, "ttft_s": r.ttft,
                          "tpot_s": r.tpot, "outcome": r.outcome, "reason": r.reason} for r in measured],
        }
    return out


# ---- outputs ------------------------------------------------------------------------------------


def _cdf_points(gaps: np.ndarray) -> list[tuple[float, float]]:
    """(tbt, cdf) at a grid fine in the tail: every 0.1% up to P99, every 0.01% above."""
    if gaps.size == 0:
        return []
    qs = np.unique(np.concatenate([np.arange(0, 0.99, 0.001), np.arange(0.99, 1.0, 0.0001), [1.0]]))
    return [(float(v), float(q)) for v, q in zip(np.quantile(gaps, qs), qs, strict=True)]


def write_plot_data(out_dir: str, records: dict[str, list[Record]], runs: dict[str, dict[str, Any]]
                    ) -> list[str]:
    """tbt_cdf.csv (mode, tbt_s, cdf) and kv_pages.csv (mode, t_s, device, pages_used, pages_total)."""
    with open(os.path.join(out_dir, "tbt_cdf.csv"), "w", encoding="utf-8") as f:
        f.write("mode,tbt_s,cdf\n")
        for mode, recs in records.items():
            gaps = np.concatenate([np.diff(r.token_s) for r in recs if len(r.token_s) >= 2] or [np.zeros(0)])
            for v, q in _cdf_points(np.sort(gaps)):
                f.write(f"{mode},{v:.6f},{q:.6f}\n")
    with open(os.path.join(out_dir, "kv_pages.csv"), "w", encoding="utf-8") as f:
        f.write("mode,t_s,device,pages_used,pages_total\n")
        for mode, run in runs.items():
            for s in run["samples"]:
                for d, u, tot in zip(run["devices"], s["used"], run["pages_total"], strict=True):
                    f.write(f"{mode},{s['t']:.3f},{d},{u},{tot}\n")
    return ["tbt_cdf.csv", "kv_pages.csv"]


def write_plots(out_dir: str, records: dict[str, list[Record]], runs: dict[str, dict[str, Any]],
                title: str) -> list[str]:
    """tbt_cdf.png and kv_pages.png with matplotlib; [] when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, recs in records.items():
        gaps = np.sort(np.concatenate([np.diff(r.token_s) for r in recs if len(r.token_s) >= 2]
                                      or [np.zeros(0)]))
        if gaps.size == 0:
            continue
        pts = np.array(_cdf_points(gaps))
        ax.plot(np.maximum(pts[:, 0], 1e-5), pts[:, 1], label=mode)
        ax2.plot(np.maximum(pts[:, 0], 1e-5), np.maximum(1 - pts[:, 1], 1e-5), label=mode)
    ax.set(xscale="log", xlabel="time between tokens (s)", ylabel="CDF", title=f"TBT CDF: {title}")
    ax2.set(xscale="log", yscale="log", xlabel="time between tokens (s)", ylabel="1 - CDF", title="TBT tail")
    for a in (ax, ax2):
        a.grid(True, which="both", alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "tbt_cdf.png"), dpi=120)
    plt.close(fig)
    if not runs:  # every mode failed: nothing to plot over time
        return ["tbt_cdf.png"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), sharex=True, squeeze=False)
    for a, (mode, run) in zip(axes[:, 0], runs.items(), strict=True):
        t = [s["t"] for s in run["samples"]]
        used = np.array([s["used"] for s in run["samples"]]) if run["samples"] else np.zeros((0, 0))
        for i, d in enumerate(run["devices"]):
            if used.size and used[:, i].max() > 0:
                a.plot(t, used[:, i], lw=0.8, label=d)
        if used.size:
            a.plot(t, used.sum(axis=1), color="k", lw=1.2, label="all devices")
        a.axhline(sum(run["pages_total"]), color="k", ls="--", lw=0.8, label="KV pages (all devices)")
        a.set(ylabel="KV pages in use", title=mode)
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("time since replay start (s)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "kv_pages.png"), dpi=120)
    plt.close(fig)
    return ["tbt_cdf.png", "kv_pages.png"]


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def format_table(results: dict[str, Any]) -> str:
    """The per-mode numbers as a plain-text table (ms for latencies)."""
    m = {k: v for k, v in results["modes"].items() if "error" not in v}
    rows = [("metric", *m)]

    def row(label: str, f: Callable[[dict[str, Any]], str]) -> None:
        rows.append((label, *(f(v) for v in m.values())))

    for q in ("p50", "p90", "p99"):
        row(f"TTFT {q} (ms)", lambda v, q=q: _fmt_ms(v["ttft_s"][q]))
    for q in ("p50", "p90", "p99", "p99_9"):
        row(f"TBT {q.replace('_', '.')} (ms)", lambda v, q=q: _fmt_ms(v["tbt_s"][q]))
    row("TPOT p99 (ms)", lambda v: _fmt_ms(v["tpot_p99_s"]))
    row("goodput (req/s)", lambda v: f"{v['goodput_rps']:.3f}")
    row("SLO met / requests", lambda v: f"{v['slo_met']}/{v['requests']}")
    row("finished / rejected / failed", lambda v: f"{v['finished']}/{v['rejected']}/{v['failed']}")
    row("KV pages peak / mean / total", lambda v: f"{v['kv_pages']['peak']}/{v['kv_pages']['mean']:.0f}/"
                                                  f"{v['kv_pages']['total']}")
    row("preemptions", lambda v: str(v["preemptions"]))
    row("step-program compiles (s)", lambda v: f"{v['compiles']['step_programs']} "
                                               f"({v['compiles']['step_program_seconds']:.0f})")
    row("serving-path compile stalls (s)",
        lambda v: f"{v['compiles'].get('serving_blocked_compiles', 0)} "
                  f"({v['compiles'].get('serving_blocked_s', 0.0):.1f})")
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


# ---- the run ------------------------------------------------------------------------------------


def load_trace(args: argparse.Namespace) -> Trace:
    """The trace: --trace FILE (the project's JSONL, or a raw Mooncake JSONL / Azure CSV whose
    requests get the preset's models by its popularity rule: `workload.public`), or the preset
    generated with --seed; cut to --max-duration-s."""
    if args.trace:
        from benchmarks.workload.public import read_trace_file

        spec = get_preset(args.preset) if args.preset in PRESETS else None
        trace = read_trace_file(args.trace, spec, args.seed) if spec is not None else load_jsonl(args.trace)
    else:
        trace = generate(get_preset(args.preset), args.seed)
    if args.max_duration_s is not None:
        meta = dict(trace.meta)
        meta["duration_s"] = min(float(meta.get("duration_s", args.max_duration_s)), args.max_duration_s)
        meta["cut_to_s"] = args.max_duration_s
        trace = Trace([r for r in trace.requests if r.arrival_s < args.max_duration_s], meta)
    if not trace.requests:
        raise ValueError("the trace has no requests")
    return trace


def resolve_setup(args: argparse.Namespace) -> BenchSetup:
    s = setup_for(args.preset)
    over: dict[str, Any] = {}
    if args.devices is not None:
        over["devices"] = args.devices
    if args.pools is not None:
        over["crosspool_pools"] = args.pools
    if args.arena_mib is not None:
        over["arena_bytes"] = int(args.arena_mib * MIB)
    if args.max_live_requests is not None:
        over["max_live_requests"] = args.max_live_requests
    if args.steps_per_call is not None:
        over["steps_per_call"] = args.steps_per_call
    if getattr(args, "prefill_share", None) is not None:
        over["prefill_share"] = args.prefill_share
    if getattr(args, "max_prefill_tokens", None) is not None:
        over["max_prefill_tokens"] = args.max_prefill_tokens
    if getattr(args, "mixed_steps", False):
        over["mixed_steps"] = True
    if getattr(args, "compile_process", None) is not None:
        over["compile_process"] = args.compile_process
    if getattr(args, "compile_workers", None) is not None:
        if args.compile_workers < 1:
            raise SystemExit(f"--compile-workers must be >= 1, got {args.compile_workers}")
        over["compile_workers"] = args.compile_workers
    if getattr(args, "attention_kernels", None) is not None:
        over["attention_kernels"] = args.attention_kernels
    if getattr(args, "admission_backfill", None) is not None:
        over["admission_backfill"] = args.admission_backfill
    if getattr(args, "starving_after_steps", None) is not None:
        if args.starving_after_steps < 0:
            raise SystemExit(f"--starving-after-steps must be >= 0, got {args.starving_after_steps}")
        over["starving_after_steps"] = args.starving_after_steps or None
    s = dataclasses.replace(s, **over)
    kv, w = (int(x) for x in s.crosspool_pools.split("+"))
    crosspool_runs = "crosspool" in (getattr(args, "modes", None) or ",".join(MODES)).split(",")
    if crosspool_runs and (kv < 1 or w < 1 or kv + w != s.devices):
        raise ValueError(f"crosspool pools {s.crosspool_pools!r} must split the {s.devices} devices")
    return s


def _parse_modes(spec: str) -> list[str]:
    """--modes as a list; ValueError naming the unknown ones."""
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes: unknown {', '.join(bad) or '(none)'}; known: {', '.join(MODES)}")
    return modes


def _probe_devices(args: argparse.Namespace, setup: Any, earlier: dict[str, Any] | None,
                   log: Callable[[str], None]) -> tuple[dict[str, Any], str, int]:
    """(device probe, platform, arena bytes per device before page rounding). Sets the
    environment the mode children inherit (GPU memory fraction, compilation cache); with
    --plan-only probes nothing."""
    if args.plan_only:
        probe: dict[str, Any] = {"devices": [], "device_kind": None, "visible": None, "jax": None}
        plat = "gpu" if args.preset.startswith("gpu") else "cpu"
        return probe, plat, setup.arena_bytes or ASSUMED_GPU_ARENA_BYTES
    if args.preset.startswith("gpu"):  # inherited by every spawned child
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION)
    cache = getattr(args, "compile_cache", None) or os.path.join(args.out or ".", "jax-compile-cache")
    if cache != "none":
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(cache))
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    else:  # no cache at all: not the engine's default one either (crosspool_jax.execution.compile_cache)
        os.environ.setdefault("CROSSPOOL_COMPILATION_CACHE", "off")
    probe = in_child("_probe", n_devices=setup.devices)
    if len(probe["devices"]) < setup.devices:
        raise RuntimeError(
            f"preset {args.preset} needs {setup.devices} devices, found {probe['visible']} "
            "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu)")
    arena = setup.arena_bytes
    if arena is None:
        arena = int(((probe["bytes_limit"] or 16 << 30) - probe["bytes_in_use"]) * GPU_ARENA_SHARE)
        # with --resume on the same kind of card, the earlier run's arena: free memory differs
        # by a few MiB between leases, which would not let its modes be kept
        same_card = earlier is not None and earlier["key"].get("device_kind") == probe["device_kind"]
        kept = int(earlier["key"]["setup"]["arena_bytes"]) if same_card else None
        if kept is not None and kept <= arena:
            log(f"bench: --resume: keeping the earlier run's arena ({kept / MIB:.0f} MiB; "
                f"{arena / MIB:.0f} MiB free now)")
            arena = kept
    return probe, probe["platform"], arena


def _results_head(args: argparse.Namespace, setup: Any, trace: Any, order: list[str],
                  plans: dict[str, Any], plat: str, probe: dict[str, Any], arena: int,
                  window: float) -> dict[str, Any]:
    """results.json before any mode has run: the run's identity, the trace, setup and plans."""
    return {
        "benchmark": "crosspool bench (benchmarks/runner.py)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": getattr(args, "command_line", None) or " ".join(sys.argv),
        "machine": {"platform": plat, "device_kind": probe["device_kind"], "devices_used": probe["devices"],
                    "devices_visible": probe["visible"], "host_cpus": os.cpu_count(),
                    "python": _platform.python_version(), "jax": probe["jax"]},
        "preset": args.preset, "trace_file": args.trace, "seed": args.seed, "time_scale": args.time_scale,
        "max_duration_s": args.max_duration_s, "replay_window_s": window, "warmup_passes": args.warmup,
        "compile_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR"),
        "trace": {"requests": len(trace), "models": trace.models, "add_order": order,
                  "duration_s": trace.meta.get("duration_s"),
                  "summary": summarize(trace)},
        "setup": dataclasses.asdict(setup) | {"arena_bytes": arena},
        "memory": plans,
        "slo": None,
        "modes": {},
        "notes": [
            "client clock: TTFT = first token received - stream opened; TBT = gaps between received "
            "tokens, every request pooled (finished, rejected and failed alike); TPOT = (last - first) "
            "/ (n - 1) per finished request; engine_clock: the same from the server's per-token stamps",
            f"tokens are emitted in groups of K = {setup.steps_per_call} per host call, so most gaps "
            "inside a group are ~0",
            "percentiles: numpy linear interpolation; isolated P99 for the SLO: nearest rank",
            "rejected = RESOURCE_EXHAUSTED (live-request limit) or ABORTED 'rejected: ...' (the KV "
            "planner: never fits); failed = any other status, deadline or truncated stream",
            "goodput = requests meeting both SLOs / replay_window_s (the trace duration x time_scale)",
        ],
    }


def _choose_slo(args: argparse.Namespace, earlier: dict[str, Any] | None, trace: Any, setup: Any,
                arena: int, plat: str, log: Callable[[str], None]) -> dict[str, Any]:
    """results["slo"]: the earlier run's (--resume), the fixed one of --slo-ttft-s / --slo-tpot-s,
    or one measured from isolated requests (each shape alone, module docstring)."""
    if earlier is not None:
        slo, rule = earlier["slo"]["per_shape"], earlier["slo"]["rule"]
    elif args.slo_ttft_s is not None or args.slo_tpot_s is not None:
        if args.slo_ttft_s is None or args.slo_tpot_s is None:
            raise ValueError("--slo-ttft-s and --slo-tpot-s go together")
        per = {"ttft_s": args.slo_ttft_s, "tpot_s": args.slo_tpot_s}
        slo = {model_shape(n): {b: per for b, _, _ in LENGTH_BUCKETS} for n in trace.models}
        rule = (f"fixed: TTFT <= {args.slo_ttft_s} s and TPOT <= {args.slo_tpot_s} s "
                "(--slo-ttft-s/--slo-tpot-s)")
    else:
        slo = measure_slo(trace, setup, arena, plat, args.seed, args.slo_scale, args.reference_requests,
                          args.request_timeout, log)
        rule = (f"SLO = {args.slo_scale:g} x the isolated P99 (nearest rank) of TTFT and of mean TPOT per "
                "(model shape, prompt bucket <8K / 8-32K / >=32K): each shape alone in crosspool mode on "
                "the same devices and arena, sent the bucket's longest, median and shortest prompt of "
                f"the trace (up to {args.reference_requests}), one at a time, each twice, the second "
                "measured; a bucket without a finished isolated request has no SLO (its requests miss)")
    return {"rule": rule, "scale": args.slo_scale, "per_shape": slo}


def _replay_mode(mode: str, args: argparse.Namespace, trace: Any, order: list[str],
                 plan: dict[str, Any], setup: Any, window: float, precompile_context: int | None,
                 results: dict[str, Any], log: Callable[[str], None]
                 ) -> tuple[list[Record], dict[str, Any]] | None:
    """Replays the trace in `mode` (a child process), writes its requests / calls / mode_<mode>.json
    to --out and its metrics into results["modes"]; returns (records, run), or None if it failed
    (the error is in results)."""
    out_dir, slo = args.out, results["slo"]["per_shape"]
    recs = [Record(i, r.request_id, r.model, r.prompt_len, r.output_len, r.arrival_s * args.time_scale)
            for i, r in enumerate(trace.requests)]
    log(f"bench {mode}: replaying {len(recs)} requests over {window:.0f} s")
    try:
        job = in_child("_mode_job", mode=mode, models=order, trace_models=trace.models, plan=plan,
                       setup=setup, records=recs, seed=args.seed, label=mode,
                       timeout=args.request_timeout, warmup_passes=args.warmup,
                       precompile_context=precompile_context, api=args.api)
    except RuntimeError as e:  # ChildCrashed included: record it, go on with the next mode
        log(f"bench {mode}: FAILED: {e}")
        results["modes"][mode] = {"error": str(e)}
        return None
    recs, run = job["records"], job["run"]
    calls = run.pop("calls", [])
    spans = run.pop("compile_spans", [])
    v = results["modes"][mode] = mode_metrics(recs, run, slo, window, job["compiles"])
    v["engine"] = run["describe"]
    v["weights"] = run["weights"]
    v["precompile"] = run.get("precompile")
    if run["warmup"]:
        v["warmup"] = [{k: x for k, x in w.items() if k != "t0"} for w in run["warmup"]]
        wc = job["warmup_compiles"]
        v["warmup_compiles"] = {
            "count": len(wc), "step_programs": sum(1 for d in wc if d >= BIG_COMPILE_S),
            "step_program_seconds": round(sum(d for d in wc if d >= BIG_COMPILE_S), 3)}
    with open(os.path.join(out_dir, f"requests_{mode}.jsonl"), "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")
    if calls:
        with open(os.path.join(out_dir, f"calls_{mode}.jsonl"), "w", encoding="utf-8") as f:
            for c in calls:
                f.write(json.dumps(c) + "\n")
        v["calls"] = call_summary(calls) | {"compile_spans": spans}
    with open(os.path.join(out_dir, f"mode_{mode}.json"), "w", encoding="utf-8") as f:  # what --resume keeps
        json.dump({"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                   "metrics": v, "records": [dataclasses.asdict(r) for r in recs],
                   "run": run}, f, default=_json_default)
    log(f"bench {mode}: done in {run['t_end']:.1f} s: TTFT P99 {_fmt_ms(v['ttft_s']['p99'])} ms, "
        f"TBT P99 {_fmt_ms(v['tbt_s']['p99'])} ms, goodput {v['goodput_rps']:.3f} req/s, "
        f"{v['rejected']} rejected, {v['failed']} failed, {v['preemptions']} preemptions, "
        f"pages after {sum(u for _, u, _ in v['pages_after'])}, serving-path compile stalls "
        f"{v['compiles']['serving_blocked_s']:.1f} s ({v['compiles']['fallback_calls']} calls in "
        "a larger program)")
    return recs, run


def run_bench(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """The whole benchmark (module docstring); returns the results dict (also written to --out)."""
    modes = _parse_modes(args.modes)
    setup = resolve_setup(args)
    trace = load_trace(args)
    models = trace.models
    for n in models:
        model_config(n)  # unknown names fail before anything is built
    resume_path = os.path.join(args.out or ".", "resume.json")
    earlier = _load_json(resume_path) if getattr(args, "resume", False) else None
    probe, plat, arena = _probe_devices(args, setup, earlier, log)
    arena -= arena % setup.page_bytes
    order = add_order(models)
    plans = {m: memory_plan(m, order, setup, arena, plat) for m in modes}
    for p in plans.values():
        p["never_fit_predicted"] = never_fit(p, trace, setup, plat) if p["fits"] else None
    window = float(trace.meta.get("duration_s", trace.requests[-1].arrival_s)) * args.time_scale
    results = _results_head(args, setup, trace, order, plans, plat, probe, arena, window)
    if args.plan_only:
        return results
    unfit = {m: p["why"] for m, p in plans.items() if not p["fits"]}
    if unfit:
        raise RuntimeError("the preset's models do not fit: "
                           + "; ".join(f"{m}: {w}" for m, w in unfit.items()))
    out_dir = args.out
    os.makedirs(out_dir, exist_ok=True)
    save_jsonl(trace, os.path.join(out_dir, "trace.jsonl"))
    pre_on = args.precompile == "on" or (args.precompile == "auto" and plat == "gpu")
    precompile_context = (max(r.prompt_len + r.output_len for r in trace.requests) if pre_on else None)
    results["precompile_context"] = precompile_context
    with open(os.path.join(out_dir, "trace.jsonl"), "rb") as f:
        trace_sha = hashlib.sha256(f.read()).hexdigest()
    # what an earlier run's modes must share with this one to be kept by --resume
    resume_key = json.loads(json.dumps(
        {"trace_sha256": trace_sha, "setup": results["setup"], "time_scale": args.time_scale,
         "precompile_context": precompile_context, "warmup_passes": args.warmup,
         "slo_flags": [args.slo_ttft_s, args.slo_tpot_s, args.slo_scale, args.reference_requests],
         "device_kind": probe["device_kind"]}, default=_json_default))
    if earlier is not None and earlier["key"] != resume_key:
        diff = sorted(k for k in resume_key if earlier["key"].get(k) != resume_key[k])
        log(f"bench: --resume: the run in {out_dir} differs in {', '.join(diff)}; starting afresh")
        earlier = None
    for m, p in plans.items():
        kvf = p.get("kv_fraction", p.get("kv_fraction_kv_device"))
        log(f"bench plan {m}: arena {arena / MIB:.2f} MiB per device, {p['weights_pages']} weights pages, "
            f"KV {kvf:.1%} of each KV-holding device, {p['kv_pages_total']} KV pages in all"
            + (f"; never-fit requests (predicted) {p['never_fit_predicted']}"
               if p["never_fit_predicted"] else ""))
    results["slo"] = _choose_slo(args, earlier, trace, setup, arena, plat, log)
    if earlier is None:
        with open(resume_path, "w", encoding="utf-8") as f:
            json.dump({"key": resume_key, "slo": results["slo"]}, f, indent=1, default=_json_default)
    records: dict[str, list[Record]] = {}
    runs: dict[str, dict[str, Any]] = {}
    for mode in modes:
        done_path = os.path.join(out_dir, f"mode_{mode}.json")
        if earlier is not None and os.path.isfile(done_path):
            with open(done_path, encoding="utf-8") as f:
                done = json.load(f)
            results["modes"][mode] = done["metrics"]
            records[mode] = [Record(**r) for r in done["records"]]
            runs[mode] = done["run"]
            log(f"bench {mode}: kept from the earlier run in {out_dir} (--resume; ran {done['date']})")
            continue
        ran = _replay_mode(mode, args, trace, order, plans[mode], setup, window, precompile_context,
                           results, log)
        if ran is not None:
            records[mode], runs[mode] = ran
    files = write_plot_data(out_dir, records, runs)
    pngs = write_plots(out_dir, records, runs, args.preset)
    results["files"] = ["results.json", "trace.jsonl", *(f"requests_{m}.jsonl" for m in records),
                        *(f"calls_{m}.jsonl" for m in records
                          if "calls" in results["modes"].get(m, {})), *files,
                        *pngs]
    if not pngs:
        results["notes"].append("matplotlib is not installed: the plot data is in tbt_cdf.csv and "
                                "kv_pages.csv, no PNG was drawn")
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=_json_default)
    return results


def _load_json(path: str) -> Any:
    """The JSON file at `path`, or None when there is none."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer | np.floating):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench flags (shared by `crosspool bench` and `python -m benchmarks.runner`)."""
    p.add_argument("--preset", required=True, metavar="NAME",
                   help=f"workload preset (its setup: devices, pools, arena): {', '.join(PRESETS)}")
    p.add_argument("--trace", default=None, metavar="FILE.jsonl", help="replay this trace instead of "
                   "generating the preset's (the preset still picks devices and memory)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated (default: all three)")
    p.add_argument("--resume", action="store_true",
                   help="keep the modes that an earlier run in --out finished with the same trace, setup "
                        "and SLO (its mode_<mode>.json) and run only the others, so a comparison split "
                        "over several calls (e.g. one mode per call) still ends in one report")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default bench-<preset>)")
    p.add_argument("--seed", type=int, default=0, help="trace, prompt and random-weights seed (default 0)")
    p.add_argument("--time-scale", type=float, default=1.0, metavar="X",
                   help="request i is sent at arrival_s * X (0.5: twice as fast; default 1)")
    p.add_argument("--max-duration-s", type=float, default=None, metavar="S",
                   help="keep only the requests arriving in the trace's first S seconds")
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="replay the trace N times, unmeasured, on each mode's engine before the measured "
                        "replay (compiles most step programs first; default 0: a cold server)")
    p.add_argument("--precompile", choices=("auto", "on", "off"), default="auto",
                   help="compile every one-lane step program of the shape grid (up to the trace's "
                        "longest request) before each mode serves, in threads, unmeasured "
                        "(PooledEngine.precompile); auto: on for GPU platforms")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX persistent compilation cache shared by the modes' processes (default: "
                        "OUT/jax-compile-cache; 'none': off). On GPU the cache key ignores which device a "
                        "program runs on, so shared's second GPU and static reuse shared's programs")
    p.add_argument("--api", choices=("grpc", "openai"), default="grpc",
                   help="replay the measured passes over gRPC (default) or over the server's "
                   "OpenAI-compatible HTTP API (streamed /v1/completions; client-clock latencies only)")
    p.add_argument("--slo-scale", type=float, default=5.0, help="SLO = this x the isolated P99 (default 5)")
    p.add_argument("--reference-requests", type=int, default=3, metavar="N",
                   help="isolated requests per (shape, prompt bucket) for the SLO (1-3, default 3)")
    p.add_argument("--slo-ttft-s", type=float, default=None, help="fixed TTFT SLO (skips the isolated runs)")
    p.add_argument("--slo-tpot-s", type=float, default=None, help="fixed TPOT SLO (with --slo-ttft-s)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="gRPC deadline of each stream (a request past it fails; default 600)")
    g = p.add_argument_group("setup overrides (default: the preset's)")
    g.add_argument("--devices", type=int, default=None, help="devices used by every mode")
    g.add_argument("--pools", default=None, metavar="KV+W", help="crosspool split of those devices")
    g.add_argument("--arena-mib", type=float, default=None, help="arena per device (MiB), every mode")
    g.add_argument("--max-live-requests", type=int, default=None, metavar="N")
    g.add_argument("--steps-per-call", type=int, default=None, metavar="K")
    g.add_argument("--prefill-share", type=float, default=None, metavar="F",
                   help="the engine's prefill_share (default: the engine's, 0.8)")
    g.add_argument("--max-prefill-tokens", type=int, default=None, metavar="T",
                   help="the engine's max_prefill_tokens: most prompt tokens a step prefills "
                        "(default: the preset's; the engine's GPU default on the GPU presets)")
    g.add_argument("--mixed-steps", action="store_true",
                   help="the engine's mixed_steps: decoding requests take one token each as rows of "
                        "their lane's prefill call in steps that prefill")
    g.add_argument("--compile-process", default=None, action=argparse.BooleanOptionalAction,
                   help="the engine's compile_process: step programs are traced, lowered and compiled "
                        "in worker processes (default: the engine's, on for GPU, off on CPU)")
    g.add_argument("--compile-workers", type=int, default=None, metavar="N",
                   help="the engine's compile_workers: background compiles at once (with "
                        "--compile-process: worker processes; default: the engine's, 4 per engine "
                        "on GPU shared out among its groups, else 1)")
    g.add_argument("--attention-kernels", default=None, choices=("triton", "auto", "mosaic"),
                   help="the engine's attention_kernels (default auto: the Mosaic GPU "
                        "kernels on Hopper where measured faster, docs/kernels.md)")
    from serving.cli import add_admission_flags

    add_admission_flags(g)
    p.add_argument("--plan-only", action="store_true",
                   help="print the per-mode memory plan as JSON and exit (no engine; without GPUs the "
                        f"GPU presets assume a {ASSUMED_GPU_ARENA_BYTES / 2**30:.0f} GiB arena)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main_args(args: argparse.Namespace) -> int:
    """Runs the bench from parsed flags; prints the table (or the plan) on stdout."""
    if args.preset not in PRESETS and not args.trace:
        raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    if not 1 <= args.reference_requests <= 3:
        raise ValueError("--reference-requests must be 1, 2 or 3")
    if args.time_scale <= 0:
        raise ValueError("--time-scale must be > 0")
    args.out = args.out or f"bench-{args.preset}"
    res = run_bench(args, _log)
    if args.plan_only:
        print(json.dumps({"setup": res["setup"], "memory": res["memory"]}, indent=1))
        return 0
    print(format_table(res))
    print(f"results: {os.path.join(args.out, 'results.json')}")
    failed = {m: v["error"] for m, v in res["modes"].items() if "error" in v}
    lost = {m: v["lost"] for m, v in res["modes"].items() if v.get("lost")}
    if failed:
        print(f"modes that did not run to the end: {failed}", file=sys.stderr)
    if lost:
        print(f"LOST requests: {lost}", file=sys.stderr)
    return 1 if failed or lost else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.runner", description=__doc__.split("\n")[0])
    add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.command_line = " ".join(["python -m benchmarks.runner", *argv])
    try:
        return main_args(args)
    except (ValueError, RuntimeError, TraceFormatError, OSError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # run as benchmarks.runner, so child processes find the same module
    from benchmarks.runner import main as _main

    sys.exit(_main())
