"""`benchmarks/gpu_smoke.sh`, the one-GPU smoke replay's device-call script, with the bench
replaced by a stand-in (`PYTHON`): each variant's flags reach the bench, its log holds the gaps
summary and the headline numbers, its run directory comes back packed, and a failing variant
does not stop the next one but sets the exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the stand-in interpreter: `-m benchmarks.runner ... --out DIR` copies the run in $FAKE_RUN to DIR
# and fails when its flags hold --fail; anything else runs on the real interpreter ($REAL_PY)
STAND_IN = """#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = benchmarks.runner ]; then
    out=""; prev=""
    for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
    echo "flags: $*"
    echo "cwd: $PWD"
    case " $* " in *" --fail "*) echo "bench failed" >&2; exit 3;; esac
    mkdir -p "$out/jax-compile-cache" && cp "$FAKE_RUN"/* "$out"/
    exit 0
fi
exec "$REAL_PY" "$@"
"""


def _fake_run(path: Path) -> None:
    """Two decode calls around one prefill call that ran padded; the headline numbers."""
    path.mkdir()
    calls = [dict(dispatched=0.0, ready=0.02, busy=0.02, decode=True, compiled=False, requests=2,
                  prefill_tokens=0),
             dict(dispatched=0.02, ready=0.05, busy=0.03, decode=False, compiled=True, requests=1,
                  prefill_tokens=512),
             dict(dispatched=0.05, ready=0.07, busy=0.02, decode=True, compiled=False, requests=2,
                  prefill_tokens=0)]
    (path / "calls_shared.jsonl").write_text("".join(json.dumps(c) + "\n" for c in calls))
    reqs = [dict(index=i, model="m", prompt_len=100 * (i + 1), arrival_s=0.0, token_s=[0.5 + i])
            for i in range(2)]
    (path / "requests_shared.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    shared = {"finished": 2, "ttft_s": {"p99": 1.5}, "decode_call_s": 0.02}
    (path / "results.json").write_text(json.dumps({"modes": {"shared": shared}}))


def test_variants_run_in_turn_and_come_back_packed(tmp_path) -> None:
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    _fake_run(tmp_path / "run")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(stand_in), REAL_PY=sys.executable, FAKE_RUN=str(tmp_path / "run"),
               OUT=str(out), LIMIT="60")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"),
                           "cold", "--warmup 0 --precompile off", "bad", "--fail", "warm", "--precompile on"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the failed variant's status
    assert sorted(p.name for p in out.iterdir()) == ["bad.log", "cold.log", "cold.tgz", "warm.log",
                                                     "warm.tgz"]
    cold = (out / "cold.log").read_text()
    assert "--warmup 0 --precompile off --out /tmp/gpu_smoke_cold" in cold
    assert f"--trace {ROOT}/benchmarks/traces/gpu1_smoke_4olmoe_40s.jsonl" in cold
    assert f"cwd: {ROOT}\n" in cold  # this checkout's code
    assert "2 gaps between decode calls" not in cold and "1 gaps between decode calls" in cold
    assert "'decode_call_s': 0.02" in cold and "rc=0" in cold
    # decode_costs ran on the log too (two decode calls are too few for its fit: it says so)
    assert "2 decode calls: at least 3 are needed for the fit" in cold
    assert "#0 (100 tokens, first token at 0.50 s)" in cold  # ttft_tail: #1 waited behind #0
    assert "bench failed" in (out / "bad.log").read_text() and "rc=3" in (out / "bad.log").read_text()
    with tarfile.open(out / "warm.tgz") as tar:
        names = set(tar.getnames())
    assert {"./results.json", "./calls_shared.jsonl", "./gaps.json", "./ttft_tail.json"} <= names
    assert not any("jax-compile-cache" in n for n in names)
    gaps = json.loads(Path("/tmp/gpu_smoke_warm/gaps.json").read_text())
    assert gaps["gaps"] == 1 and gaps["tail"]["prefill_calls_padded"] == 1


def test_a_variant_runs_another_tree(tmp_path) -> None:
    """`tree=DIR` runs that variant's bench from DIR (another commit's code) on this checkout's
    trace; the word itself is not passed on."""
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    _fake_run(tmp_path / "run")
    old = tmp_path / "old_tree"
    old.mkdir()
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(stand_in), REAL_PY=sys.executable, FAKE_RUN=str(tmp_path / "run"),
               OUT=str(out), LIMIT="60")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"),
                           "old", f"tree={old} --precompile on"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / "old.log").read_text()
    assert f"cwd: {old}\n" in log and "tree=" not in log.split("cwd:")[0].split("flags:")[1]
    assert f"--trace {ROOT}/benchmarks/traces/gpu1_smoke_4olmoe_40s.jsonl" in log
    assert "--precompile on --out /tmp/gpu_smoke_old" in log and (out / "old.tgz").exists()


def test_odd_arguments_are_refused(tmp_path) -> None:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "cold"],
                          env=dict(os.environ, OUT=str(tmp_path)), capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: gpu_smoke.sh NAME FLAGS" in proc.stderr
