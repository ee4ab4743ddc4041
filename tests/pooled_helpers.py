"""Helpers of the pooled-step tests: build a `GroupRunner` for given models (arena sized from the
models' rows, KV pages on top) and drive it to completion, recording what the run went through.

Sizing (as the arena module states it): a KV device's arena = the attention-side rows of every model
(`attn_pages`) + the KV pages; a weights device's arena = the FFN-side rows of every model; every
device's arena has the same number of pages, so the arena is the larger of the two. Colocated: one
device holds both sides in its `attn_pages`, then the KV pages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from crosspool_jax.execution.pool_runner import GroupRunner
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.memory.arena import model_rows
from crosspool_jax.memory.topology import PoolTopology, Role
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.params import ModelWeights
from crosspool_jax.models.reference import ReferenceGenerator
from pallas_kernels.page_layout import PoolLayout

PAGE_BYTES = 4096
ROW_ELEMS = 16
LAYOUT = PoolLayout(page_bytes=PAGE_BYTES, dtype="float32", row_elems=ROW_ELEMS)
GREEDY = SamplingParams()


def f32(weights: ModelWeights) -> ModelWeights:
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), weights)


def arena_pages(models: Mapping[str, tuple[ModelConfig, ModelWeights]], num_weights: int,
                layout: PoolLayout = LAYOUT, colocated: bool = False) -> tuple[int, int]:
    """(attn_pages, weights_pages): pages of attention-side rows per KV device (colocated: of all
    rows) and of FFN-side rows per weights device (colocated: 0)."""
    rows = {Role.KV: 0, Role.WEIGHTS: 0}
    for cfg, w in models.values():
        for role, n in model_rows(cfg, w, num_weights, layout).items():
            rows[role] += n
    rpp = layout.rows_per_page
    if colocated:
        return -(-(rows[Role.KV] + rows[Role.WEIGHTS]) // rpp), 0
    return -(-rows[Role.KV] // rpp), -(-rows[Role.WEIGHTS] // rpp)


def build_runner(models: Mapping[str, tuple[ModelConfig, ModelWeights]], *, split: str | None = "4+4",
                 colocated: jax.Device | None = None, kv_pages: int = 16, backend: str = "reference",
                 layout: PoolLayout = LAYOUT, **kw: Any) -> GroupRunner:
    """A GroupRunner over `split` (or one `colocated` device) holding `models` (name -> (config,
    float32 weights)), with `kv_pages` KV pages per KV device."""
    if colocated is not None:
        topo, nw = None, 1
    else:
        topo = PoolTopology.split(split)
        nw = len(topo.weights_devices)
    attn, wpages = arena_pages(models, nw, layout, colocated is not None)
    num_pages = max(wpages, attn + kv_pages)
    # no background warm compiles and no fallback unless a test asks (tests/test_stall_free.py):
    # each call compiles its own program, once; on CI's 2 cores background compiles (warm-ups, a
    # fallback's exact program) would compete with the test's own
    kw = {"steps_per_call": 4, "prefill_chunk": 16, "warm_programs": 0, "fallback": False, **kw}
    runner = GroupRunner(topo, dataclasses.replace(layout, num_pages=num_pages), attn, colocated=colocated,
                         kv_pages_per_device=kv_pages, backend=backend, **kw)
    for name, (cfg, w) in models.items():
        runner.add_model(name, cfg, w)
    return runner


@dataclasses.dataclass(frozen=True)
class Req:
    rid: str
    model: str
    prompt: tuple[int, ...]
    max_new: int
    sampling: SamplingParams = GREEDY
    stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass
class RunLog:
    tokens: dict[str, list[int]]
    finished: dict[str, tuple[str, str]]
    preempted: list[str]
    max_segments: dict[str, int]
    pages_used: list[int]  # pool pages used after each step
    steps: int


def drive(runner: GroupRunner, reqs: Sequence[Req], *, max_steps: int = 500,
          on_step: Any = None) -> RunLog:
    """Submits `reqs`, steps until no work is left; `on_step(runner, log)` runs after every step."""
    for r in reqs:
        runner.submit(r.rid, r.model, r.prompt, r.max_new, r.sampling, r.stop_ids)
    log = RunLog({r.rid: [] for r in reqs}, {}, [], {}, [], 0)
    while runner.has_work:
        assert log.steps < max_steps, f"no progress after {max_steps} steps"
        for rid in list(runner.reqs):
            if runner.kv.has_request(rid):
                n = len(runner.kv.segments(rid))
                log.max_segments[rid] = max(log.max_segments.get(rid, 0), n)
        res = runner.step()
        log.steps += 1
        for rid, toks in res.tokens.items():
            log.tokens[rid].extend(toks)
        for rid in res.preempted:
            log.preempted.append(rid)  # recompute keeps the tokens generated so far
        log.finished.update(res.finished)
        log.pages_used.append(runner.kv.pool_stats().pages_used)
        if on_step is not None:
            on_step(runner, log)
    return log


class References:
    """ReferenceGenerator outputs, memoised per (model, prompt, max_new, sampling, stops)."""

    def __init__(self, models: Mapping[str, tuple[ModelConfig, ModelWeights]]):
        self.gens = {name: ReferenceGenerator(cfg, w) for name, (cfg, w) in models.items()}
        self._memo: dict[Any, tuple[list[int], str]] = {}

    def __call__(self, r: Req) -> tuple[list[int], str]:
        key = (r.model, r.prompt, r.max_new, r.sampling, r.stop_ids)
        if key not in self._memo:
            res = self.gens[r.model].generate(r.prompt, r.max_new, r.sampling, r.stop_ids)
            self._memo[key] = (list(res.token_ids), res.finish_reason)
        return self._memo[key]
