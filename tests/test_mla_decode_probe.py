"""`benchmarks/mla_decode_probe.py`'s trace summary on a hand-made profiler trace (the GPU parts
run only on a GPU; `--smoke` runs the timing path interpreted)."""

from __future__ import annotations

import json

from benchmarks.mla_decode_probe import analyze


def _range(name: str, tid: int, begin: float, end: float) -> list[dict]:
    """One named range as the profiler writes it: ts in thousands of cycles."""
    return [{"name": name, "ph": "B", "ts": begin, "pid": 1, "tid": tid},
            {"name": name, "ph": "E", "ts": end, "pid": 1, "tid": tid}]


def test_analyze_means_and_block_period(tmp_path, capsys):
    events = []
    for k in range(3):  # warpgroup 0: a block every 3,000 cycles, its softmax 500 of them
        t0 = 3.0 * k
        events += _range("wg0_issue_s", 1, t0, t0 + 0.9)
        events += _range("wg0_softmax", 1, t0 + 0.9, t0 + 1.4)
    events += _range("wg1_pv", 2, 0.0, 0.8) + _range("wg1_pv", 2, 3.0, 4.0)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"displayTimeUnit": "ns", "traceEvents": events}))
    analyze(str(path))
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:-1]}
    assert rows["wg0_issue_s"] == ["3", "900.0"]
    assert rows["wg0_softmax"] == ["3", "500.0"]
    assert rows["wg1_pv"] == ["2", "900.0"]
    assert "mean 3000.0, median 3000.0 cycles over 2" in out.splitlines()[-1]
