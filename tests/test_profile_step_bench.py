"""`benchmarks/profile_step.py`: its tables from hand-made events, and its `--smoke` run on CPU."""

from __future__ import annotations

import json

import pytest

from benchmarks import profile_step


def test_kernel_and_kind_tables_from_events() -> None:
    events = [("arena_grouped_matmul", 300.0), ("arena_grouped_matmul", 100.0),
              ("paged_attention", 60.0), ("loop_add_fusion", 30.0), ("sort.3", 10.0)]
    rows = profile_step.kernel_table(events, calls=2)
    assert [r["kernel"] for r in rows] == ["arena_grouped_matmul", "paged_attention",
                                          "loop_add_fusion", "sort.3"]
    mm = rows[0]
    assert mm["launches"] == 1.0 and mm["us"] == 200.0 and mm["share"] == pytest.approx(0.8)
    kinds = {k["kind"]: k for k in profile_step.kind_table(rows)}
    assert kinds["expert/projection matmul (ours)"]["us"] == 200.0
    assert kinds["attention (ours)"]["us"] == 30.0
    assert kinds["other XLA"]["us"] == 15.0 and kinds["sort / top-k"]["us"] == 5.0
    assert sum(k["share"] for k in kinds.values()) == pytest.approx(1.0)


def test_smoke_run_profiles_a_prefill_and_each_decode_call_per_schedule(tmp_path) -> None:
    out = tmp_path / "ps.json"
    assert profile_step.main(["--smoke", "--schedules", "split,persistent", "--json", str(out)]) == 0
    calls = json.loads(out.read_text())["calls"]
    assert [c["call"].split()[0] for c in calls] == ["prefill"] + ["decode"] * 4
    # the smoke's decode calls: 2 live requests, then 1, padded to 4 slots, once per schedule
    assert [c["call"] for c in calls[1:]] == [f"decode {n} x 32 in 4 slots x 4 pages, {s}, K=4"
                                             for n in (2, 1) for s in ("split", "persistent")]
    for c in calls:
        assert c["wall_us"] > 0 and c["kernels"] and c["kinds"]
        assert c["kernel_us"] == pytest.approx(sum(k["us"] for k in c["kernels"]))


def test_decode_cases_zip_counts_with_contexts() -> None:
    assert profile_step.decode_cases("1,8", "43000,7400") == [(1, 43000), (8, 7400)]
    assert profile_step.decode_cases("32", "2048") == [(32, 2048)]
    assert profile_step.decode_cases("0,4", "100") == [(4, 100)]  # one context for all; 0 skipped
    with pytest.raises(SystemExit, match="2 contexts for 3"):
        profile_step.decode_cases("1,2,3", "10,20")
