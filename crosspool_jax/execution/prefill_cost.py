"""What a prefill call costs, learnt from the calls a device group ran; the step's prefill budget.

A prefill call's seconds are fitted as

    seconds = c_call + c_dense x dense_flops + c_attn x attention_flops

over the group's last `window` measured prefill calls (least squares with every coefficient >= 0,
and c_attn >= c_dense: attention is never priced cheaper per FLOP than the dense matmuls, so a fit
made on short prompts still charges a long context's attention). `dense_flops` are the projections
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

MIN_POINTS = 4  # measured calls before the fit prices anything
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
        """(c_call s, c_dense s/FLOP, c_attn s/FLOP), or None before `MIN_POINTS` calls; refitted
        when `REFIT_EVERY` calls came since the last fit (at once while it has none)."""
        if len(self._points) >= MIN_POINTS and (self._coef is None or self._new >= REFIT_EVERY):
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
        None before the fit. A step's prefill of several requests is priced as one request at the
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
    if best is None:  # no non-negative fit: the mean seconds as a per-call cost
        return float(y.mean()), 0.0, 0.0
    x = best[1]
    c0 = x[0] / scale[0]
    c1 = x[1] / scale[1]
    c2 = c1 + x[2] / scale[2]
    return float(c0), float(c1), float(c2)
