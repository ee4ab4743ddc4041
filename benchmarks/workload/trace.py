"""A replayable request trace and its JSONL file format.

File format (UTF-8, one JSON object per line):

- line 1: ``{"meta": {...}}`` — how the trace was made (generator spec, seed, models, ...); any
  JSON object;
- every further line is one request, in arrival order::

    {"request_id": "r000000", "arrival_s": 0.412, "model": "demo-mixtral",
     "prompt_len": 118, "output_len": 21}

  (shown on two lines here; one line in the file).

  ``arrival_s``: seconds from the start of the trace (finite, >= 0, non-decreasing along the file);
  ``prompt_len`` / ``output_len``: tokens (integers >= 1); ``request_id`` unique in the file. No other
  keys are allowed, so a change of format fails loudly instead of being half-read.

``save_jsonl`` then ``load_jsonl`` gives back an equal ``Trace`` (floats are written with Python's
shortest round-tripping repr). ``load_jsonl`` raises ``TraceFormatError`` naming ``file:line``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

REQUEST_KEYS: tuple[str, ...] = ("request_id", "arrival_s", "model", "prompt_len", "output_len")


class TraceFormatError(ValueError):
    """A malformed trace file; the message starts with ``path:line:``."""


def _check_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1 (tokens), got {v!r}")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace.

    ``arrival_s``: seconds from the trace start; ``prompt_len``: prompt tokens; ``output_len``: tokens
    to generate (the replay asks for exactly this many, ignoring stop tokens).
    """

    request_id: str
    arrival_s: float
    model: str
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        a = self.arrival_s
        if isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) or a < 0:
            raise ValueError(f"arrival_s must be a finite number >= 0 (seconds), got {a!r}")
        if isinstance(a, int):
            object.__setattr__(self, "arrival_s", float(a))
        _check_int("prompt_len", self.prompt_len)
        _check_int("output_len", self.output_len)

    def to_json(self) -> dict[str, Any]:
        """The request as its JSONL object (key order of ``REQUEST_KEYS``)."""
        return {k: getattr(self, k) for k in REQUEST_KEYS}


@dataclass
class Trace:
    """Requests in non-decreasing ``arrival_s`` order with unique ids, and free-form ``meta``."""

    requests: list[TraceRequest]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict, got {type(self.meta).__name__}")
        self.requests = list(self.requests)
        seen: set[str] = set()
        prev = 0.0
        for i, r in enumerate(self.requests):
            if not isinstance(r, TraceRequest):
                raise ValueError(f"requests[{i}] is a {type(r).__name__}, not a TraceRequest")
            if r.request_id in seen:
                raise ValueError(f"requests[{i}]: duplicate request_id {r.request_id!r}")
            if r.arrival_s < prev:
                raise ValueError(
                    f"requests[{i}] ({r.request_id!r}) arrives at {r.arrival_s} s, before the previous "
                    f"request ({prev} s): requests must be in arrival order"
                )
            seen.add(r.request_id)
            prev = r.arrival_s

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def models(self) -> list[str]:
        """Model names in order of first appearance."""
        return list(dict.fromkeys(r.model for r in self.requests))


def save_jsonl(trace: Trace, path: str | os.PathLike[str]) -> None:
    """Writes ``trace`` to ``path`` (meta header line, then one request per line)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"meta": trace.meta}, allow_nan=False, sort_keys=False) + "\n")
        for r in trace.requests:
            f.write(json.dumps(r.to_json(), allow_nan=False) + "\n")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def load_jsonl(path: str | os.PathLike[str]) -> Trace:
    """Reads a trace written by ``save_jsonl``; raises ``TraceFormatError("path:line: ...")``."""
    requests: list[TraceRequest] = []
    meta: dict[str, Any] | None = None
    seen: dict[str, int] = {}
    prev = 0.0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):

            def bad(msg: str, lineno: int = lineno) -> TraceFormatError:
                return TraceFormatError(f"{path}:{lineno}: {msg}")

            if not line.strip():
                raise bad("empty line")
            try:
                obj = json.loads(line, parse_constant=_reject_constant)
            except ValueError as e:
                raise bad(f"not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise bad(f"expected a JSON object, got {type(obj).__name__}")
            if meta is None:
                if set(obj) != {"meta"} or not isinstance(obj["meta"], dict):
                    raise bad('the first line must be the header {"meta": {...}}')
                meta = obj["meta"]
                continue
            if "meta" in obj:
                raise bad("a second meta header; only line 1 may hold meta")
            missing = [k for k in REQUEST_KEYS if k not in obj]
            extra = sorted(set(obj) - set(REQUEST_KEYS))
            if missing or extra:
                parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                    [f"unknown {', '.join(extra)}"] if extra else []
                )
                raise bad(f"request keys: {'; '.join(parts)} (expected {', '.join(REQUEST_KEYS)})")
            try:
                req = TraceRequest(**obj)
            except ValueError as e:
                raise bad(str(e)) from None
            if req.request_id in seen:
                raise bad(f"duplicate request_id {req.request_id!r} (first on line {seen[req.request_id]})")
            if req.arrival_s < prev:
                raise bad(f"arrival_s {req.arrival_s} is before the previous request's {prev}")
            seen[req.request_id] = lineno
            prev = req.arrival_s
            requests.append(req)
    if meta is None:
        raise TraceFormatError(f'{path}:1: empty file; expected a {{"meta": ...}} header line')
    return Trace(requests, meta)
