"""Multi-model request traces for the CrossPool benchmark (../shared/BENCHMARK.md, "Workload arms").

``generate(spec, seed) -> Trace`` is deterministic for (spec, seed): the same pair always gives the
same requests (numpy ``Generator``s spawned from ``SeedSequence(seed)``, one per concern, so e.g.
the lengths do not shift when the arrival process draws differently).

Popularity: model ``i`` (0-based, in ``model_names`` order) gets the share
``w_i = (i+1)^-alpha / sum_j (j+1)^-alpha`` of the total rate (MuxServe's law; alpha 0 = equal).

Arms (times in seconds, rates in requests/s, lengths in tokens):

``bursty-long`` (the headline; Prism's trace generator, BENCHMARK.md arm 1)
    Models are partitioned (seeded shuffle) into burst groups of ``burst_group_min``-
    ``burst_group_max`` models. Each group has its own on/off schedule: cycles of length uniform in
    [``cycle_min_s``, ``cycle_max_s``], each cycle "on" for ``(1 - off_fraction)`` of it then "off",
    the first cycle starting at a random phase before t=0. During "on" a model's arrivals are a
    stationary Gamma renewal process (shape ``1/cv^2``, so inter-arrival CV = ``cv``) at rate
    ``total_rate * w_i / (1 - off_fraction)``; the process is run on the group's concatenated on-time
    and mapped back to wall time, so the long-run mean rate of model ``i`` is ``total_rate * w_i``.
    Lengths: Mooncake conversation (prompt, output) pairs.
``uniform`` (control, arm 3)
    Poisson arrivals (CV 1) per model at ``total_rate * w_i``, no on/off; ``cv`` and the burst fields
    are not used. Lengths: Azure conversation pairs.
``replay`` (arm 2)
    The Mooncake conversation trace's own timestamps and (prompt, output) lengths, each request
    assigned to a model by an i.i.d. draw from ``w``; arrival = timestamp / ``time_compression``
    (> 1 = faster); requests with compressed arrival < ``duration_s`` are kept (Mooncake spans
    3,537 s, so at most ``3537 / time_compression`` s). Mooncake stamps are quantised to 3 s, so
    requests arrive in clumps; they are kept as they are. ``total_rate`` is not used: the rate is
    Mooncake's (3.40 req/s on average) times ``time_compression``.
``ramp`` (kvcached ``bench_latency_benefit``, arm 4)
    Model ``k`` starts at ``k * ramp_delay_s``; its Poisson rate ramps linearly from
    ``ramp_start_rps`` to ``ramp_peak_rps`` at ``ramp_increment`` req/s per second, back down to
    ``ramp_end_rps`` at the same slope, then stays at ``ramp_end_rps`` until ``duration_s``.
    ``ramp_delay_s=None`` uses kvcached's ``up // 4 + 2 * up`` (up = ramp-up seconds; 36 s for
    peak 16), so one model peaks at a time; ``ramp_natural_duration_s`` gives kvcached's end (every
    model's request count used up). Popularity and ``total_rate`` are not used. Lengths: fixed
    (``fixed_prompt_len``, ``fixed_output_len``; kvcached: 256 and 256).

Lengths from every source are divided by ``length_scale`` (outputs by ``output_length_scale`` when
set), rounded, at least 1, then capped at ``max_prompt_len`` / ``max_output_len`` by ``cap_mode``
(clip or resample, see ``lengths.py``; replay clips only).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.workload.lengths import CAP_MODES, LengthSampler, load_table, scale_lengths
from benchmarks.workload.trace import Trace, TraceRequest

ARMS: tuple[str, ...] = ("bursty-long", "uniform", "replay", "ramp")
LENGTH_SOURCES: tuple[str, ...] = ("mooncake", "azure", "fixed")
DEFAULT_LENGTH_SOURCE: dict[str, str] = {
    "bursty-long": "mooncake",
    "uniform": "azure",
    "replay": "mooncake",
    "ramp": "fixed",
}
TRACE_FORMAT = "crosspool-workload-trace"
TRACE_FORMAT_VERSION = 1
_ARRIVAL_DECIMALS = 6  # arrivals rounded to 1 us


def _finite_pos(name: str, v: Any, allow_zero: bool = False) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise ValueError(
            f"WorkloadSpec.{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}"
        )


def _pos_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"WorkloadSpec.{name} must be an integer >= 1, got {v!r}")


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that defines a trace except the seed (see the module docstring per arm).

    Units: ``total_rate`` and ``ramp_*_rps`` in requests/s, ``ramp_increment`` in requests/s per
    second, ``*_s`` in seconds, ``*_len`` in tokens. ``model_names=None`` means ``model-00``,
    ``model-01``, ...; the order is the popularity rank (first = most popular).
    ``length_source=None`` picks the arm's default (``DEFAULT_LENGTH_SOURCE``).
    """

    arm: str = "bursty-long"
    num_models: int = 8
    model_names: tuple[str, ...] | None = None
    total_rate: float = 1.0
    duration_s: float = 600.0
    alpha: float = 1.3
    cv: float = 4.0
    off_fraction: float = 0.5
    cycle_min_s: float = 60.0
    cycle_max_s: float = 300.0
    burst_group_min: int = 2
    burst_group_max: int = 3
    length_source: str | None = None
    max_prompt_len: int | None = None
    max_output_len: int | None = None
    length_scale: float = 1.0
    output_length_scale: float | None = None
    cap_mode: str = "clip"
    time_compression: float = 1.0
    fixed_prompt_len: int = 256
    fixed_output_len: int = 256
    ramp_start_rps: float = 0.0
    ramp_peak_rps: float = 16.0
    ramp_end_rps: float = 1.0
    ramp_increment: float = 1.0
    ramp_delay_s: float | None = None

    def __post_init__(self) -> None:
        if self.arm not in ARMS:
            raise ValueError(f"WorkloadSpec.arm must be one of {', '.join(ARMS)}, got {self.arm!r}")
        _pos_int("num_models", self.num_models)
        if self.model_names is not None:
            names = tuple(self.model_names)
            object.__setattr__(self, "model_names", names)
            if len(names) != self.num_models:
                raise ValueError(
                    f"WorkloadSpec.model_names has {len(names)} names but num_models is {self.num_models}"
                )
            for n in names:
                if not isinstance(n, str) or not n.strip() or n != n.strip():
                    raise ValueError(f"WorkloadSpec.model_names: bad name {n!r} (non-empty, no outer spaces)")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"WorkloadSpec.model_names: duplicate names {', '.join(dup)}")
        _finite_pos("total_rate", self.total_rate)
        _finite_pos("duration_s", self.duration_s)
        _finite_pos("alpha", self.alpha, allow_zero=True)
        _finite_pos("cv", self.cv)
        _finite_pos("off_fraction", self.off_fraction, allow_zero=True)
        if self.off_fraction >= 1:
            raise ValueError(f"WorkloadSpec.off_fraction must be in [0, 1), got {self.off_fraction!r}")
        _finite_pos("cycle_min_s", self.cycle_min_s)
        _finite_pos("cycle_max_s", self.cycle_max_s)
        if self.cycle_max_s < self.cycle_min_s:
            raise ValueError(
                f"WorkloadSpec.cycle_max_s ({self.cycle_max_s}) must be >= cycle_min_s ({self.cycle_min_s})"
            )
        _pos_int("burst_group_min", self.burst_group_min)
        _pos_int("burst_group_max", self.burst_group_max)
        if self.burst_group_max < self.burst_group_min:
            raise ValueError(
                f"WorkloadSpec.burst_group_max ({self.burst_group_max}) must be >= burst_group_min "
                f"({self.burst_group_min})"
            )
        if self.length_source is not None and self.length_source not in LENGTH_SOURCES:
            raise ValueError(
                f"WorkloadSpec.length_source must be one of {', '.join(LENGTH_SOURCES)} or None, "
                f"got {self.length_source!r}"
            )
        if self.arm == "replay" and self.length_source not in (None, "mooncake"):
            raise ValueError(
                "WorkloadSpec: arm 'replay' uses the Mooncake trace's own lengths; set length_source=None"
            )
        for name in ("max_prompt_len", "max_output_len"):
            v = getattr(self, name)
            if v is not None:
                _pos_int(name, v)
        _finite_pos("length_scale", self.length_scale)
        if self.output_length_scale is not None:
            _finite_pos("output_length_scale", self.output_length_scale)
        if self.cap_mode not in CAP_MODES:
            raise ValueError(
                f"WorkloadSpec.cap_mode must be one of {', '.join(CAP_MODES)}, got {self.cap_mode!r}"
            )
        if self.arm == "replay" and self.cap_mode != "clip":
            raise ValueError(
                "WorkloadSpec: arm 'replay' keeps every request of the window, so cap_mode must be 'clip'"
            )
        _finite_pos("time_compression", self.time_compression)
        _pos_int("fixed_prompt_len", self.fixed_prompt_len)
        _pos_int("fixed_output_len", self.fixed_output_len)
        _finite_pos("ramp_start_rps", self.ramp_start_rps, allow_zero=True)
        _finite_pos("ramp_peak_rps", self.ramp_peak_rps)
        _finite_pos("ramp_end_rps", self.ramp_end_rps, allow_zero=True)
        _finite_pos("ramp_increment", self.ramp_increment)
        if self.ramp_peak_rps < max(self.ramp_start_rps, self.ramp_end_rps):
            raise ValueError(
                f"WorkloadSpec.ramp_peak_rps ({self.ramp_peak_rps}) must be >= ramp_start_rps "
                f"({self.ramp_start_rps}) and ramp_end_rps ({self.ramp_end_rps})"
            )
        if self.ramp_delay_s is not None:
            _finite_pos("ramp_delay_s", self.ramp_delay_s, allow_zero=True)

    @property
    def names(self) -> tuple[str, ...]:
        """Model names, most popular first."""
        if self.model_names is not None:
            return self.model_names
        width = max(2, len(str(self.num_models - 1)))
        return tuple(f"model-{i:0{width}d}" for i in range(self.num_models))

    @property
    def resolved_length_source(self) -> str:
        """``length_source`` or the arm's default."""
        return self.length_source or DEFAULT_LENGTH_SOURCE[self.arm]

    @property
    def resolved_ramp_delay_s(self) -> float:
        """Stagger between the ramp arm's model starts (s): kvcached's ``up // 4 + 2 * up`` by default."""
        if self.ramp_delay_s is not None:
            return float(self.ramp_delay_s)
        up = (self.ramp_peak_rps - self.ramp_start_rps) / self.ramp_increment
        return float(math.floor(up / 4) + 2 * up)

    def popularity(self) -> np.ndarray:
        """Each model's share of the total rate, ``(i+1)^-alpha`` normalised (sums to 1)."""
        w = np.arange(1, self.num_models + 1, dtype=np.float64) ** -self.alpha
        return w / w.sum()

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready values (tuples as lists)."""
        d = dataclasses.asdict(self)
        if d["model_names"] is not None:
            d["model_names"] = list(d["model_names"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkloadSpec:
        """Inverse of ``to_dict`` (e.g. from a trace's ``meta["spec"]``); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"WorkloadSpec: unknown fields {', '.join(extra)}")
        d = dict(d)
        if d.get("model_names") is not None:
            d["model_names"] = tuple(d["model_names"])
        return cls(**d)


def ramp_natural_duration_s(spec: WorkloadSpec) -> float:
    """kvcached's end of the ramp run (s): ramp up + ramp down + num_models * delay.

    kvcached gives model ``k`` ``peak^2 + (N - k) * delay`` requests; after its triangle (about
    ``peak^2`` requests) it sends the rest at the end rate of 1 req/s, so every model stops at this
    time.
    """
    up = (spec.ramp_peak_rps - spec.ramp_start_rps) / spec.ramp_increment
    down = (spec.ramp_peak_rps - spec.ramp_end_rps) / spec.ramp_increment
    return up + down + spec.num_models * spec.resolved_ramp_delay_s


# ---------------------------------------------------------------------------------------------
# arrival processes


def gamma_renewal(rng: np.random.Generator, rate: float, cv: float, horizon_s: float) -> np.ndarray:
    """Arrival times in [0, horizon_s) of a stationary renewal process with Gamma gaps.

    Gaps: mean ``1/rate`` s, CV ``cv`` (shape ``1/cv^2``). Stationary: the first arrival is the
    forward recurrence time ``U * L`` with ``L`` length-biased (Gamma with shape + 1), so there is no
    artificial arrival at t=0.
    """
    if rate <= 0 or horizon_s <= 0:
        return np.zeros(0)
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (rate * shape)
    first = rng.uniform() * rng.gamma(shape + 1.0, scale)
    chunks = [np.array([first])]
    t = first
    n = int(rate * horizon_s * 1.1) + 16
    while t < horizon_s:
        ts = t + np.cumsum(rng.gamma(shape, scale, n))
        chunks.append(ts)
        t = float(ts[-1])
    out = np.concatenate(chunks)
    return out[out < horizon_s]


def on_windows(rng: np.random.Generator, spec: WorkloadSpec) -> list[tuple[float, float]]:
    """One burst group's "on" intervals (s) clipped to [0, duration_s], in time order."""
    f = spec.off_fraction
    if f == 0:
        return [(0.0, float(spec.duration_s))]
    t = -rng.uniform(0.0, spec.cycle_max_s)
    out: list[tuple[float, float]] = []
    while t < spec.duration_s:
        length = rng.uniform(spec.cycle_min_s, spec.cycle_max_s)
        a, b = max(t, 0.0), min(t + (1.0 - f) * length, spec.duration_s)
        if b > a:
            out.append((float(a), float(b)))
        t += length
    return out


def map_on_time(tau: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """Maps times on the concatenated on-time axis to wall-clock times inside ``windows``."""
    if not windows:
        return np.zeros(0)
    starts = np.array([a for a, _ in windows])
    lens = np.array([b - a for a, b in windows])
    cum = np.concatenate([[0.0], np.cumsum(lens)])
    k = np.clip(np.searchsorted(cum, tau, side="right") - 1, 0, len(windows) - 1)
    return starts[k] + (tau - cum[k])


def burst_groups(rng: np.random.Generator, n: int, gmin: int, gmax: int) -> list[list[int]]:
    """Partitions model indices 0..n-1 (seeded shuffle) into groups of gmin..gmax models.

    A size is drawn uniformly among those that leave either nothing or at least ``gmin`` models, so
    every group has a size in range; with fewer than ``gmin`` models there is one group of all.
    """
    order = [int(i) for i in rng.permutation(n)]
    groups: list[list[int]] = []
    while order:
        rem = len(order)
        sizes = [s for s in range(gmin, gmax + 1) if s == rem or (s < rem and rem - s >= gmin)]
        size = int(rng.choice(sizes)) if sizes else rem
        groups.append(sorted(order[:size]))
        order = order[size:]
    return groups


def _thinned_poisson(rng: np.random.Generator, rate_fn: Any, rate_max: float, horizon_s: float) -> np.ndarray:
    """Non-homogeneous Poisson arrivals on [0, horizon_s) with intensity ``rate_fn(t) <= rate_max``."""
    cand = gamma_renewal(rng, rate_max, 1.0, horizon_s)
    keep = rng.uniform(size=cand.shape[0]) * rate_max < rate_fn(cand)
    return cand[keep]


def _ramp_rate(spec: WorkloadSpec, start: float) -> Any:
    up = (spec.ramp_peak_rps - spec.ramp_start_rps) / spec.ramp_increment
    down = (spec.ramp_peak_rps - spec.ramp_end_rps) / spec.ramp_increment

    def rate(t: np.ndarray) -> np.ndarray:
        x = t - start
        r_up = spec.ramp_start_rps + spec.ramp_increment * x
        r_down = spec.ramp_peak_rps - spec.ramp_increment * (x - up)
        r = np.where(x < up, r_up, np.where(x < up + down, r_down, spec.ramp_end_rps))
        return np.where(x < 0, 0.0, r)

    return rate


# ---------------------------------------------------------------------------------------------


def _lengths(spec: WorkloadSpec, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    out_scale = spec.length_scale if spec.output_length_scale is None else spec.output_length_scale
    src = spec.resolved_length_source
    if src == "fixed":
        p = scale_lengths(np.full(n, spec.fixed_prompt_len), spec.length_scale)
        o = scale_lengths(np.full(n, spec.fixed_output_len), out_scale)
        if spec.max_prompt_len is not None:
            p = np.minimum(p, spec.max_prompt_len)
        if spec.max_output_len is not None:
            o = np.minimum(o, spec.max_output_len)
        return p, o
    sampler = LengthSampler(
        src, spec.length_scale, out_scale, spec.max_prompt_len, spec.max_output_len, spec.cap_mode
    )
    return sampler.sample(rng, n)


# (arrival times, model indices) per model, (prompt, output) lengths if the arm sets them, meta
_Arrivals = tuple[list[np.ndarray], list[np.ndarray], tuple[np.ndarray, np.ndarray] | None, dict[str, Any]]


def _model_rngs(rng_arr: np.random.Generator, n: int) -> list[np.random.Generator]:
    """One arrival generator per model, spawned from one draw of `rng_arr`."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(rng_arr.integers(2**63)).spawn(n)]


def _bursty_arrivals(spec: WorkloadSpec, w: np.ndarray, rng_groups: np.random.Generator,
                     rng_sched: np.random.Generator, rng_arr: np.random.Generator) -> _Arrivals:
    """bursty-long: models in burst groups sharing on-windows; gamma renewal arrivals while on."""
    names = spec.names
    groups = burst_groups(rng_groups, spec.num_models, spec.burst_group_min, spec.burst_group_max)
    arr_rngs = _model_rngs(rng_arr, len(names))
    times: list[np.ndarray] = []
    model_idx: list[np.ndarray] = []
    group_meta = []
    for g in groups:
        win = on_windows(rng_sched, spec)
        on_total = sum(b - a for a, b in win)
        group_meta.append({"models": [names[i] for i in g],
                           "on_windows_s": [[round(a, 3), round(b, 3)] for a, b in win],
                           "on_fraction": round(on_total / spec.duration_s, 4)})
        for i in g:
            on_rate = spec.total_rate * w[i] / (1.0 - spec.off_fraction)
            tau = gamma_renewal(arr_rngs[i], on_rate, spec.cv, on_total)
            times.append(map_on_time(tau, win))
            model_idx.append(np.full(tau.shape[0], i))
    return times, model_idx, None, {"burst_groups": group_meta}


def _uniform_arrivals(spec: WorkloadSpec, w: np.ndarray, rng_arr: np.random.Generator) -> _Arrivals:
    """uniform: a Poisson process per model at its share of the total rate."""
    arr_rngs = _model_rngs(rng_arr, len(spec.names))
    times, model_idx = [], []
    for i in range(spec.num_models):
        t = gamma_renewal(arr_rngs[i], spec.total_rate * w[i], 1.0, spec.duration_s)
        times.append(t)
        model_idx.append(np.full(t.shape[0], i))
    return times, model_idx, None, {}


def _replay_arrivals(spec: WorkloadSpec, w: np.ndarray, rng_assign: np.random.Generator) -> _Arrivals:
    """replay: the Mooncake trace's arrivals (time-compressed) and lengths, models drawn by
    popularity."""
    table = load_table("mooncake")
    t = table.arrival_s / spec.time_compression
    keep = t < spec.duration_s
    t = t[keep]
    model_idx = [rng_assign.choice(spec.num_models, size=t.shape[0], p=w)]
    out_scale = spec.length_scale if spec.output_length_scale is None else spec.output_length_scale
    sampler = LengthSampler("mooncake", spec.length_scale, out_scale, spec.max_prompt_len,
                            spec.max_output_len)
    lens = sampler.cap(scale_lengths(table.prompt_lens[keep], spec.length_scale),
                       scale_lengths(table.output_lens[keep], out_scale))
    span = float(table.arrival_s[-1] / spec.time_compression)
    meta = {"effective_duration_s": min(float(spec.duration_s), span),
            "replay": {"source": "mooncake", "source_requests_kept": int(keep.sum()),
                       "source_span_s": float(table.arrival_s[-1]), "compressed_span_s": span}}
    return [t], model_idx, lens, meta


def _ramp_arrivals(spec: WorkloadSpec, rng_arr: np.random.Generator) -> _Arrivals:
    """ramp: each model's rate ramps up after its start (model k starts k x delay)."""
    delay = spec.resolved_ramp_delay_s
    arr_rngs = _model_rngs(rng_arr, len(spec.names))
    times, model_idx = [], []
    for k in range(spec.num_models):
        rate = _ramp_rate(spec, k * delay)
        t = _thinned_poisson(arr_rngs[k], rate, spec.ramp_peak_rps, spec.duration_s)
        times.append(t)
        model_idx.append(np.full(t.shape[0], k))
    meta = {"ramp": {"delay_s": delay, "starts_s": [k * delay for k in range(spec.num_models)],
                     "natural_duration_s": ramp_natural_duration_s(spec)}}
    return times, model_idx, None, meta


def generate(spec: WorkloadSpec, seed: int) -> Trace:
    """The trace of ``spec`` for ``seed`` (an int >= 0); see the module docstring for each arm."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    ss = np.random.SeedSequence(int(seed))
    rng_groups, rng_sched, rng_arr, rng_len, rng_assign = (np.random.default_rng(s) for s in ss.spawn(5))
    names = spec.names
    w = spec.popularity()
    if spec.arm == "bursty-long":
        times, model_idx, lens, meta_extra = _bursty_arrivals(spec, w, rng_groups, rng_sched, rng_arr)
    elif spec.arm == "uniform":
        times, model_idx, lens, meta_extra = _uniform_arrivals(spec, w, rng_arr)
    elif spec.arm == "replay":
        times, model_idx, lens, meta_extra = _replay_arrivals(spec, w, rng_assign)
    else:
        times, model_idx, lens, meta_extra = _ramp_arrivals(spec, rng_arr)

    t_all = np.round(np.concatenate(times) if times else np.zeros(0), _ARRIVAL_DECIMALS)
    m_all = np.concatenate(model_idx).astype(np.int64) if model_idx else np.zeros(0, np.int64)
    if spec.arm == "replay":  # the source trace's own order (its timestamps tie in 3 s clumps)
        order = np.argsort(t_all, kind="stable")
    else:  # arrival, then model rank, then generation order
        order = np.lexsort((np.arange(t_all.shape[0]), m_all, t_all))
    t_all, m_all = t_all[order], m_all[order]
    if lens is None:
        prompt, output = _lengths(spec, rng_len, t_all.shape[0])
    else:
        prompt, output = lens[0][order], lens[1][order]

    width = max(6, len(str(t_all.shape[0])))
    requests = [
        TraceRequest(f"r{j:0{width}d}", float(t_all[j]), names[int(m_all[j])], int(prompt[j]), int(output[j]))
        for j in range(t_all.shape[0])
    ]
    duration = float(meta_extra.pop("effective_duration_s", spec.duration_s))
    meta: dict[str, Any] = {
        "format": TRACE_FORMAT,
        "version": TRACE_FORMAT_VERSION,
        "generator": "benchmarks.workload.generate",
        "seed": int(seed),
        "spec": spec.to_dict(),
        "duration_s": duration,
        "models": list(names),
        "length_source": spec.resolved_length_source,
        "num_requests": len(requests),
        **meta_extra,
    }
    if spec.arm != "ramp":
        meta["popularity"] = [round(float(x), 6) for x in w]
    return Trace(requests, meta)
