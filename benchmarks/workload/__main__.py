"""Writes a workload trace (JSONL) and prints its measured summary.

    python -m benchmarks.workload --preset cpu-tiny --seed 0 --out /tmp/cpu-tiny.jsonl
    python -m benchmarks.workload --preset gpu-2 --total-rate 4 --seed 1 --out gpu2-r4-s1.jsonl
    python -m benchmarks.workload --arm uniform --num-models 4 --total-rate 2 --duration-s 60
    python -m benchmarks.workload --list
    python -m benchmarks.workload --summarize existing.jsonl

Every ``WorkloadSpec`` field has an override flag (``--total-rate``, ``--cv``, ``--cycle-min-s``,
...; ``--model-names a,b,c``); without ``--preset`` the spec's defaults are the base. ``--arm``
changes only the arm (lengths stay as the base sets them; add ``--length-source``). With a preset,
``--num-models`` smaller than the preset's keeps its most popular models. Exit status 2 on a bad
argument or spec, with a one-line error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from benchmarks.workload.generate import ARMS, LENGTH_SOURCES, WorkloadSpec, generate
from benchmarks.workload.lengths import CAP_MODES
from benchmarks.workload.presets import PRESETS, describe, get_preset
from benchmarks.workload.stats import format_summary, summarize
from benchmarks.workload.trace import TraceFormatError, load_jsonl, save_jsonl

_NONE = object()  # "none" on the command line: set the field to None


def _opt(conv: Callable[[str], Any]) -> Callable[[str], Any]:
    """``conv``, with "none" meaning None (for the optional fields)."""

    def parse(text: str) -> Any:
        return _NONE if text.strip().lower() == "none" else conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(","))


# field -> (type converter, choices, help)
_OVERRIDES: dict[str, tuple[Callable[[str], Any], tuple[str, ...] | None, str]] = {
    "arm": (str, ARMS, "workload arm"),
    "num_models": (int, None, "number of models"),
    "model_names": (_opt(_names), None, "comma-separated model names, most popular first"),
    "total_rate": (float, None, "mean total request rate (req/s)"),
    "duration_s": (float, None, "trace length (s)"),
    "alpha": (float, None, "popularity exponent: rate_i ~ (i+1)^-alpha"),
    "cv": (float, None, "per-model Gamma inter-arrival CV inside bursts (bursty-long)"),
    "off_fraction": (float, None, "fraction of each on/off cycle that is off (bursty-long)"),
    "cycle_min_s": (float, None, "shortest on/off cycle (s)"),
    "cycle_max_s": (float, None, "longest on/off cycle (s)"),
    "burst_group_min": (int, None, "fewest models bursting together"),
    "burst_group_max": (int, None, "most models bursting together"),
    "length_source": (_opt(str), None, f"{', '.join(LENGTH_SOURCES)} or none (= the arm's default)"),
    "max_prompt_len": (_opt(int), None, "prompt cap (tokens, after scaling; none = no cap)"),
    "max_output_len": (_opt(int), None, "output cap (tokens, after scaling; none = no cap)"),
    "length_scale": (float, None, "divide source lengths by this"),
    "output_length_scale": (_opt(float), None, "divide output lengths by this (none = length-scale)"),
    "cap_mode": (str, CAP_MODES, "how caps apply: clip or resample"),
    "time_compression": (float, None, "replay: arrival = Mooncake timestamp / this"),
    "fixed_prompt_len": (int, None, "fixed source: prompt tokens"),
    "fixed_output_len": (int, None, "fixed source: output tokens"),
    "ramp_start_rps": (float, None, "ramp: start rate (req/s)"),
    "ramp_peak_rps": (float, None, "ramp: peak rate (req/s)"),
    "ramp_end_rps": (float, None, "ramp: end rate (req/s)"),
    "ramp_increment": (float, None, "ramp: slope (req/s per s)"),
    "ramp_delay_s": (_opt(float), None, "ramp: stagger between models (s; none = kvcached's rule)"),
}
assert set(_OVERRIDES) == {f.name for f in dataclasses.fields(WorkloadSpec)}


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.workload", description="Generate a replayable multi-model workload trace."
    )
    p.add_argument("--preset", help=f"named spec: {', '.join(PRESETS)}")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", help="write the trace here (JSONL); without it only the summary is printed")
    p.add_argument("--summary-json", help="also write the measured summary here (JSON)")
    p.add_argument(
        "--summarize", metavar="TRACE", help="print the summary of an existing trace file and exit"
    )
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    g = p.add_argument_group("spec overrides")
    for name, (conv, choices, help_) in _OVERRIDES.items():
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=conv, choices=choices, help=help_)
    return p


def make_spec(args: argparse.Namespace) -> WorkloadSpec:
    """The preset (or the default spec) with the given overrides applied."""
    base = get_preset(args.preset) if args.preset else WorkloadSpec()
    over = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    over = {k: (None if v is _NONE else v) for k, v in over.items()}
    if "num_models" in over and "model_names" not in over and base.model_names is not None:
        n = over["num_models"]
        if n > len(base.model_names):
            raise ValueError(
                f"--num-models {n} exceeds preset {args.preset!r}'s {len(base.model_names)} named models; "
                "pass --model-names (or --model-names none for model-00, model-01, ...)"
            )
        over["model_names"] = base.model_names[:n]
    if over.get("model_names") is not None and "num_models" not in over:
        over["num_models"] = len(over["model_names"])
    return dataclasses.replace(base, **over)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name in PRESETS:
            print(f"{name:18s} {describe(name)}")
        return 0
    try:
        if args.summarize:
            trace = load_jsonl(args.summarize)
        else:
            spec = make_spec(args)
            trace = generate(spec, args.seed)
    except (ValueError, TraceFormatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = summarize(trace)
    if not args.summarize:
        label = args.preset or "custom"
        print(f"workload {label} (arm {trace.meta['spec']['arm']}, seed {args.seed})")
    print(format_summary(summary))
    try:
        if args.out and not args.summarize:
            save_jsonl(trace, args.out)
            print(f"wrote {len(trace)} requests to {args.out}")
        if args.summary_json:
            with open(args.summary_json, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
