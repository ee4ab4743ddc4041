"""`benchmarks/gpu_xla_flags.sh`: one command under several XLA_FLAGS variants, each in its own
process with the variant's flags appended to XLA_FLAGS, its own log and (JSON=1) its own
`--json` path; a failing variant does not stop the next one but sets the exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# prints the flags and arguments it got; exits 3 when its flags ask for it
PROBE = ("import os, sys; f = os.environ.get('XLA_FLAGS', 'UNSET'); print('flags=[' + f + ']', "
         "'args=' + ' '.join(sys.argv[1:])); sys.exit(3 if 'fail' in f else 0)")


def test_each_variant_runs_with_its_flags_and_log(tmp_path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), JSON="1", XLA_FLAGS="--base")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_xla_flags.sh"), "plain", "", "cb",
         "--xla_gpu_enable_command_buffer=+WHILE", "bad", "--fail", "last", "--x=1 --y=2",
         "--", sys.executable, "-c", PROBE, "--calls", "3"],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bad.log", "cb.log", "last.log", "plain.log"]
    logs = {p.stem: p.read_text() for p in out.iterdir()}
    assert f"flags=[--base] args=--calls 3 --json {out}/plain.json" in logs["plain"]
    assert "flags=[--base --xla_gpu_enable_command_buffer=+WHILE]" in logs["cb"]
    assert "rc=3" in logs["bad"]  # and the next variant still ran
    assert "flags=[--base --x=1 --y=2]" in logs["last"] and "rc=0" in logs["last"]
    assert proc.stdout.count("=== ") == 4  # each log's tail is printed after its variant


def test_no_flags_leaves_xla_flags_unset(tmp_path) -> None:
    """XLA aborts on a blank XLA_FLAGS (it reads it as a file name): none is set then."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_xla_flags.sh"), "plain", "",
                           "--", sys.executable, "-c", PROBE],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "flags=[UNSET]" in (tmp_path / "plain.log").read_text()


def test_usage_without_a_command() -> None:
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_xla_flags.sh"), "a", ""],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
