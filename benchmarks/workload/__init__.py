"""Replayable multi-model workloads for the CrossPool benchmark (issue 7, part 1).

- ``trace``: ``TraceRequest``, ``Trace`` and their JSONL file (``save_jsonl`` / ``load_jsonl``);
- ``lengths``: empirical (prompt, output) token lengths from the Mooncake and Azure traces;
- ``generate``: ``WorkloadSpec`` and ``generate(spec, seed)`` for the bursty-long, uniform, replay
  and ramp arms of ../shared/BENCHMARK.md;
- ``presets``: named specs (``cpu-tiny``, ``gpu-2``, ``gpu-8`` and their arms);
- ``stats``: the measured summary (per-model counts, arrival CV, length percentiles, burstiness).

CLI: ``python -m benchmarks.workload --preset cpu-tiny --seed 0 --out trace.jsonl``.
"""

from benchmarks.workload.generate import ARMS, WorkloadSpec, generate
from benchmarks.workload.presets import PRESETS, get_preset
from benchmarks.workload.stats import summarize
from benchmarks.workload.trace import Trace, TraceFormatError, TraceRequest, load_jsonl, save_jsonl

__all__ = [
    "ARMS",
    "PRESETS",
    "Trace",
    "TraceFormatError",
    "TraceRequest",
    "WorkloadSpec",
    "generate",
    "get_preset",
    "load_jsonl",
    "save_jsonl",
    "summarize",
]
