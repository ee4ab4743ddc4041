"""`benchmarks/gpu_compile.sh`, the grid-compile device-call script, with precompile_bench replaced
by a stand-in (`PYTHON`): each variant runs in its tree with its environment and flags after the
defaults, on its own empty cache; the summary adds up the per-program seconds; a failing variant
does not stop the next one but sets the exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# `-m benchmarks.precompile_bench ARGS` prints where and how it ran, two programs' lines and the
# total line precompile_bench ends with; --fail exits 5 after the first program
STAND_IN = """#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = benchmarks.precompile_bench ]; then
    shift 2
    echo "cwd=$(basename "$PWD") pythonpath=$(basename "$PYTHONPATH") xla_caches=${XLA_CACHES:-unset}"
    echo "cache_empty=$([ -z "$(ls -A "$CROSSPOOL_COMPILATION_CACHE" 2>/dev/null)" ] && echo yes || echo no)"
    echo "args: $*"
    mkdir -p "$CROSSPOOL_COMPILATION_CACHE" && touch "$CROSSPOOL_COMPILATION_CACHE/entry"
    echo "precompiled 1/2: decode olmoe G=4 slots=8 tokens=8 pages=256 (2.5 s)"
    case " $* " in *" --fail "*) exit 5;; esac
    echo "precompiled 2/2: prefill olmoe G=4 slots=8 tokens=2048 pages=4096 (10.3 s)"
    echo "group 0: 2 step programs precompiled in 11.0 s"
    echo "precompiled 2 programs in 11.0 s with 8 threads, options {} (5.50 s per program)"
    exit 0
fi
exec "$REAL_PY" "$@"
"""


def test_variants_run_in_their_trees_and_add_up(tmp_path) -> None:
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    (tmp_path / "bisect_test_tree").mkdir()  # another commit's tree
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(stand_in), REAL_PY=sys.executable, OUT=str(out), LIMIT="60",
               CACHE_ROOT=str(tmp_path))
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_compile.sh"), "head", "", "old",
         f"tree={tmp_path}/bisect_test_tree env=XLA_CACHES=all --threads 4", "bad", "--fail",
         "again", ""],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5, proc.stdout + proc.stderr  # the failed variant's status
    assert sorted(p.name for p in out.iterdir()) == ["again.log", "bad.log", "head.log", "old.log",
                                                     "summary.txt"]
    head = (out / "head.log").read_text()
    assert f"cwd={ROOT.name} pythonpath={ROOT.name} xla_caches=unset" in head
    assert "args: --models 3 --max-context 131072 --max-slots 64 --threads 8\n" in head
    assert "cache_empty=yes" in head and "rc=0" in head
    old_log = (out / "old.log").read_text()
    assert "cwd=bisect_test_tree pythonpath=bisect_test_tree xla_caches=all" in old_log
    assert "--threads 8 --threads 4" in old_log  # the variant's flags after the defaults
    # "again" reuses no cache: its own directory starts empty
    assert "cache_empty=yes" in (out / "again.log").read_text()
    rows = (out / "summary.txt").read_text().splitlines()
    assert [r.split()[0] for r in rows] == ["head", "old", "bad", "again"]
    assert "programs 2     wall 11.0     s  per-program sum 12.8 s over 2" in rows[0]
    assert "rc 5" in rows[2] and "programs -" in rows[2] and "sum 2.5 s over 1" in rows[2]
    assert proc.stdout.rstrip().splitlines()[-4:] == rows
