"""`benchmarks/call_gaps.py` on a hand-made call log: gaps in dispatch order per group, the prefill
calls between two decode calls, weighted quantiles (by requests) and the tail summary."""

from __future__ import annotations

import gzip
import json

from benchmarks import call_gaps


def _call(t: float, decode: bool, busy: float = 0.01, requests: int = 1, compiled: bool = False,
          group: int = 0, tokens: int = 0) -> dict:
    return {"dispatched": t, "ready": t + busy, "busy": busy, "decode": decode, "compiled": compiled,
            "requests": requests, "group": group, "prefill_tokens": tokens}


def test_gaps_and_summary(tmp_path, capsys) -> None:
    calls = [
        _call(0.00, True, 0.02, requests=2),            # group 0's first decode call: no gap
        _call(0.03, False, tokens=512),
        _call(0.05, True, 0.02, requests=2),            # gap 0.05, one prefill call between
        _call(0.08, False, tokens=512, compiled=True),
        _call(0.10, False, tokens=39),
        _call(0.12, True, 0.02, requests=2, compiled=True),  # gap 0.07, two prefill calls between
        _call(0.01, True, 0.04, group=1),               # another group: its own sequence
        _call(0.06, True, 0.04, group=1),               # gap 0.05, nothing between
    ]
    gaps = call_gaps.decode_gaps(calls)
    got = sorted((round(g["gap_s"], 3), g["prefill_calls"], g["prefill_tokens"], g["prefill_padded"],
                  g["requests"], g["compiled"]) for g in gaps)
    assert got == [(0.05, 0, 0, 0, 1, False), (0.05, 1, 512, 0, 2, False), (0.07, 2, 551, 1, 2, True)]
    assert call_gaps.weighted_quantile([1.0, 2.0, 3.0], [1, 1, 2], 0.5) == 2.0
    assert call_gaps.weighted_quantile([1.0, 2.0, 3.0], [1, 1, 2], 0.6) == 3.0
    assert call_gaps.weighted_quantile([1.0, 2.0, 3.0], [1, 1, 2], 0.25) == 1.0
    s = call_gaps.summary(gaps)
    assert s["gaps"] == 3 and s["prefill_calls_between"] == {0: 1, 1: 1, 2: 1}
    top = s["quantiles"][str(call_gaps.TAIL)]
    assert round(top["gap_s"], 3) == 0.07 and round(top["gap_over_own_call"], 3) == 3.5
    assert s["tail"] == {"gaps": 1, "prefill_calls_between": {2: 1}, "decode_call_padded": 1,
                         "prefill_calls_padded": 1, "at_s": [0.14, 0.14], "mean_prefill_tokens": 551.0}
    path = tmp_path / "calls_shared.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(c) + "\n" for c in calls)
    out = tmp_path / "gaps.json"
    assert call_gaps.main([str(path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tail"]["gaps"] == 1
    assert "3 gaps between decode calls" in capsys.readouterr().out
    assert call_gaps.prefill_only_steps(calls) is None  # a log without steps


def test_prefill_only_steps() -> None:
    calls = [dict(_call(0.0, False), step=1, step_decoding=0),   # nothing decoding: not counted
             dict(_call(0.1, True), step=2, step_decoding=1),
             dict(_call(0.2, False), step=2, step_decoding=1),
             dict(_call(0.3, False), step=3, step_decoding=2),   # prefill, no decode, 2 decoding
             dict(_call(0.3, False, group=1), step=3, step_decoding=0)]
    assert call_gaps.prefill_only_steps(calls) == 1
