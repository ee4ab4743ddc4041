"""Raw public traces as replayable multi-model traces (issue 19).

Two raw formats (the files in ../shared/traces; attribution in ``data/README.md``):

- Azure LLM inference CSV (``TIMESTAMP, ContextTokens, GeneratedTokens``; Patel et al.,
  "Splitwise", ISCA 2024, CC-BY 4.0), read by ``lengths.read_raw_azure``;
- Mooncake JSONL (``timestamp`` ms, ``input_length``, ``output_length``; kvcache-ai/Mooncake,
  Apache-2.0), read by ``lengths.read_raw_mooncake``.

Neither names models, so ``trace_from_table`` assigns each request to a model by the preset's
popularity rule, as the generator's ``replay`` arm does: model ``i`` of ``spec.names`` with
probability ``spec.popularity()[i]`` (``(i+1)^-alpha``, normalised), i.i.d. per request, from a
numpy Generator seeded by ``seed``. Arrivals are the trace's own (seconds from its first request,
stable-sorted), lengths scaled by the spec's ``length_scale`` / ``output_length_scale`` and clipped
at its ``max_prompt_len`` / ``max_output_len`` (``LengthSampler.cap``), so a GPU preset's 128K
context limit holds. ``read_trace_file`` picks the reader by content: the project's JSONL (a
``{"meta": ...}`` first line), Mooncake JSONL, or an Azure CSV header.
"""

from __future__ import annotations

import json
import os

import numpy as np

from benchmarks.workload.generate import WorkloadSpec
from benchmarks.workload.lengths import (
    LengthSampler,
    LengthTable,
    read_raw_azure,
    read_raw_mooncake,
    scale_lengths,
)
from benchmarks.workload.trace import Trace, TraceFormatError, TraceRequest, load_jsonl

FORMATS = ("crosspool", "mooncake", "azure")


def detect_format(path: str | os.PathLike[str]) -> str:
    """"crosspool" (the project's JSONL), "mooncake" (JSONL with ``timestamp``) or "azure" (CSV with
    a ``TIMESTAMP`` header); raises TraceFormatError otherwise."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    if first.startswith("{"):
        try:
            obj = json.loads(first)
        except ValueError as e:
            raise TraceFormatError(f"{path}:1: not valid JSON ({e})") from None
        if isinstance(obj, dict) and "meta" in obj:
            return "crosspool"
        if isinstance(obj, dict) and {"timestamp", "input_length", "output_length"} <= set(obj):
            return "mooncake"
        raise TraceFormatError(f"{path}:1: a JSON line that is neither a crosspool trace header nor a "
                               "Mooncake record (timestamp, input_length, output_length)")
    cols = [c.strip() for c in first.split(",")]
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= set(cols):
        return "azure"
    raise TraceFormatError(f"{path}:1: unknown trace format (expected a crosspool or Mooncake JSONL, or "
                           "an Azure CSV with TIMESTAMP,ContextTokens,GeneratedTokens)")


def trace_from_table(table: LengthTable, spec: WorkloadSpec, seed: int, source: str = "") -> Trace:
    """A multi-model trace of every row of `table` (module docstring: models, arrivals, lengths)."""
    order = np.argsort(table.arrival_s, kind="stable")
    t = np.round(np.asarray(table.arrival_s, np.float64)[order] - float(np.min(table.arrival_s)), 6)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 19]))
    names = spec.names
    idx = rng.choice(spec.num_models, size=t.shape[0], p=spec.popularity())
    out_scale = spec.length_scale if spec.output_length_scale is None else spec.output_length_scale
    sampler = LengthSampler(table.name, spec.length_scale, out_scale, spec.max_prompt_len,
                            spec.max_output_len)
    prompt, output = sampler.cap(scale_lengths(np.asarray(table.prompt_lens)[order], spec.length_scale),
                                 scale_lengths(np.asarray(table.output_lens)[order], out_scale))
    width = max(6, len(str(t.shape[0])))
    reqs = [TraceRequest(f"r{j:0{width}d}", float(t[j]), names[int(idx[j])], int(prompt[j]), int(output[j]))
            for j in range(t.shape[0])]
    span = float(t[-1]) if t.size else 0.0
    meta = {"format": "crosspool-workload-trace", "version": 1, "generator": "benchmarks.workload.public",
            "source": source or table.name, "raw_format": table.name, "seed": int(seed),
            "spec": spec.to_dict(), "duration_s": span, "models": list(names),
            "popularity": [round(float(x), 6) for x in spec.popularity()],
            "model_rule": "i.i.d. draw per request from the spec's popularity (replay arm's rule)",
            "num_requests": len(reqs)}
    return Trace(reqs, meta)


def read_trace_file(path: str | os.PathLike[str], spec: WorkloadSpec, seed: int) -> Trace:
    """The trace in `path`, whatever its format (`detect_format`); raw public traces get models from
    `spec` (`trace_from_table`)."""
    fmt = detect_format(path)
    if fmt == "crosspool":
        return load_jsonl(path)
    try:
        table = read_raw_mooncake(path) if fmt == "mooncake" else read_raw_azure(path)
    except ValueError as e:
        raise TraceFormatError(str(e)) from None
    if len(table) == 0:
        raise TraceFormatError(f"{path}: no requests")
    return trace_from_table(table, spec, seed, source=os.path.basename(str(path)))
