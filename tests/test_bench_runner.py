"""`crosspool bench` (benchmarks/runner.py): a shortened cpu-tiny replay through all three modes
(the first 3.6 s of the trace, time-compressed 4x, at most 2 live requests so one is refused) in a
subprocess, checking the result JSON has every metric, no request is lost, and pages are back to 0
after each mode; plus the memory plan and the metric helpers."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import runner

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODE_KEYS = {
    "requests", "finished", "rejected", "failed", "lost", "short_streams", "ttft_s", "tbt_s", "tpot_p99_s",
    "slo_met", "goodput_rps", "goodput_fraction", "kv_pages", "pages_after", "live_after", "preemptions",
    "rejection_reasons", "failure_reasons", "engine_clock", "compiles", "per_model", "replay_s", "engine",
    "ready_s",
}


def test_bench_cpu_tiny_short_all_modes(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench"
    # XLA_FLAGS inherited: conftest's 8 CPU devices and scripts/test.sh's compile-speed flags
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.runner", "--preset", "cpu-tiny", "--max-duration-s", "3.6",
           "--time-scale", "0.25", "--reference-requests", "1", "--max-live-requests", "2",
           "--out", str(out)]
    # two invocations: crosspool and shared, then --resume with all three keeps those two (same
    # trace, setup, SLO) and runs only static: one report over modes run in separate calls
    p = subprocess.run([*cmd, "--modes", "crosspool,shared"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "bench crosspool: replaying 3 requests" in p.stderr  # progress is shown
    first = json.loads((out / "results.json").read_text())
    assert set(first["modes"]) == {"crosspool", "shared"}
    p = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-4000:]
    for mode in ("crosspool", "shared"):
        assert f"bench {mode}: kept from the earlier run" in p.stderr, p.stderr[-2000:]
    assert "bench static: replaying 3 requests" in p.stderr and "bench reference" not in p.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["slo"] == first["slo"]
    for mode in ("crosspool", "shared"):
        kept, before = (json.dumps(r["modes"][mode], sort_keys=True) for r in (res, first))
        assert kept == before, mode
    assert set(res["modes"]) == {"crosspool", "shared", "static"}
    assert res["slo"]["rule"] and res["slo"]["per_shape"]["demo-mixtral"]["<8K"]["ttft_s"] > 0
    assert {"arena_bytes", "devices", "crosspool_pools"} <= set(res["setup"])
    arenas = {p["arena_bytes"] for p in res["memory"].values()}
    assert len(arenas) == 1  # the same memory per device in every mode
    for f in res["files"]:
        assert (out / f).is_file(), f
    for mode, m in res["modes"].items():
        assert set(m) >= MODE_KEYS, (mode, MODE_KEYS - set(m))
        assert set(m["ttft_s"]) == {"p50", "p90", "p99"}
        assert set(m["tbt_s"]) == {"p50", "p90", "p99", "p99_9"}
        assert m["requests"] == 3 and m["lost"] == 0
        assert m["finished"] + m["rejected"] + m["failed"] == 3
        assert m["finished"] >= 1 and m["short_streams"] == 0
        assert all(used == 0 for _, used, _ in m["pages_after"]), (mode, m["pages_after"])
        assert m["live_after"] == 0
        assert m["ttft_s"]["p99"] is not None and m["tbt_s"]["p99_9"] is not None
        assert m["goodput_rps"] is not None and m["kv_pages"]["peak"] > 0
        recs = [json.loads(line) for line in (out / f"requests_{mode}.jsonl").read_text().splitlines()]
        assert len(recs) == 3
        # the measured pass's program calls: every finished request's prompt was prefilled in them
        calls = [json.loads(line) for line in (out / f"calls_{mode}.jsonl").read_text().splitlines()]
        assert m["calls"]["decode_calls"] + m["calls"]["prefill_calls"] == len(calls) > 0
        assert sum(c["prefill_tokens"] for c in calls) >= sum(
            r["prompt_len"] for r in recs if r["outcome"] == "finished")
        assert all(c["ready"] >= c["dispatched"] and c["lanes"].startswith("[G") for c in calls)
        # every call carried a request; a decode call's requests had their prompts' KV at least
        assert all(c["requests"] >= 1 for c in calls)
        assert all(c["kv_tokens"] >= c["requests"] for c in calls if c["decode"])
        assert all(0 <= start <= end for _, start, end, _ in m["calls"]["compile_spans"])
        for r in recs:
            assert r["outcome"] in ("finished", "rejected", "failed") and r["reason"], r
            if r["outcome"] == "finished":
                assert len(r["token_s"]) == r["output_len"] and r["reason"] == "length"
            if r["outcome"] == "rejected":
                assert r["reason"].startswith("RESOURCE_EXHAUSTED")
    header = (out / "kv_pages.csv").read_text().splitlines()[0]
    assert header == "mode,t_s,device,pages_used,pages_total"
    for png in ("tbt_cdf.png", "kv_pages.png"):  # matplotlib is a dev dependency
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_memory_plan_cpu_tiny() -> None:
    setup = runner.setup_for("cpu-tiny-uniform")
    assert setup is runner.SETUPS["cpu-tiny"]
    models = runner.add_order(["demo-qwen3-moe", "demo-mixtral", "demo-deepseek-v3"])
    assert models[0] == "demo-mixtral"  # heaviest first
    plans = {m: runner.memory_plan(m, models, setup, setup.arena_bytes, "cpu") for m in runner.MODES}
    for p in plans.values():
        assert p["fits"] and p["arena_bytes"] == setup.arena_bytes
        assert int(p["pages_per_device"] * p["weights_fraction"]) == p["weights_pages"]
    cp, sh, st = plans["crosspool"], plans["shared"], plans["static"]
    assert cp["kv_pages_total"] == cp["pages_per_device"] - cp["weights_pages"]  # one KV device (1+1)
    placed = [d["models"] for d in sh["placement"]]
    assert placed == [["demo-mixtral"], ["demo-qwen3-moe", "demo-deepseek-v3"]]
    caps = st["static_kv_cap_pages"]
    assert caps["demo-mixtral"] == st["kv_pages_per_device"]
    assert caps["demo-qwen3-moe"] == caps["demo-deepseek-v3"] == st["kv_pages_per_device"] // 2


def test_metric_helpers() -> None:
    assert runner.pct([], (50, 99.9)) == {"p50": None, "p99_9": None}
    assert runner.pct([1.0, 2.0, 3.0], (50,)) == {"p50": 2.0}
    assert runner.nearest_rank_p99([3.0, 1.0, 2.0]) == 3.0
    assert [runner.bucket_of(n) for n in (1, 8191, 8192, 32768)] == ["<8K", "<8K", "8-32K", ">=32K"]
    assert runner.prompt_ids(0, 5, 4, 258) == runner.prompt_ids(0, 5, 4, 258)
    assert all(0 <= t < 258 for t in runner.prompt_ids(1, 2, 100, 258))
    rec = runner.Record(0, "r", "demo-mixtral", 10, 3, 0.0, sent_s=1.0, token_s=[1.5, 1.6, 1.8],
                        outcome="finished", reason="length")
    assert rec.ttft == pytest.approx(0.5) and rec.tpot == pytest.approx(0.15)
    slo = {"demo-mixtral": {"<8K": {"ttft_s": 0.6, "tpot_s": 0.2}}}
    assert runner.meets_slo(rec, slo)
    assert not runner.meets_slo(rec, {"demo-mixtral": {"<8K": {"ttft_s": 0.4, "tpot_s": 0.2}}})
    assert not runner.meets_slo(rec, {})  # no SLO for its bucket: a miss
    import grpc

    assert runner._classify(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")[0] == "rejected"
    assert runner._classify(grpc.StatusCode.ABORTED, "rejected: never fits")[0] == "rejected"
    assert runner._classify(grpc.StatusCode.ABORTED, "model unloaded")[0] == "failed"


def test_engine_flags_reach_the_engine_config() -> None:
    """`--attention-kernels`, `--compile-workers`, `--compile-process`, `--max-prefill-tokens` set
    the bench's setup and the `EngineConfig` each mode's engine gets; the defaults are the
    engine's (the preset's for `--max-prefill-tokens`)."""
    import argparse

    p = argparse.ArgumentParser()
    runner.add_arguments(p)
    plan = {"arena_bytes": 1 << 24, "weights_fraction": 0.5}
    default = runner._engine_config(runner.resolve_setup(p.parse_args(["--preset", "cpu-tiny"])), plan)
    assert (default.attention_kernels, default.compile_workers, default.compile_process) == (
        "auto", None, None)  # None: the engine's platform default (`engine.resolve_config`)
    args = p.parse_args(["--preset", "cpu-tiny", "--attention-kernels", "triton",
                         "--compile-workers", "3", "--compile-process"])
    cfg = runner._engine_config(runner.resolve_setup(args), plan)
    assert (cfg.attention_kernels, cfg.compile_workers, cfg.compile_process) == ("triton", 3, True)
    args = p.parse_args(["--preset", "cpu-tiny", "--no-compile-process"])
    assert runner._engine_config(runner.resolve_setup(args), plan).compile_process is False
    assert default.max_prefill_tokens == 512  # cpu-tiny's
    from crosspool_jax.engine import GPU_MAX_PREFILL_TOKENS

    assert runner.setup_for("gpu-2").max_prefill_tokens == GPU_MAX_PREFILL_TOKENS == 4096
    args = p.parse_args(["--preset", "cpu-tiny", "--max-prefill-tokens", "1024"])
    assert runner._engine_config(runner.resolve_setup(args), plan).max_prefill_tokens == 1024
    assert (default.admission_backfill, default.starving_after_steps) == (True, 20)
    args = p.parse_args(["--preset", "cpu-tiny", "--no-admission-backfill", "--starving-after-steps", "0"])
    cfg = runner._engine_config(runner.resolve_setup(args), plan)
    assert (cfg.admission_backfill, cfg.starving_after_steps) == (False, None)  # 0: never
    args = p.parse_args(["--preset", "cpu-tiny", "--starving-after-steps", "5"])
    assert runner._engine_config(runner.resolve_setup(args), plan).starving_after_steps == 5
    # ... and the planner of each of its device groups
    from crosspool_jax.engine import resolve_config, runner_kwargs
    from crosspool_jax.errors import InvalidRequestError

    planner = runner_kwargs(resolve_config(cfg, "cpu"), "cpu")["planner_config"]
    assert (planner.admission_backfill, planner.starving_after_steps) == (False, None)
    with pytest.raises(InvalidRequestError, match="starving_after_steps"):
        runner_kwargs(resolve_config(dataclasses.replace(cfg, starving_after_steps=0), "cpu"), "cpu")
