"""Start-up warm-up of the pooled engine: compile the step programs a first short request needs
before the server says SERVING (`crosspool serve` has its port open by then, health NOT_SERVING).

The pooled engine compiles one XLA program per step shape (lanes of model classes, slots, tokens and
KV pages bucketed, K decode steps), on its worker thread, the first time the shape occurs;
every live request waits meanwhile (2-4 s per program on a CPU, docs/benchmarks.md). Without a
warm-up the first request of each model pays for its prefill program and one decode program per
KV-page bucket it grows through. `warm_up` sends, one model at a time, one greedy request of
`prompt_tokens` prompt tokens that runs to `total_tokens` positions (stop tokens off), which
compiles the single-request programs for any prompt of up to `prompt_tokens` tokens (the prefill
bucket) generating up to `total_tokens` positions: e.g. `crosspool generate --server ... --prompt
hi` (32 new tokens by default). Programs that mix several models in one step (crosspool mode under
concurrent load) or larger shapes are still compiled when they first occur; the engine logs each.
Models that are not resident (sleeping, or registered on disk by `--load-on-request`) are skipped.
`crosspool serve --precompile-context N` additionally compiles the whole one-lane shape grid for
requests up to N tokens (`PooledEngine.precompile`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from crosspool_jax.engine_api import FINISH_ERROR, make_request
from crosspool_jax.execution.sampling import SamplingParams

PROMPT_TOKENS = 8
TOTAL_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class WarmupResult:
    model: str
    seconds: float
    programs: int  # step programs compiled while this model warmed up
    tokens: int


def warm_up(
    engine: Any,
    log: Callable[[str], None] | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
    total_tokens: int = TOTAL_TOKENS,
    timeout: float = 600.0,
) -> list[WarmupResult]:
    """Runs the warm-up requests (see module docstring) on `engine`, one model at a time, logging
    each compiled program (through the engine's `on_compile`) and each model's total. Raises
    RuntimeError when a warm-up request fails or takes longer than `timeout` seconds."""
    log = log or (lambda msg: None)
    if not hasattr(engine, "programs_compiled"):  # the reference engine: nothing to compile ahead
        return []
    previous = getattr(engine, "on_compile", None)
    engine.on_compile = lambda note: log(f"warm-up: {note}")
    out = []
    try:
        # a sleeping or on-disk model is not woken for it (its programs compile when it is loaded)
        states = dict(engine.stats().model_states)
        models = [m.name for m in engine.list_models() if states.get(m.name, "resident") == "resident"]
        skipped = [m.name for m in engine.list_models() if m.name not in models]
        if skipped:
            log(f"warm-up: skipped {len(skipped)} models not resident (loaded at their first request): "
                + ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))
        t_all = time.perf_counter()
        for i, name in enumerate(models):
            info = next(m for m in engine.list_models() if m.name == name)
            n_prompt = max(1, min(prompt_tokens, info.max_position_embeddings - 1))
            n_new = max(1, min(total_tokens, info.max_position_embeddings) - n_prompt)
            prompt = [1 + (j % max(1, info.vocab_size - 1)) for j in range(n_prompt)]
            log(f"warm-up: {name} ({i + 1}/{len(models)}): {n_prompt} prompt + {n_new} new tokens")
            before = engine.programs_compiled
            t0 = time.perf_counter()
            h = engine.submit(make_request(name, prompt, n_new, SamplingParams(), stop_token_ids=()))
            tokens = 0
            while True:
                ev = h.next_event(timeout=max(0.0, timeout - (time.perf_counter() - t0)))
                if ev is None:
                    h.cancel()
                    raise RuntimeError(f"warm-up of {name} took more than {timeout:.0f} s")
                if ev.token_id is not None:
                    tokens += 1
                if ev.final:
                    break
            if ev.finish_reason == FINISH_ERROR:
                raise RuntimeError(f"warm-up of {name} failed: {ev.error}")
            res = WarmupResult(name, time.perf_counter() - t0, engine.programs_compiled - before, tokens)
            out.append(res)
            log(f"warm-up: {name} done: {res.programs} programs, {res.tokens} tokens in {res.seconds:.1f} s")
        if models:
            log(f"warm-up: {sum(r.programs for r in out)} step programs for {len(models)} models "
                f"in {time.perf_counter() - t_all:.1f} s")
    finally:
        engine.on_compile = previous
    return out
