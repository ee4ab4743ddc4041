"""Measured shape of a trace: per-model counts, arrival CV, length percentiles, burstiness.

Definitions (times in seconds, lengths in tokens):

- arrival CV: std / mean of the gaps between consecutive arrivals (population std). ``cv_all``
  pools every model's requests into one stream; ``cv_per_model`` is per model (models with at least
  3 requests); ``cv_model_median`` is the median of those. Poisson gives ~1; the bursty arm's
  per-model CV is about ``cv`` inside a burst and higher across on/off periods.
- burstiness: arrivals counted in consecutive 10 s windows over [0, duration); ``peak_over_mean``
  = the busiest window's count / the mean count per window (1 = perfectly flat).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from benchmarks.workload.trace import Trace

WINDOW_S = 10.0


def arrival_cv(arrivals_s: np.ndarray) -> float | None:
    """CV of the inter-arrival gaps (None with fewer than 3 arrivals or all at one instant)."""
    a = np.sort(np.asarray(arrivals_s, dtype=np.float64))
    if a.shape[0] < 3:
        return None
    gaps = np.diff(a)
    m = gaps.mean()
    return float(gaps.std() / m) if m > 0 else None


def peak_over_mean(arrivals_s: np.ndarray, duration_s: float, window_s: float = WINDOW_S) -> float | None:
    """Busiest ``window_s`` window's arrivals / the mean per window over [0, duration_s)."""
    a = np.asarray(arrivals_s, dtype=np.float64)
    if a.shape[0] == 0 or duration_s <= 0:
        return None
    nwin = max(1, int(np.ceil(duration_s / window_s)))
    counts = np.bincount(np.minimum((a / window_s).astype(np.int64), nwin - 1), minlength=nwin)
    return float(counts.max() / counts.mean())


def _pcts(x: np.ndarray) -> dict[str, float]:
    if x.shape[0] == 0:
        return {}
    return {
        "p50": float(np.percentile(x, 50)),
        "p90": float(np.percentile(x, 90)),
        "p99": float(np.percentile(x, 99)),
        "max": float(x.max()),
        "mean": float(x.mean()),
    }


def summarize(trace: Trace, window_s: float = WINDOW_S) -> dict[str, Any]:
    """The measured summary of ``trace`` as a JSON-ready dict (see the module docstring)."""
    reqs = trace.requests
    t = np.array([r.arrival_s for r in reqs], dtype=np.float64)
    duration = float(trace.meta.get("duration_s", float(t.max()) if t.size else 0.0))
    counts = Counter(r.model for r in reqs)
    order = list(trace.meta.get("models", [])) or trace.models
    order += [m for m in counts if m not in order]
    per_model_cv: dict[str, float | None] = {}
    for m in order:
        per_model_cv[m] = arrival_cv(np.array([r.arrival_s for r in reqs if r.model == m]))
    cvs = [v for v in per_model_cv.values() if v is not None]
    prompt = np.array([r.prompt_len for r in reqs], dtype=np.float64)
    output = np.array([r.output_len for r in reqs], dtype=np.float64)
    return {
        "num_requests": len(reqs),
        "duration_s": duration,
        "mean_rate": len(reqs) / duration if duration > 0 else None,
        "requests_per_model": {m: counts.get(m, 0) for m in order},
        "cv_all": arrival_cv(t),
        "cv_per_model": per_model_cv,
        "cv_model_median": float(np.median(cvs)) if cvs else None,
        "peak_over_mean": peak_over_mean(t, duration, window_s),
        "window_s": window_s,
        "prompt_len": _pcts(prompt),
        "output_len": _pcts(output),
        "prompt_tokens_total": int(prompt.sum()),
        "output_tokens_total": int(output.sum()),
    }


def format_summary(s: dict[str, Any]) -> str:
    """A human-readable multi-line rendering of ``summarize``'s dict."""

    def f(v: float | None, nd: int = 2) -> str:
        return "n/a" if v is None else f"{v:.{nd}f}"

    lines = [
        f"requests: {s['num_requests']} over {f(s['duration_s'], 1)} s (mean {f(s['mean_rate'], 3)} req/s)",
        f"arrival CV: all models pooled {f(s['cv_all'])}, per-model median {f(s['cv_model_median'])}",
        f"burstiness: peak/mean arrivals over {s['window_s']:g} s windows {f(s['peak_over_mean'])}",
    ]
    for key in ("prompt_len", "output_len"):
        p = s[key]
        if p:
            lines.append(
                f"{key} (tokens): p50 {p['p50']:.0f}  p90 {p['p90']:.0f}  p99 {p['p99']:.0f}  "
                f"max {p['max']:.0f}  mean {p['mean']:.1f}"
            )
    lines.append("requests per model (per-model arrival CV):")
    width = max((len(m) for m in s["requests_per_model"]), default=0)
    for m, n in s["requests_per_model"].items():
        lines.append(f"  {m:<{width}}  {n:6d}  (CV {f(s['cv_per_model'].get(m))})")
    return "\n".join(lines)
