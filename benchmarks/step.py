"""Decode-step benchmark of the pooled step (issue 5): crosspool (KV pool + weights pool on two GPUs)
as the lowered one-program step and as the engine's host-scheduled step
(`crosspool_jax/execution/host_step.py`) vs the same model colocated on one GPU, against the
roofline of ../shared/DESIGN.md. "calls/tok" in the table: host calls per decode step (one token
per sequence).

    PYTHONPATH=. python -m benchmarks.step [--model olmoe] [--batch 32] [--context 2048]
        [--steps-per-call 4] [--iters 10] [--json OUT]

Needs >= 2 GPUs (crosspool 1+1). Weights are random at real sizes, written straight into the
arenas on the device (`jax.random`, no host copy); the KV pages hold random values; timing does not
depend on values. Each variant is compiled once, warmed up, then timed over `--iters` calls of K
decode steps each; the table gives ms per decode step (call time / K).

Correctness first: a tiny model (demo-mixtral, float32 arena) generates through the crosspool and
the colocated group on these GPUs and must match the reference path token for token.

Roofline (bytes that must be read per decode step / copy bandwidth measured in this run): the
attention-side weights (norms, qkv, o), the LM head, the routers, the routed experts the batch
touches (expected distinct experts per layer for uniform routing, E * (1 - (1 - k/E)^B)), shared
/ dense FFN, and the KV of every active token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import copy_bandwidth
from crosspool_jax.execution.host_step import HostScheduledStep
from crosspool_jax.execution.pooled_step import (
    LaneShape,
    StepSpec,
    build_step,
    empty_lane_inputs,
    model_geometry,
    one_model_group_inputs,
)
from crosspool_jax.memory.arena import ArenaStore, model_rows
from crosspool_jax.memory.topology import PoolTopology, Role
from crosspool_jax.models.config import ModelConfig, from_hf_config
from crosspool_jax.models.params import weight_specs
from pallas_kernels.page_layout import PoolLayout


def olmoe_config(**hf_overrides: Any) -> ModelConfig:
    """OLMoE-1B-7B shapes: 16 layers, D 2048, 16 heads x 128, 64 experts top-8, I 1024
    (`hf_overrides`: config.json keys to change, e.g. a smaller OLMoE for CPU runs)."""
    return from_hf_config({
        "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "vocab_size": 50304,
        "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "num_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        **hf_overrides,
    })


def qwen3_config() -> ModelConfig:
    """Qwen3-30B-A3B shapes: 48 layers, D 2048, 32 q heads / 4 kv heads x 128, 128 experts top-8."""
    return from_hf_config({
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    })


def demo_config() -> ModelConfig:
    """demo-mixtral (tiny; a CPU smoke run of this script)."""
    from crosspool_jax.demo import demo_configs

    return demo_configs()["demo-mixtral"]


MODELS = {"olmoe": olmoe_config, "qwen3-30b-a3b": qwen3_config, "demo": demo_config}


def roofline_bytes(cfg: ModelConfig, batch: int, context: int, kv_bytes_per_token_layer: int) -> dict:
    """Bytes one decode step must read (module docstring)."""
    specs = weight_specs(cfg, jnp.bfloat16)
    leaves = jax.tree_util.tree_flatten_with_path(specs)[0]
    out = {"attn": 0, "lm_head": 0, "router": 0, "experts": 0, "shared_dense": 0}
    for path, s in leaves:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        n = int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize
        if name.endswith("embed"):
            out["attn"] += batch * cfg.hidden_size * 2
            if cfg.tie_word_embeddings:
                out["lm_head"] += n
        elif name.endswith("lm_head"):
            out["lm_head"] += n
        elif "/moe/w_" in name:
            e, k = cfg.num_experts, cfg.top_k
            touched = e * (1 - (1 - k / e) ** batch)
            out["experts"] += int(n * touched / e)
        elif "router" in name:
            out["router"] += n
        elif ".ffn" in name or "ffn" in name.split("/")[0]:
            out["shared_dense"] += n
        else:
            out["attn"] += n
    out["kv"] = batch * context * kv_bytes_per_token_layer * cfg.num_layers
    out["total"] = sum(out.values())
    return out


def fill_random(store: ArenaStore, seed: int = 0) -> None:
    """Every arena element ~ N(0, 0.02^2) in the arena dtype, generated on the devices."""
    shape, dtype, sharding = store.arena.shape, store.arena.dtype, store.sharding
    store.arena = jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype),
                          out_shardings=sharding)(jax.random.key(seed))


def build_store(cfg: ModelConfig, topology: PoolTopology | None, colocated: jax.Device | None,
                layout: PoolLayout, kv_pages: int) -> tuple[ArenaStore, int]:
    """Arena sized for the model + `kv_pages` KV pages; model planned (rows allocated) from specs."""
    specs = weight_specs(cfg, jnp.bfloat16)
    rows = model_rows(cfg, specs, 1, layout)
    rpp = layout.rows_per_page
    if colocated is not None:
        a_pages, f_pages = -(-(rows[Role.KV] + rows[Role.WEIGHTS]) // rpp) + 1, 0
    else:
        a_pages, f_pages = -(-rows[Role.KV] // rpp) + 1, -(-rows[Role.WEIGHTS] // rpp) + 1
    num_pages = max(a_pages + kv_pages, f_pages)
    store = ArenaStore(topology, dataclasses.replace(layout, num_pages=num_pages), a_pages,
                       colocated=colocated)
    store.models["m"] = store.plan_model("m", cfg, specs)
    fill_random(store)
    return store, a_pages


def decode_inputs(store: ArenaStore, cfg: ModelConfig, tpp: int, batch: int, context: int, k: int,
                  rng: np.random.Generator, slots: int | None = None, pages: int | None = None
                  ) -> dict[str, np.ndarray]:
    """Lane inputs: `batch` requests on KV device 0, each with `context` tokens of KV, decoding.

    slots: the lane's slots (default `batch`; the rest are empty, as in a bucket the engine pads);
    pages: the page table's width per slot and layer (default the next power of 2 of the pages
    `context` needs)."""
    n = store.num_devices
    L = cfg.num_layers
    pages_per = -(-(context + k) // tpp)
    P = pages or 1 << (pages_per - 1).bit_length()
    slots = slots or batch
    if slots < batch or pages_per > P:
        raise SystemExit(f"{batch} requests of {pages_per} pages do not fit {slots} slots x {P} pages")
    base = store.kv_first_page
    need = batch * pages_per * L
    if need > store.kv_pages:
        raise SystemExit(f"need {need} KV pages, the arena has {store.kv_pages}")
    arr = empty_lane_inputs(n, slots, slots, L, P, 1, decode=True)
    perm = rng.permutation(store.kv_pages)[:need] + base
    live = slice(0, batch)
    arr["tokens"][0, live] = rng.integers(0, cfg.vocab_size, batch)
    arr["positions"][0, live] = context
    arr["tok_slot"][0, live] = np.arange(batch)
    arr["tail_pages"][0, live, :, :pages_per] = perm.reshape(batch, L, pages_per)
    arr["tail_len"][0, live] = context + 1
    arr["sample_row"][0, live] = np.arange(batch)
    arr["remaining"][0, live] = k
    return arr


def time_variant(store: ArenaStore, cfg: ModelConfig, platform: str, batch: int, context: int,
                 k: int, iters: int, micro_batches: int, matmul_backend: str | None,
                 strategy: str = "lowered") -> dict[str, Any]:
    """ms per decode step of one variant; strategy "lowered" (`build_step`) or "host" (the
    engine's host-scheduled step, `HostScheduledStep`, same spec and inputs)."""
    geom = model_geometry(cfg, store.layout, platform)
    rng = np.random.default_rng(0)
    arr = decode_inputs(store, cfg, geom.tokens_per_page, batch, context, k, rng)
    P = arr["tail_pages"].shape[-1]
    lanes, inputs = [], []
    if micro_batches == 1:
        parts = [arr]
    else:
        h = batch // micro_batches
        parts = [{key: v[:, i * h:(i + 1) * h] for key, v in arr.items()} for i in range(micro_batches)]
        for p in parts:
            p["tok_slot"] = np.where(p["tok_slot"] >= 0, np.arange(h)[None], -1).astype(np.int32)
            p["sample_row"] = np.where(p["sample_row"] >= 0, np.arange(h)[None], -1).astype(np.int32)
    for p in parts:
        b = p["tokens"].shape[1]
        p.update(one_model_group_inputs(store, "m", [int((p["tok_slot"][0] >= 0).sum())], b, b))
        lanes.append(LaneShape(store.models["m"].cls, 1, b, b, P))
        inputs.append({key: jax.device_put(v.reshape(-1, *v.shape[2:]), store.sharding)
                       for key, v in p.items()})
    cpu = platform == "cpu"  # a smoke run: plain-XLA attention and matmuls (no GPU kernels)
    spec = StepSpec(tuple(lanes), True, k, "reference" if cpu else None,
                    matmul_backend="reference" if cpu else matmul_backend)
    prog = (build_step(spec, store, platform) if strategy == "lowered"
            else HostScheduledStep(spec, store, platform))
    t0 = time.perf_counter()
    store.arena, out = prog(store.arena, tuple(inputs))
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        store.arena, out = prog(store.arena, tuple(inputs))
    jax.block_until_ready(out)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        store.arena, out = prog(store.arena, tuple(inputs))
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
    toks = np.asarray(out[0])
    calls = 1.0 / k if strategy == "lowered" else prog.calls_per_step
    return {"ms_per_step": float(np.median(ts)) / k * 1e3, "compile_s": compile_s,
            "host_calls_per_token": calls, "valid_tokens": int((toks >= 0).sum()),
            "kv_bytes_per_token_layer": geom.bytes_per_token_used}


def check_correctness(devs: list[jax.Device]) -> dict[str, Any]:
    """demo-mixtral + demo-deepseek-v3 (float32 arena) through crosspool 1+1 and colocated vs reference."""
    from crosspool_jax.demo import demo_models
    from crosspool_jax.execution.pool_runner import GroupRunner
    from crosspool_jax.execution.sampling import SamplingParams
    from crosspool_jax.models.reference import ReferenceGenerator

    models = demo_models()
    names = ["demo-mixtral", "demo-deepseek-v3"]
    layout = PoolLayout(16384, "float32", 64, 2048)
    out = {}
    for label, runner in (
        ("crosspool 1+1", GroupRunner(PoolTopology.split("1+1", devs), layout, 1024, platform="gpu")),
        ("crosspool 1+1 host-scheduled", GroupRunner(PoolTopology.split("1+1", devs), layout, 1024,
                                                     platform="gpu", execution="host")),
        ("colocated", GroupRunner(None, layout, 1024, colocated=devs[0], platform="gpu")),
    ):
        ok = True
        for nm in names:
            m = models[nm]
            w = jax.tree.map(lambda a: a.astype(jnp.float32), m.weights)
            runner.add_model(nm, m.config, w)
            prompt = [3, 17, 42, 99, 5, 250, 7][: 4 + len(nm) % 3]
            ref = list(ReferenceGenerator(m.config, w).generate(prompt, 16).token_ids)
            runner.submit(nm, nm, prompt, 16, SamplingParams())
            got: list[int] = []
            while runner.has_work:
                got += runner.step().tokens.get(nm, [])
            ok &= got == ref
            out[f"{label} {nm}"] = got == ref
        out[label] = ok
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="olmoe")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps-per-call", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", default=None,
                    help="comma-separated substrings: run only variants whose label contains one")
    args = ap.parse_args()
    devs = jax.devices()
    if len(devs) < 2:
        print("one device: only the colocated variants run (crosspool 1+1 needs 2)", flush=True)
    res: dict[str, Any] = {"device": devs[0].device_kind, "devices": len(devs), "args": vars(args)}
    if not args.skip_check and devs[0].platform != "cpu" and len(devs) >= 2:
        res["correctness"] = check_correctness(devs)
        print("correctness:", res["correctness"], flush=True)
    cfg = MODELS[args.model]()
    platform = "gpu" if devs[0].platform in ("gpu", "cuda") else "cpu"
    bw = copy_bandwidth(1 << 31)  # the kernels benchmark's measure: 2 GiB x + 1, async calls
    res["copy_bandwidth_GBps"] = bw / 1e9
    layout = PoolLayout(65536, "bfloat16", 128, 1)
    geom = model_geometry(cfg, dataclasses.replace(layout, num_pages=1), platform)
    geom_bytes, tpp = geom.bytes_per_token_used, geom.tokens_per_page
    kv_pages = args.batch * cfg.num_layers * (-(-(args.context + args.steps_per_call) // tpp)) + 8
    roof = roofline_bytes(cfg, args.batch, args.context, geom_bytes)
    res["roofline_bytes"] = roof
    roof_ms = roof["total"] / bw * 1e3
    res["roofline_ms"] = roof_ms
    rows = []
    k = args.steps_per_call
    variants = [  # label, devices, micro-batches, matmul backend, K, strategy
        ("crosspool 1+1", "pool", 1, "gpu", k, "lowered"),
        ("crosspool 1+1 ping-pong", "pool", 2, "gpu", k, "lowered"),
        ("crosspool 1+1 K=1", "pool", 1, "gpu", 1, "lowered"),
        ("crosspool 1+1 XLA matmul", "pool", 1, "reference", k, "lowered"),
        ("crosspool 1+1 host-scheduled", "pool", 1, "gpu", k, "host"),
        ("crosspool 1+1 host-scheduled ping-pong", "pool", 2, "gpu", k, "host"),
        ("colocated 1 GPU", "coloc", 1, "gpu", k, "lowered"),
        ("colocated 1 GPU XLA matmul", "coloc", 1, "reference", k, "lowered"),
    ]
    if args.variants:
        keep = [v.strip() for v in args.variants.split(",")]
        variants = [v for v in variants if any(k == v[0] for k in keep)]
    if len(devs) < 2:
        variants = [v for v in variants if v[1] == "coloc"]
    stores: dict[str, ArenaStore] = {}
    for label, kind, mb, mm, kk, strategy in variants:
        if kind not in stores:
            stores.clear()
            topo = PoolTopology.split("1+1", devs) if kind == "pool" else None
            stores[kind], _ = build_store(cfg, topo, devs[0] if kind == "coloc" else None, layout, kv_pages)
        try:
            r = time_variant(stores[kind], cfg, platform, args.batch, args.context, kk, args.iters, mb, mm,
                             strategy)
        except Exception as e:  # report and go on: one failing variant must not hide the others
            r = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
        r["label"] = label
        rows.append(r)
        print(json.dumps(r), flush=True)
    res["rows"] = rows
    coloc = next((r["ms_per_step"] for r in rows if r["label"] == "colocated 1 GPU" and "ms_per_step" in r),
                 math.nan)  # nan when the colocated variant was not run
    print(f"\n{res['device']} x{len(devs)}; {args.model} batch {args.batch} x {args.context} ctx; "
          f"copy BW {bw / 1e9:.0f} GB/s; roofline {roof_ms:.3f} ms/step ({roof['total'] / 1e9:.2f} GB)")
    print(f"{'variant':40s} {'ms/step':>9s} {'/coloc':>7s} {'/roof':>7s} {'calls/tok':>9s}")
    for r in rows:
        if "ms_per_step" not in r:
            print(f"{r['label']:40s} ERROR {r['error'][:80]}")
            continue
        print(f"{r['label']:40s} {r['ms_per_step']:9.3f} {r['ms_per_step'] / coloc:7.2f} "
              f"{r['ms_per_step'] / roof_ms:7.2f} {r['host_calls_per_token']:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
