"""`benchmarks/precompile_bench.py`: the host-event accounting of `--profile` on hand-made events,
and a CPU run of the first grid program under the profiler."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.precompile_bench import add_line_seconds, event_name

ROOT = Path(__file__).resolve().parents[1]


def test_self_time_subtracts_nested_events():
    own: dict[str, float] = collections.defaultdict(float)
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    s = 1_000_000_000  # ns
    # compile [0, 10 s) holds llvm [1, 4) and ptxas [5, 9), and ptxas holds llvm [6, 7)
    add_line_seconds([(5 * s, 4 * s, "ptxas"), (0, 10 * s, "compile"), (1 * s, 3 * s, "llvm"),
                      (6 * s, 1 * s, "llvm")], own, total, count)
    assert own == pytest.approx({"compile": 3.0, "llvm": 4.0, "ptxas": 3.0})
    assert total == pytest.approx({"compile": 10.0, "llvm": 4.0, "ptxas": 4.0})
    assert count == {"compile": 1, "llvm": 2, "ptxas": 1}
    assert sum(own.values()) == pytest.approx(10.0)


def test_event_name_drops_traceme_metadata():
    assert event_name("Compiling IR:sort.10.1#module=x,id=3#") == "Compiling IR:sort.10.1"
    assert event_name("PTX->CUBIN") == "PTX->CUBIN"


def test_profile_of_one_program_on_cpu(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               CROSSPOOL_COMPILATION_CACHE=str(tmp_path / "cache"))
    env.pop("CROSSPOOL_WARM_PROGRAMS", None)  # the engine's default: the bench turns warm-ups off
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.precompile_bench", "--model", "demo", "--models", "1",
         "--threads", "1", "--max-context", "256", "--max-slots", "4", "--programs", "1", "--profile",
         "--profile-top", "200"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "precompiled 1/1: " in out and "precompiled 1 programs in " in out
    # the one program asked for, and no warm-up program beside it, was traced, lowered and compiled
    assert re.search(r"^compile phases summed over threads: trace \S+ s over 1; lower \S+ s over 1; "
                     r"xla compile \S+ s over 1$", out, re.M), out[-1500:]
    assert "host events by self time, seconds per program over 1 programs" in out
    # XLA's CPU compile shows up by its own events, not only jax's
    assert "CpuCompiler::RunBackend" in out
