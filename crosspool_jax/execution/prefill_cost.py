"""What a prefill call costs, learnt from the calls a device group ran; the step's prefill budget.

A prefill call's seconds are fitted as

    seconds = c_call + c_dense x dense_flops + c_attn x attention_flops + c_pad x padded_flops

over the group's last `window` measured prefill calls (least squares with every coefficient >= 0,
and c_attn >= c_dense: attention is never priced cheaper per FLOP than the dense matmuls, so a fit
made on short prompts still charges a long context's attention; c_pad <= c_dense: a padded query
row of the call's program, priced by a token's dense FLOPs, costs at most a real token). Calls of
one shape do not tell the per-call cost from the per-FLOP ones: such a fit comes out as a
constant (c_dense = 0), which priced a 2,048-token chunk at 60K tokens of context like one at 0
and let it run 1.6-2x the decode call it was budgeted to match (one H200, 2026-12-05,
docs/benchmarks.md). So until the fit has `MIN_POINTS` calls, and whenever its c_dense is 0, the
calls are priced by a prior instead (`_prior`): `FIXED_SHARE` of the shortest call is the
per-call cost and the rest of each call's seconds scales with its FLOPs (dense, attention and
padded rows alike). `dense_flops` are the projections and FFN (top-k experts) of the call's
tokens, `attention_flops` its query-key and value products over the context each token sees
(`models.costs.ModelCosts`). Counting the context is what tells a chunk of 512 tokens at position
60,000 (mostly attention) from the same chunk at position 0.

The budget (`tokens_within`): the most prompt tokens whose predicted seconds, at the context where
the step's prefill continues, in the program of their token bucket (padded rows priced), fit a
time allowance (the runner's: `prefill_share` x its measured decode call). Plain Python, no JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

from crosspool_jax.models.costs import ModelCosts

MIN_POINTS = 4  # measured calls before the fit (not the prior) prices
# The prior's per-call share of the shortest call. Measured: this fit over the calls of the cold
# smoke replay on one H200 (2026-12-05) put 8.5-23 ms per call on OLMoE-1B-7B prefill calls of
# 23-45 ms, about a third to a half; on one H100 a 512-token call took 9.2 ms against ~3.7 ms to
# read the weights once (docs/benchmarks.md).
FIXED_SHARE = 0.5
REFIT_EVERY = 8  # calls observed between fits once fitted (a fit is ~7 small least squares)


@dataclasses.dataclass(frozen=True)
class PrefillWork:
    """What one prefill call computes, in FLOPs (2 x multiply-adds)."""

    tokens: int
    dense_flops: float  # attention projections, routers, experts (top-k) and dense FFN
    attention_flops: float  # query-key and value products over each token's context
    # the dense FLOPs of the query rows its program computes beyond its tokens (bucket padding, or
    # a larger program's rows when its own is not compiled yet)
    padded_flops: float = 0.0

    def __add__(self, other: PrefillWork) -> PrefillWork:
        return PrefillWork(self.tokens + other.tokens, self.dense_flops + other.dense_flops,
                           self.attention_flops + other.attention_flops,
                           self.padded_flops + other.padded_flops)


NO_WORK = PrefillWork(0, 0.0, 0.0)


def dense_flops_per_token(costs: ModelCosts) -> float:
    """Dense FLOPs of one query row (projections and FFN): what a padded row costs at most."""
    return costs.kv_flops_per_token + costs.w_flops_per_token


def chunk_work(costs: ModelCosts, start: int, end: int, rows: int = 0) -> PrefillWork:
    """`PrefillWork` of prompt positions [start, end) of one request (KV of [0, start) already
    written), run in a program of `rows` query rows (0: exactly its tokens): token i attends to
    start + i + 1 positions."""
    q = end - start
    if q <= 0:
        return NO_WORK
    pairs = q * start + q * (q + 1) / 2
    per_row = dense_flops_per_token(costs)
    return PrefillWork(q, q * per_row, pairs * costs.attn_flops_per_pair, max(0, rows - q) * per_row)


Coefficients = tuple[float, float, float, float]  # c_call s, c_dense, c_attn, c_pad s/FLOP


class PrefillCostFit:
    """Seconds of a prefill call from its `PrefillWork` (module docstring), fitted over the last
    `window` calls `observe`d. Not thread-safe: the runner's stepping thread owns it."""

    def __init__(self, window: int = 64):
        self._points: collections.deque[tuple[float, float, float, float]] = collections.deque(
            maxlen=window)
        self._coef: Coefficients | None = None
        self._new = 0  # points observed since the last fit

    def observe(self, work: PrefillWork, seconds: float) -> None:
        """One measured call: its work (padded rows included) and its device seconds."""
        if work.tokens <= 0 or not seconds > 0:
            return
        self._points.append((work.dense_flops, work.attention_flops, work.padded_flops,
                             float(seconds)))
        self._new += 1

    @property
    def points(self) -> int:
        return len(self._points)

    @property
    def coefficients(self) -> Coefficients | None:
        """(c_call s, c_dense, c_attn, c_pad s/FLOP): None before any call; the prior (`_prior`)
        before `MIN_POINTS` calls; then the fit, refitted when `REFIT_EVERY` calls came since the
        last one (at once while it has none)."""
        if not self._points:
            return None
        if len(self._points) < MIN_POINTS:
            return _prior(list(self._points))
        if self._coef is None or self._new >= REFIT_EVERY:
            self._coef = _fit(list(self._points))
            self._new = 0
        return self._coef

    def predict(self, work: PrefillWork, calls: int = 1) -> float | None:
        """Seconds of `work` run in `calls` calls (None: not fitted yet)."""
        coef = self.coefficients
        if coef is None:
            return None
        c0, c1, c2, c3 = coef
        return calls * c0 + c1 * work.dense_flops + c2 * work.attention_flops + c3 * work.padded_flops

    def tokens_within(self, seconds: float, costs: ModelCosts, context: int, most: int,
                      bucket: Callable[[int], int] | None = None, devices: int = 1) -> int | None:
        """The most prompt tokens (<= `most`) of one request continuing at position `context` whose
        predicted call fits `seconds`, the call run in a program of `bucket(n)` query rows on each
        of `devices` KV devices (the token bucket n rounds up to; None: exactly n rows); 0 if none
        fits; None before any call is measured. A step's prefill of several requests is priced as
        one request at the longest context among them (an upper bound: attention grows with the
        context). Within one bucket the cost grows with n (a padded row costs at most a real one),
        so each bucket's range is searched apart: n just past a bucket's edge pays for a mostly
        empty larger program."""
        if self.coefficients is None:
            return None

        def cost(n: int) -> float:
            rows = (bucket(n) if bucket else n) * devices
            return self.predict(chunk_work(costs, context, context + n, rows)) or 0.0

        best, lo = 0, 1
        while lo <= most:
            hi = min(most, max(lo, bucket(lo))) if bucket else most  # [lo, hi]: one bucket
            if cost(lo) <= seconds:
                a, b = lo, hi + 1  # cost(a) <= seconds; b: past the range or over
                while b - a > 1:
                    mid = (a + b) // 2
                    a, b = (mid, b) if cost(mid) <= seconds else (a, mid)
                best = a
            lo = hi + 1
        return best


