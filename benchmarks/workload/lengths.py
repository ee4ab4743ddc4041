"""Empirical request lengths (tokens) from two real serving traces, sampled with a numpy Generator.

Sources (full attribution in ``data/README.md``; the raw files are in ``../shared/traces``):

- ``mooncake``: kvcache-ai/Mooncake ``FAST25-release/traces/conversation_trace.jsonl`` (Apache-2.0),
  one hour of a production chat service, 12,031 requests. Length fields: ``input_length`` (prompt
  tokens) and ``output_length`` (generated tokens); ``timestamp`` is ms from the trace start
  (quantised to 3 s steps: there are 1,180 distinct stamps, 3,000 ms apart).
- ``azure``: Azure/AzurePublicDataset ``AzureLLMInferenceTrace_conv.csv`` (CC-BY 4.0, Patel et al.,
  "Splitwise", ISCA 2024), about one hour of an Azure LLM conversation service, 19,366 requests.
  Length fields: ``ContextTokens`` (prompt) and ``GeneratedTokens`` (output); ``TIMESTAMP`` is wall
  time.

Measured from the files (tokens, numpy's linear-interpolation percentiles; checked by
tests/test_workload.py against ../shared/traces/README.md):

=====================  ======  ======  ========  =========  =========  =======
table                    min     p50      p90       p99        max       mean
=====================  ======  ======  ========  =========  =========  =======
mooncake prompt          891   6,909    27,367    85,400.4   126,195   12,035.1
mooncake output            1     350       597     1,118.5     2,000      342.6
azure prompt               2   1,020   2,734.5     4,142      14,050    1,154.7
azure output               7     129       424       601       1,000      211.1
=====================  ======  ======  ========  =========  =========  =======

So Mooncake prompts are long-tailed (45% at 8K tokens or more), Azure conversation prompts short.

The package ships a compact copy of those columns (``data/*.csv.gz``: Mooncake ``timestamp_ms``,
``input_length``, ``output_length``; Azure ``arrival_s`` relative to the first request and the two
lengths) so that traces can be generated on machines without ``../shared``; ``build_tables`` rebuilds
it from the raw files and a test checks that it equals them.

Sampling (``LengthSampler``): a request draws one row of the table uniformly with replacement, so a
request's prompt and output lengths stay paired as in the real trace. Then, per length:

1. scale: ``max(1, round(length / scale))`` (``scale`` > 0; e.g. 64 turns Mooncake's p50 of 6,909
   tokens into 108, for tiny CPU models whose max positions are 256-512);
2. cap at ``max_len`` by **clipping** (default, ``cap_mode="clip"``: a longer request becomes exactly
   ``max_len`` long, so the share of long requests is kept and they pile up at the cap) or by
   **resampling** (``cap_mode="resample"``: a row with either length over its cap is redrawn, so the
   distribution is the source's conditioned on fitting; the long tail is lost). Resampling gives up
   with a clear error when fewer than 1% of the rows fit.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
MOONCAKE_FILE = "mooncake_conversation_trace.jsonl"
AZURE_FILE = "azure_llm_2023_conv.csv"
MOONCAKE_TABLE = "mooncake_conversation.csv.gz"
AZURE_TABLE = "azure_conv_2023.csv.gz"

LengthSourceName = Literal["mooncake", "azure"]
CapMode = Literal["clip", "resample"]
SOURCES: tuple[str, ...] = ("mooncake", "azure")
CAP_MODES: tuple[str, ...] = ("clip", "resample")


@dataclass(frozen=True)
class LengthTable:
    """One trace's per-request columns: arrival times (seconds from its first request) and lengths.

    ``prompt_lens`` and ``output_lens`` are int64 token counts, ``arrival_s`` float64 seconds,
    all of the same length, in the trace's order (non-decreasing arrival).
    """

    name: str
    arrival_s: np.ndarray
    prompt_lens: np.ndarray
    output_lens: np.ndarray

    def __len__(self) -> int:
        return int(self.prompt_lens.shape[0])

    def percentiles(self, qs: Sequence[float] = (50, 90, 99)) -> dict[str, dict[str, float]]:
        """``{"prompt": {"p50": ...}, "output": {...}}`` in tokens (linear interpolation)."""
        return {
            "prompt": {f"p{q:g}": float(np.percentile(self.prompt_lens, q)) for q in qs},
            "output": {f"p{q:g}": float(np.percentile(self.output_lens, q)) for q in qs},
        }


def _parse_azure_time(text: str) -> float:
    """Seconds since the epoch (naive, as written) of a ``YYYY-MM-DD HH:MM:SS[.fffffff]`` stamp."""
    main, _, frac = text.strip().partition(".")
    base = datetime.strptime(main, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (int(frac) / 10 ** len(frac) if frac else 0.0)


def read_raw_mooncake(path: str | os.PathLike[str]) -> LengthTable:
    """Reads Mooncake's ``conversation_trace.jsonl`` (fields ``timestamp`` ms, ``input_length``,
    ``output_length``); raises ValueError naming file:line on a malformed line."""
    ts: list[int] = []
    ins: list[int] = []
    outs: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ts.append(int(row["timestamp"]))
                ins.append(int(row["input_length"]))
                outs.append(int(row["output_length"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: bad Mooncake trace line: {e}") from None
    t = np.asarray(ts, dtype=np.int64)
    return LengthTable("mooncake", (t - t[0]) / 1000.0, np.asarray(ins, np.int64), np.asarray(outs, np.int64))


def read_raw_azure(path: str | os.PathLike[str]) -> LengthTable:
    """Reads Azure's ``AzureLLMInferenceTrace_conv.csv`` (``TIMESTAMP``, ``ContextTokens``,
    ``GeneratedTokens``); arrival in seconds from the first row, rounded to 1 us."""
    ts: list[float] = []
    ins: list[int] = []
    outs: list[int] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for lineno, row in enumerate(reader, 2):
            try:
                ts.append(_parse_azure_time(row["TIMESTAMP"]))
                ins.append(int(row["ContextTokens"]))
                outs.append(int(row["GeneratedTokens"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: bad Azure trace row: {e}") from None
    t = np.asarray(ts, dtype=np.float64)
    return LengthTable("azure", np.round(t - t[0], 6), np.asarray(ins, np.int64), np.asarray(outs, np.int64))


def _write_gz_csv(path: Path, header: str, rows: list[str]) -> None:
    # mtime=0: the same table always gives the same bytes
    data = ("\n".join([header, *rows]) + "\n").encode()
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(data)


def build_tables(traces_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] = DATA_DIR) -> None:
    """Rebuilds the shipped ``data/*.csv.gz`` tables from the raw trace files in ``traces_dir``."""
    src = Path(traces_dir)
    out = Path(out_dir)
    moon = read_raw_mooncake(src / MOONCAKE_FILE)
    _write_gz_csv(
        out / MOONCAKE_TABLE,
        "timestamp_ms,input_length,output_length",
        [
            f"{round(a * 1000)},{p},{o}"
            for a, p, o in zip(moon.arrival_s, moon.prompt_lens, moon.output_lens, strict=True)
        ],
    )
    az = read_raw_azure(src / AZURE_FILE)
    _write_gz_csv(
        out / AZURE_TABLE,
        "arrival_s,context_tokens,generated_tokens",
        [f"{a:.6f},{p},{o}" for a, p, o in zip(az.arrival_s, az.prompt_lens, az.output_lens, strict=True)],
    )


def _read_gz_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    lines = text.splitlines()
    header = lines[0].split(",")
    arr = np.loadtxt(io.StringIO("\n".join(lines[1:])), delimiter=",", dtype=np.float64, ndmin=2)
    return header, arr


_TABLE_CACHE: dict[str, LengthTable] = {}


def load_table(source: str, traces_dir: str | os.PathLike[str] | None = None) -> LengthTable:
    """The length table of ``source`` ("mooncake" or "azure").

    From the shipped copy in ``data/`` by default (cached), or parsed from the raw trace file when
    ``traces_dir`` (e.g. ``../shared/traces``) is given.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown length source {source!r}; expected one of {', '.join(SOURCES)}")
    if traces_dir is not None:
        d = Path(traces_dir)
        return (
            read_raw_mooncake(d / MOONCAKE_FILE) if source == "mooncake" else read_raw_azure(d / AZURE_FILE)
        )
    if source not in _TABLE_CACHE:
        path = DATA_DIR / (MOONCAKE_TABLE if source == "mooncake" else AZURE_TABLE)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing; rebuild it with benchmarks.workload.lengths.build_tables(<traces dir>)"
            )
        _, arr = _read_gz_csv(path)
        arrival = arr[:, 0] / 1000.0 if source == "mooncake" else arr[:, 0]
        _TABLE_CACHE[source] = LengthTable(
            source, arrival, arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64)
        )
    return _TABLE_CACHE[source]


def scale_lengths(lengths: np.ndarray, scale: float) -> np.ndarray:
    """``max(1, round(length / scale))`` as int64 tokens (round half to even, numpy's rule)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"length scale must be a finite number > 0, got {scale!r}")
    if scale == 1:
        return np.maximum(np.asarray(lengths, dtype=np.int64), 1)
    return np.maximum(np.rint(np.asarray(lengths, dtype=np.float64) / scale).astype(np.int64), 1)


@dataclass(frozen=True)
class LengthSampler:
    """Draws (prompt_len, output_len) pairs in tokens from an empirical trace table.

    ``prompt_scale`` / ``output_scale`` divide the source lengths (then round, at least 1 token);
    ``max_prompt_len`` / ``max_output_len`` (tokens, after scaling; ``None`` = no cap) are applied by
    clipping (``cap_mode="clip"``, default) or by redrawing the whole row (``"resample"``), see the
    module docstring.
    """

    source: str
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    max_prompt_len: int | None = None
    max_output_len: int | None = None
    cap_mode: str = "clip"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown length source {self.source!r}; expected one of {', '.join(SOURCES)}")
        for name in ("prompt_scale", "output_scale"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("max_prompt_len", "max_output_len"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 tokens or None, got {v!r}")
        if self.cap_mode not in CAP_MODES:
            raise ValueError(f"cap_mode must be one of {', '.join(CAP_MODES)}, got {self.cap_mode!r}")

    def scaled_table(self) -> tuple[np.ndarray, np.ndarray]:
        """The source's (prompt, output) lengths after scaling, before capping (int64 tokens)."""
        t = load_table(self.source)
        return scale_lengths(t.prompt_lens, self.prompt_scale), scale_lengths(
            t.output_lens, self.output_scale
        )

    def cap(self, prompt: np.ndarray, output: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Clips already-scaled lengths to the caps (used by ``clip`` and by trace replay)."""
        if self.max_prompt_len is not None:
            prompt = np.minimum(prompt, self.max_prompt_len)
        if self.max_output_len is not None:
            output = np.minimum(output, self.max_output_len)
        return prompt, output

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (prompt_lens, output_lens) int64 token arrays, paired row by row as in the trace."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        prompt, output = self.scaled_table()
        if self.cap_mode == "clip":
            idx = rng.integers(0, prompt.shape[0], size=n)
            return self.cap(prompt[idx], output[idx])
        fits = np.ones(prompt.shape[0], dtype=bool)
        if self.max_prompt_len is not None:
            fits &= prompt <= self.max_prompt_len
        if self.max_output_len is not None:
            fits &= output <= self.max_output_len
        if fits.mean() < 0.01:
            raise ValueError(
                f"{self.source}: only {int(fits.sum())} of {fits.size} rows fit max_prompt_len="
                f"{self.max_prompt_len}, max_output_len={self.max_output_len} after scaling; "
                "resampling would not represent the source: raise the caps or use cap_mode='clip'"
            )
        # redrawing a row until it fits == drawing uniformly among the rows that fit
        rows = np.flatnonzero(fits)
        idx = rows[rng.integers(0, rows.shape[0], size=n)]
        return prompt[idx], output[idx]


def mooncake_sampler(
    scale: float = 1.0,
    max_prompt_len: int | None = None,
    max_output_len: int | None = None,
    cap_mode: str = "clip",
    output_scale: float | None = None,
) -> LengthSampler:
    """Mooncake conversation (prompt, output) lengths; ``output_scale`` defaults to ``scale``."""
    return LengthSampler(
        "mooncake",
        scale,
        scale if output_scale is None else output_scale,
        max_prompt_len,
        max_output_len,
        cap_mode,
    )


def azure_sampler(
    scale: float = 1.0,
    max_prompt_len: int | None = None,
    max_output_len: int | None = None,
    cap_mode: str = "clip",
    output_scale: float | None = None,
) -> LengthSampler:
    """Azure conversation (prompt, output) lengths; ``output_scale`` defaults to ``scale``."""
    return LengthSampler(
        "azure",
        scale,
        scale if output_scale is None else output_scale,
        max_prompt_len,
        max_output_len,
        cap_mode,
    )
