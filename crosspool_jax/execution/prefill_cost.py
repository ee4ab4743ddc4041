"""What a prefill call costs, learnt from the calls a device group ran; the step's prefill budget.

A prefill call's seconds are fitted as

    seconds = c_call + c_dense x dense_flops + c_attn x attention_flops

over the group's last `window` measured prefill calls (least squares with every coefficient >= 0,
and c_attn >= c_dense: attention is never priced cheaper per FLOP than the dense matmuls, so a fit
made on short prompts still charges a long context's attention). Calls of one shape do not tell the
per-call cost from the per-FLOP ones: such a fit comes out as a constant (c_dense = 0), which
priced a 2,048-token chunk at 60K tokens of context like one at 0 and let it run 1.6-2x the decode
call it was budgeted to match (one H200, 2026-12-05, docs/benchmarks.md). So until the fit has
`MIN_POINTS` calls, and whenever its c_dense is 0, the calls are priced by a prior instead
(`_prior`): `FIXED_SHARE` of the shortest call is the per-call cost and the rest of each call's
seconds scales with its FLOPs (dense and attention alike). `dense_flops` are the projections
and FFN (top-k experts) of the call's tokens, `attention_flops` its query-key and value products
over the context each token sees (`models.costs.ModelCosts`). Counting the context is what tells a
chunk of 512 tokens at position 60,000 (mostly attention) from the same chunk at position 0.

The budget (`tokens_within`): the most prompt tokens whose predicted seconds, at the context where
the step's prefill continues, fit a time allowance (the runner's: `prefill_share` x its measured
decode call). Plain Python, no JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Iterable

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

    def __add__(self, other: PrefillWork) -> PrefillWork:
        return PrefillWork(self.tokens + other.tokens, self.dense_flops + other.dense_flops,
                           self.attention_flops + other.attention_flops)


NO_WORK = PrefillWork(0, 0.0, 0.0)


def chunk_work(costs: ModelCosts, start: int, end: int) -> PrefillWork:
    """`PrefillWork` of prompt positions [start, end) of one request (KV of [0, start) already
    written): token i attends to start + i + 1 positions."""
    q = end - start
    if q <= 0:
        return NO_WORK
    pairs = q * start + q * (q + 1) / 2
    return PrefillWork(q, q * (costs.kv_flops_per_token + costs.w_flops_per_token),
                       pairs * costs.attn_flops_per_pair)


def chunks_work(costs: ModelCosts, spans: Iterable[tuple[int, int]]) -> PrefillWork:
    """The summed `chunk_work` of several (start, end) spans of one model."""
    total = NO_WORK
    for start, end in spans:
        total = total + chunk_work(costs, start, end)
    return total


class PrefillCostFit:
    """Seconds of a prefill call from its `PrefillWork` (module docstring), fitted over the last
    `window` calls `observe`d. Not thread-safe: the runner's stepping thread owns it."""

    def __init__(self, window: int = 64):
        self._points: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=window)
        self._coef: tuple[float, float, float] | None = None
        self._new = 0  # points observed since the last fit

    def observe(self, work: PrefillWork, seconds: float) -> None:
        """One measured call: its work and its device seconds."""
        if work.tokens <= 0 or not seconds > 0:
            return
        self._points.append((work.dense_flops, work.attention_flops, float(seconds)))
        self._new += 1

    @property
    def points(self) -> int:
        return len(self._points)

    @property
    def coefficients(self) -> tuple[float, float, float] | None:
        """(c_call s, c_dense s/FLOP, c_attn s/FLOP): None before any call; the prior (`_prior`)
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
        c0, c1, c2 = coef
        return calls * c0 + c1 * work.dense_flops + c2 * work.attention_flops

    def tokens_within(self, seconds: float, costs: ModelCosts, context: int, chunk: int,
                      most: int) -> int | None:
        """The most prompt tokens (<= `most`) of one request continuing at position `context` whose
        predicted seconds, in calls of at most `chunk` tokens, fit `seconds`; 0 if none fits;
        None before any call is measured. A step's prefill of several requests is priced as one request at the
        longest context among them (an upper bound: attention grows with the context)."""
        if self.coefficients is None:
            return None

        def cost(n: int) -> float:
            return self.predict(chunk_work(costs, context, context + n), math.ceil(n / chunk)) or 0.0

        if cost(most) <= seconds:
            return most
        lo, hi = 0, most  # cost(lo) <= seconds < cost(hi); cost grows with n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid)
        return lo


def _fit(points: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Non-negative least squares of seconds ~ c0 + c1 x dense + c2 x attention with c2 >= c1,
    by trying each set of free coefficients (three: few enough to enumerate). Columns are scaled
    to unit norm first (FLOPs are ~1e12, the constant 1)."""
    a = np.array([[1.0, d, at] for d, at, _ in points])
    y = np.array([s for _, _, s in points])
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    a = a / scale
    best: tuple[float, np.ndarray] | None = None
    # c2 >= c1 is kept by fitting c2 = c1 + e (e >= 0): columns [1, dense + attention, attention]
    b = a.copy()
    b[:, 1] = a[:, 1] + a[:, 2] * scale[2] / scale[1]
    for free in itertools.chain.from_iterable(itertools.combinations(range(3), k) for k in (1, 2, 3)):
        cols = list(free)
        sol, *_ = np.linalg.lstsq(b[:, cols], y, rcond=None)
        if np.any(sol < 0):
            continue
        x = np.zeros(3)
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
    if c1 <= 0.0:  # the per-FLOP cost not told from the per-call one (module docstring)
        return _prior(points)
    return float(c0), float(c1), float(c2)


def _prior(points: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Coefficients without an identified fit: `FIXED_SHARE` of the shortest call per call, the
    rest of the calls' seconds per FLOP (dense and attention at one rate)."""
    c0 = FIXED_SHARE * min(s for _, _, s in points)
    flops = sum(d + a for d, a, _ in points)
    rate = sum(s - c0 for _, _, s in points) / flops if flops > 0 else 0.0
    return float(c0), float(rate), float(rate)