def _fit(points: list[tuple[float, float, float, float]]) -> Coefficients:
    """Non-negative least squares of seconds ~ c0 + c1 x dense + c2 x attention + c3 x padded with
    c2 >= c1 >= c3, by trying each set of free coefficients (four: few enough to enumerate).
    Columns are scaled to unit norm first (FLOPs are ~1e12, the constant 1)."""
    a = np.array([[1.0, d, at, pad] for d, at, pad, _ in points])
    y = np.array([s for *_, s in points])
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    best: tuple[float, np.ndarray] | None = None
    # c2 >= c1 is kept by fitting c2 = c1 + e (e >= 0): columns [1, dense + attention, attention, pad]
    b = a.copy()
    b[:, 1] = a[:, 1] + a[:, 2] * scale[2] / scale[1]
    for free in itertools.chain.from_iterable(itertools.combinations(range(4), k) for k in (1, 2, 3, 4)):
        cols = list(free)
        sol, *_ = np.linalg.lstsq(b[:, cols], y, rcond=None)
        if np.any(sol < 0):
            continue
        x = np.zeros(4)
        x[cols] = sol
        err = float(np.sum((b @ x - y) ** 2))
        if best is None or err < best[0]:
            best = (err, x)
    if best is None:  # no non-negative fit
        return _prior(points)
    x = best[1]
    c0 = x[0] / scale[0]
    c1 = x[1] / scale[1]
    c2 = c1 + x[2] / scale[2]
    c3 = min(c1, x[3] / scale[3])  # a padded row never costs more than a real one
    if c1 <= 0.0:  # the per-FLOP cost not told from the per-call one (module docstring)
        return _prior(points)
    return float(c0), float(c1), float(c2), float(c3)


def _prior(points: list[tuple[float, float, float, float]]) -> Coefficients:
    """Coefficients without an identified fit: `FIXED_SHARE` of the shortest call per call, the
    rest of the calls' seconds per FLOP (dense, attention and padded rows at one rate)."""
    c0 = FIXED_SHARE * min(s for *_, s in points)
    flops = sum(d + a + pad for d, a, pad, _ in points)
    rate = sum(s - c0 for *_, s in points) / flops if flops > 0 else 0.0
    return float(c0), float(rate), float(rate), float(rate)
