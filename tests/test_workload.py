"""benchmarks/workload: trace file format, length samplers, the four arms, presets and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

from benchmarks.workload import lengths
from benchmarks.workload.__main__ import main as cli_main
from benchmarks.workload.generate import ARMS, WorkloadSpec, generate, ramp_natural_duration_s
from benchmarks.workload.presets import (
    CPU_TINY_MAX_OUTPUT_LEN,
    CPU_TINY_MAX_PROMPT_LEN,
    GPU_MAX_CONTEXT,
    PRESETS,
    get_preset,
    interleave,
    model_shape,
)
from benchmarks.workload.stats import arrival_cv, peak_over_mean, summarize
from benchmarks.workload.trace import Trace, TraceFormatError, TraceRequest, load_jsonl, save_jsonl

ROOT = pathlib.Path(__file__).resolve().parent.parent
RAW_TRACES = pathlib.Path(os.environ.get("CROSSPOOL_TRACES_DIR", ROOT.parent / "shared" / "traces"))


def small(arm: str, **kw: object) -> WorkloadSpec:
    base: dict[str, object] = dict(
        arm=arm, num_models=6, total_rate=3.0, duration_s=300.0, cycle_min_s=20.0, cycle_max_s=60.0
    )
    if arm == "ramp":
        base.update(num_models=3, ramp_peak_rps=6.0, duration_s=60.0)
    base.update(kw)
    return WorkloadSpec(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# trace file


def test_jsonl_round_trip_is_exact(tmp_path: pathlib.Path) -> None:
    trace = generate(small("bursty-long"), seed=3)
    assert len(trace) > 50
    p = tmp_path / "t.jsonl"
    save_jsonl(trace, p)
    back = load_jsonl(p)
    assert back == trace  # every float, int, name and the meta
    lines = p.read_text().splitlines()
    assert json.loads(lines[0]).keys() == {"meta"}
    assert len(lines) == len(trace) + 1
    # hand-made trace with awkward floats
    reqs = [
        TraceRequest("a", 0.1 + 0.2, "m", 1, 1),
        TraceRequest("b", 1 / 3, "m2", 7, 9),
        TraceRequest("c", 1e-7 + 1 / 3, "m", 123456, 1),
    ]
    t2 = Trace(reqs, {"note": "x", "nested": {"k": [1, 2.5]}})
    save_jsonl(t2, p)
    assert load_jsonl(p) == t2


GOOD_HEADER = '{"meta": {}}\n'
GOOD_REQ = '{"request_id": "r0", "arrival_s": 0.5, "model": "m", "prompt_len": 4, "output_len": 2}\n'


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("", 1, "empty file"),
        ('{"request_id": "r0"}\n', 1, "first line must be the header"),
        ('{"meta": []}\n', 1, "first line must be the header"),
        (GOOD_HEADER + "{not json\n", 2, "not valid JSON"),
        (GOOD_HEADER + "[1, 2]\n", 2, "expected a JSON object"),
        (GOOD_HEADER + "\n", 2, "empty line"),
        (GOOD_HEADER + GOOD_REQ + '{"meta": {}}\n', 3, "second meta"),
        (
            GOOD_HEADER + '{"request_id": "r0", "arrival_s": 0.5, "model": "m", "prompt_len": 4}\n',
            2,
            "missing output_len",
        ),
        (GOOD_HEADER + GOOD_REQ.replace('"output_len": 2', '"output_len": 2, "x": 1'), 2, "unknown x"),
        (GOOD_HEADER + GOOD_REQ.replace("0.5", "-1.0"), 2, "arrival_s must be"),
        (GOOD_HEADER + GOOD_REQ.replace("0.5", "NaN"), 2, "not valid JSON"),
        (GOOD_HEADER + GOOD_REQ.replace("0.5", "1e400"), 2, "arrival_s must be"),
        (GOOD_HEADER + GOOD_REQ.replace('"prompt_len": 4', '"prompt_len": 4.0'), 2, "prompt_len must be"),
        (GOOD_HEADER + GOOD_REQ.replace('"prompt_len": 4', '"prompt_len": 0'), 2, "prompt_len must be"),
        (GOOD_HEADER + GOOD_REQ.replace('"output_len": 2', '"output_len": true'), 2, "output_len must be"),
        (GOOD_HEADER + GOOD_REQ.replace('"m"', '""'), 2, "model must be"),
        (
            GOOD_HEADER + GOOD_REQ + GOOD_REQ.replace("0.5", "0.7"),
            3,
            "duplicate request_id 'r0' (first on line 2)",
        ),
        (
            GOOD_HEADER + GOOD_REQ + GOOD_REQ.replace('"r0"', '"r1"').replace("0.5", "0.4"),
            3,
            "before the previous",
        ),
    ],
)
def test_load_jsonl_bad_lines_name_file_and_line(
    tmp_path: pathlib.Path, text: str, line: int, fragment: str
) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(TraceFormatError) as e:
        load_jsonl(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: "), msg
    assert fragment in msg, msg


def test_trace_rejects_unsorted_and_duplicate_requests() -> None:
    a, b = TraceRequest("a", 1.0, "m", 1, 1), TraceRequest("b", 0.5, "m", 1, 1)
    with pytest.raises(ValueError, match="arrival order"):
        Trace([a, b], {})
    with pytest.raises(ValueError, match="duplicate request_id"):
        Trace([b, TraceRequest("b", 2.0, "m", 1, 1)], {})
    with pytest.raises(ValueError, match="arrival_s must be"):
        TraceRequest("a", float("inf"), "m", 1, 1)


# ---------------------------------------------------------------------------------------------
# lengths


def test_shipped_tables_match_readme_percentiles() -> None:
    moon = lengths.load_table("mooncake")
    az = lengths.load_table("azure")
    assert len(moon) == 12031 and len(az) == 19366
    mp = moon.percentiles()
    # ../shared/traces/README.md: Mooncake inputs p50 6,909 / p90 27,367 / p99 85,400, max 126,195,
    # 45% at 8K or more, output mean 343; Azure conversation inputs p50 1,020, p99 4,142, outputs p50 129
    assert mp["prompt"]["p50"] == 6909 and mp["prompt"]["p90"] == 27367
    assert abs(mp["prompt"]["p99"] - 85400) < 1
    assert moon.prompt_lens.max() == 126195
    assert abs((moon.prompt_lens >= 8192).mean() - 0.45) < 0.005
    assert abs(moon.output_lens.mean() - 343) < 1
    ap = az.percentiles()
    assert ap["prompt"]["p50"] == 1020 and ap["prompt"]["p99"] == 4142 and ap["output"]["p50"] == 129
    # arrival CV as in the README (Mooncake 3.0 with its 3 s stamps, Azure 1.09)
    assert abs(arrival_cv(moon.arrival_s) - 3.0) < 0.05  # type: ignore[operator]
    assert abs(arrival_cv(az.arrival_s) - 1.09) < 0.02  # type: ignore[operator]


@pytest.mark.skipif(not (RAW_TRACES / lengths.MOONCAKE_FILE).is_file(), reason="raw traces not present")
def test_shipped_tables_equal_raw_traces() -> None:
    for src in lengths.SOURCES:
        shipped, raw = lengths.load_table(src), lengths.load_table(src, RAW_TRACES)
        assert np.array_equal(shipped.prompt_lens, raw.prompt_lens)
        assert np.array_equal(shipped.output_lens, raw.output_lens)
        assert np.allclose(shipped.arrival_s, raw.arrival_s, rtol=0, atol=1e-6)


def test_sampler_percentiles_scale_and_caps() -> None:
    rng = np.random.default_rng(0)
    p, o = lengths.mooncake_sampler().sample(rng, 40000)
    assert abs(np.percentile(p, 50) / 6909 - 1) < 0.05 and abs(np.percentile(p, 90) / 27367 - 1) < 0.05
    p, _ = lengths.azure_sampler().sample(rng, 40000)
    assert abs(np.percentile(p, 50) / 1020 - 1) < 0.05
    # scale: / 64, at least 1 token
    p, o = lengths.mooncake_sampler(scale=64).sample(rng, 40000)
    assert abs(np.percentile(p, 50) - 6909 / 64) < 6 and p.min() >= 1 and o.min() >= 1
    # clip: capped, with a spike at the cap (~12% of Mooncake / 64 is over 384)
    clip = lengths.mooncake_sampler(scale=64, max_prompt_len=384, max_output_len=8)
    p, o = clip.sample(rng, 40000)
    assert p.max() == 384 and o.max() == 8
    assert 0.08 < (p == 384).mean() < 0.16
    # resample: capped, no spike (the rows that fit, uniformly)
    res = dataclasses.replace(clip, cap_mode="resample")
    p, o = res.sample(rng, 40000)
    assert p.max() <= 384 and o.max() <= 8 and (p == 384).mean() < 0.01
    with pytest.raises(ValueError, match=r"only \d+ of \d+ rows fit"):
        lengths.mooncake_sampler(max_prompt_len=891, cap_mode="resample").sample(rng, 10)
    with pytest.raises(ValueError, match="cap_mode"):
        lengths.mooncake_sampler(cap_mode="truncate")
    with pytest.raises(ValueError, match="unknown length source"):
        lengths.LengthSampler("sharegpt")


# ---------------------------------------------------------------------------------------------
# generation


@pytest.mark.parametrize("arm", ARMS)
def test_generation_is_deterministic_per_seed(arm: str) -> None:
    spec = small(arm)
    a, b, c = generate(spec, 7), generate(spec, 7), generate(spec, 8)
    assert a == b
    assert a.requests != c.requests
    assert len(a) > 20
    assert {r.model for r in a.requests} <= set(spec.names)
    assert all(0 <= r.arrival_s < spec.duration_s for r in a.requests)
    assert a.meta["spec"] == spec.to_dict() and a.meta["seed"] == 7
    assert WorkloadSpec.from_dict(a.meta["spec"]) == spec


def test_bursty_cv_clearly_above_uniform() -> None:
    kw = dict(num_models=8, total_rate=4.0, duration_s=600.0, cycle_min_s=60.0, cycle_max_s=300.0)
    bursty = [summarize(generate(WorkloadSpec(arm="bursty-long", **kw), s)) for s in range(3)]  # type: ignore[arg-type]
    uniform = [summarize(generate(WorkloadSpec(arm="uniform", **kw), s)) for s in range(3)]  # type: ignore[arg-type]
    for u in uniform:
        assert 0.85 < u["cv_all"] < 1.15 and 0.8 < u["cv_model_median"] < 1.2
    for b in bursty:
        assert b["cv_all"] > 2.0, b["cv_all"]
        assert b["cv_model_median"] > 2.5, b["cv_model_median"]
        assert b["peak_over_mean"] > max(u["peak_over_mean"] for u in uniform)
    # same mean total rate (within the bursty arm's large count variance)
    mean_b = np.mean([b["num_requests"] for b in bursty])
    mean_u = np.mean([u["num_requests"] for u in uniform])
    assert abs(mean_u / 2400 - 1) < 0.06 and abs(mean_b / 2400 - 1) < 0.35


def test_popularity_ordering() -> None:
    spec = WorkloadSpec(arm="uniform", num_models=6, total_rate=10.0, duration_s=2000.0, alpha=1.3)
    w = spec.popularity()
    assert np.all(np.diff(w) < 0) and abs(w.sum() - 1) < 1e-12
    counts = np.array(list(summarize(generate(spec, 0))["requests_per_model"].values()))
    assert np.all(np.diff(counts) < 0), counts
    assert np.allclose(counts / counts.sum(), w, rtol=0.1)
    # bursty: noisier per seed; over 10 seeds the most popular model leads and the law holds roughly
    b = WorkloadSpec(
        arm="bursty-long", num_models=6, total_rate=4.0, duration_s=600.0, cycle_min_s=30.0, cycle_max_s=90.0
    )
    tot = sum(np.array(list(summarize(generate(b, s))["requests_per_model"].values())) for s in range(10))
    assert tot.argmax() == 0 and tot[0] > 3 * tot[-1] and tot[:3].sum() > tot[3:].sum()
    # replay assigns the Mooncake requests by the same law
    r = WorkloadSpec(arm="replay", num_models=4, duration_s=4000.0)
    rc = np.array(list(summarize(generate(r, 0))["requests_per_model"].values()))
    assert np.all(np.diff(rc) < 0) and rc.sum() == 12031
    assert WorkloadSpec(alpha=0.0, num_models=3).popularity().tolist() == pytest.approx([1 / 3] * 3)


def test_bursty_arrivals_stay_inside_their_groups_on_windows() -> None:
    spec = small("bursty-long", num_models=7, burst_group_min=2, burst_group_max=3)
    trace = generate(spec, 1)
    groups = trace.meta["burst_groups"]
    assert sorted(m for g in groups for m in g["models"]) == sorted(spec.names)
    assert all(2 <= len(g["models"]) <= 3 for g in groups)
    for g in groups:
        win = g["on_windows_s"]
        assert 0.3 < g["on_fraction"] < 0.7
        for r in trace.requests:
            if r.model in g["models"]:
                assert any(a - 1e-3 <= r.arrival_s <= b + 1e-3 for a, b in win), (r, win)


def test_replay_uses_mooncake_timestamps_and_lengths() -> None:
    spec = WorkloadSpec(
        arm="replay",
        num_models=3,
        duration_s=100.0,
        time_compression=2.0,
        length_scale=4.0,
        max_prompt_len=2048,
    )
    trace = generate(spec, 0)
    moon = lengths.load_table("mooncake")
    n = int((moon.arrival_s / 2.0 < 100.0).sum())
    assert len(trace) == n
    assert [r.arrival_s for r in trace.requests] == pytest.approx((moon.arrival_s[:n] / 2.0).tolist())
    assert [r.prompt_len for r in trace.requests] == np.minimum(
        lengths.scale_lengths(moon.prompt_lens[:n], 4.0), 2048
    ).tolist()
    assert [r.output_len for r in trace.requests] == lengths.scale_lengths(moon.output_lens[:n], 4.0).tolist()


def test_ramp_follows_kvcached_stagger() -> None:
    spec = WorkloadSpec(arm="ramp", num_models=3, ramp_peak_rps=16.0, duration_s=1.0)
    assert spec.resolved_ramp_delay_s == 36.0  # kvcached: up // 4 + 2 * up, up = 16 s
    spec = dataclasses.replace(spec, duration_s=ramp_natural_duration_s(spec))
    assert spec.duration_s == 16 + 15 + 3 * 36
    trace = generate(spec, 0)
    assert {(r.prompt_len, r.output_len) for r in trace.requests} == {(256, 256)}
    for k, name in enumerate(spec.names):
        t = np.array([r.arrival_s for r in trace.requests if r.model == name])
        assert t.min() >= k * 36.0
        # busiest 4 s window is near the model's peak (start + 16 s)
        dens = [((t >= s) & (t < s + 4)).sum() for s in np.arange(0, spec.duration_s, 1.0)]
        assert abs(int(np.argmax(dens)) + 2 - (k * 36 + 16)) <= 4
        # triangle (~peak^2 = 256 requests) then 1 req/s until the end
        assert abs(((t >= k * 36) & (t < k * 36 + 31)).sum() - 255.5) < 50


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(arm="poisson"), "arm must be one of"),
        (dict(num_models=0), "num_models must be an integer >= 1"),
        (dict(num_models=2, model_names=("a",)), "has 1 names but num_models is 2"),
        (dict(num_models=2, model_names=("a", "a")), "duplicate names a"),
        (dict(num_models=1, model_names=(" a",)), "bad name"),
        (dict(total_rate=0.0), "total_rate must be a finite number > 0"),
        (dict(duration_s=float("inf")), "duration_s must be"),
        (dict(alpha=-1.0), "alpha must be a finite number >= 0"),
        (dict(cv=0.0), "cv must be"),
        (dict(off_fraction=1.0), "off_fraction must be in [0, 1)"),
        (dict(cycle_min_s=100.0, cycle_max_s=50.0), "cycle_max_s (50.0) must be >= cycle_min_s (100.0)"),
        (dict(burst_group_min=3, burst_group_max=2), "burst_group_max (2) must be >= burst_group_min (3)"),
        (dict(length_source="sharegpt"), "length_source must be one of"),
        (dict(max_prompt_len=0), "max_prompt_len must be an integer >= 1"),
        (dict(max_output_len=3.5), "max_output_len must be an integer >= 1"),
        (dict(length_scale=-2.0), "length_scale must be"),
        (dict(cap_mode="drop"), "cap_mode must be one of"),
        (dict(arm="replay", length_source="azure"), "replay' uses the Mooncake"),
        (dict(arm="replay", cap_mode="resample"), "cap_mode must be 'clip'"),
        (dict(time_compression=0.0), "time_compression must be"),
        (dict(ramp_peak_rps=0.5), "ramp_peak_rps (0.5) must be >= ramp_start_rps"),
    ],
)
def test_spec_validation_errors(kw: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        WorkloadSpec(**kw)
    assert fragment in str(e.value), str(e.value)


def test_seed_must_be_a_nonnegative_int() -> None:
    with pytest.raises(ValueError, match="seed must be"):
        generate(WorkloadSpec(), -1)


# ---------------------------------------------------------------------------------------------
# presets and CLI


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_valid_and_caps_respected(name: str) -> None:
    spec = get_preset(name)
    for seed in (0, 1, 2):
        trace = generate(spec, seed)
        s = summarize(trace)
        assert s["num_requests"] > 20
        if spec.max_prompt_len is not None:
            assert max(r.prompt_len for r in trace.requests) <= spec.max_prompt_len
        if spec.max_output_len is not None:
            assert max(r.output_len for r in trace.requests) <= spec.max_output_len
        if name.startswith("cpu-tiny"):
            # fits the demo models (512 positions); every model used; replays in well under 5 min
            assert all(r.prompt_len + r.output_len <= 512 for r in trace.requests)
            assert spec.duration_s <= 150 and all(n > 0 for n in s["requests_per_model"].values())
        else:
            assert all(r.prompt_len + r.output_len <= GPU_MAX_CONTEXT for r in trace.requests)
            assert {model_shape(m) for m in spec.names} <= {
                "olmoe-1b-7b",
                "deepseek-v2-lite",
                "qwen3-30b-a3b",
            }


def test_preset_families_share_models_and_rate() -> None:
    for base in ("cpu-tiny", "gpu-2", "gpu-8"):
        b, u, r = get_preset(base), get_preset(base + "-uniform"), get_preset(base + "-replay")
        assert b.arm == "bursty-long" and u.arm == "uniform" and r.arm == "replay"
        assert b.names == u.names == r.names and b.total_rate == u.total_rate
        assert b.duration_s == u.duration_s
        assert b.resolved_length_source == "mooncake" and u.resolved_length_source == "azure"
        assert abs(r.time_compression * 12031 / 3537 - b.total_rate) < 0.01
    assert get_preset("cpu-tiny").max_prompt_len == CPU_TINY_MAX_PROMPT_LEN
    assert get_preset("cpu-tiny").max_output_len == CPU_TINY_MAX_OUTPUT_LEN
    assert len(get_preset("gpu-8").names) > len(get_preset("gpu-2").names) > 3
    assert interleave({"a": 2, "b": 1}) == ("a-00", "b-00", "a-01")
    with pytest.raises(ValueError, match="unknown workload preset 'gpu-3'; known: cpu-tiny"):
        get_preset("gpu-3")


def test_cli_writes_trace_and_summary(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, js = tmp_path / "t.jsonl", tmp_path / "s.json"
    assert (
        cli_main(["--preset", "cpu-tiny", "--seed", "4", "--out", str(out), "--summary-json", str(js)]) == 0
    )
    printed = capsys.readouterr().out
    for word in ("arrival CV", "peak/mean", "prompt_len (tokens): p50", "demo-deepseek-v3"):
        assert word in printed
    assert load_jsonl(out) == generate(get_preset("cpu-tiny"), 4)
    assert json.loads(js.read_text())["num_requests"] == len(load_jsonl(out))
    # overrides
    assert (
        cli_main(
            [
                "--preset",
                "gpu-2",
                "--arm",
                "uniform",
                "--num-models",
                "4",
                "--duration-s",
                "30",
                "--max-prompt-len",
                "none",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    t = load_jsonl(out)
    spec = WorkloadSpec.from_dict(t.meta["spec"])
    assert (
        spec.arm == "uniform" and spec.names == get_preset("gpu-2").names[:4] and spec.max_prompt_len is None
    )
    assert cli_main(["--arm", "ramp", "--num-models", "2", "--duration-s", "20", "--ramp-peak-rps", "3"]) == 0
    capsys.readouterr()
    # bad values: one-line error, exit 2
    assert cli_main(["--preset", "cpu-tiny", "--total-rate", "-1"]) == 2
    assert "total_rate must be a finite number > 0" in capsys.readouterr().err
    assert cli_main(["--preset", "cpu-tiny", "--num-models", "5"]) == 2
    assert "exceeds preset 'cpu-tiny'" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("{}\n")
    assert cli_main(["--summarize", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:1: the first line must be the header" in capsys.readouterr().err


def test_stats_helpers() -> None:
    assert arrival_cv(np.array([0.0, 1.0])) is None
    assert arrival_cv(np.arange(10.0)) == 0.0
    assert peak_over_mean(np.array([0.5, 1.0, 15.0, 25.0]), 30.0) == pytest.approx(2 / (4 / 3))
