"""One step's plan and its dispatch, the part of a device group's runner (`GroupRunner`, which
inherits it) that turns the planner's decisions into program calls: `launch` asks the planner for
the step (the decode lengths, the prefill budget, the admission holds), runs its swaps, folds a
mixed lane's decode tokens into its prefill call (`mixed_steps`) and dispatches the calls
(`StepCalls._run`); `prefill_budget` prices a step's prompt tokens against the measured decode
call (`prefill_cost`).

`StepPlanning` keeps no state of its own; it reads and updates the runner's planner, requests,
store, counters, state lock, warm-up holds (`WarmPrograms.held_models` / `held_prefills`) and
calls in flight (`StepReading`). Host-side bookkeeping only: nothing here is traced beyond the two
jitted page copies of a swap.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crosspool_jax.execution.runner_records import StepResult, _Work
from crosspool_jax.memory.planner import Phase, StepInput
from crosspool_jax.models.costs import ModelCosts, model_costs


class StepPlanning:
    """A step's plan, its swaps and the prefill budget of a `GroupRunner` (module docstring); a
    base class of it, not used alone."""

    # -- the step --
    def step(self) -> StepResult:
        """One engine step (`pool_runner`'s module docstring): `launch()`, then `result()`."""
        self.launch()
        return self.result()

    def launch(self) -> None:
        """Plans one step and dispatches its program calls without waiting for them. With
        `overlap`, the planner sees the previous step's tokens as placeholders (module docstring)."""
        with self._state_lock:
            self._launch_locked()

    def _launch_locked(self) -> None:
        if self._launched is not None:
            raise RuntimeError("launch() twice without result()")
        t_launch, waited = self._now(), self.wait_seconds
        k = self.steps_per_call
        held, held_prefills = self.held_models(), self.held_prefills()
        mixed = self._mixed_lanes(held, held_prefills) if self.mixed_steps else set()
        decode_lengths = {}
        folded = 0  # decode requests that take their token in a prefill call
        for rid in self.planner.running():
            info = self.planner.info(rid)
            if info.phase == Phase.DECODE:
                r = self.reqs[rid]
                cap = len(r.prompt) + r.max_new_tokens - 1
                one = self._lane_key(r.model) in mixed
                folded += one
                decode_lengths[rid] = min(info.kv_len + (1 if one else k), cap)
        self.held_steps += bool(held)
        self.held_prefill_steps += bool(held_prefills)
        self.launches += 1
        self._step_decoding = len(decode_lengths)
        budget = self.prefill_budget(bool(decode_lengths))
        plan = self.planner.step(StepInput(decode_lengths, prefill_token_budget=max(1, budget - folded),
                                           held_models=held, held_prefills=held_prefills))
        # swap-outs before anything writes KV, swap-ins before anything reads it (planner contract)
        for sp in plan.swap_outs:
            self._swap(sp, to_host=True)
        for sp in plan.swap_ins:
            self._swap(sp, to_host=False)
        preempted = []
        for p in plan.preempted:
            self.preemptions += 1
            preempted.append(str(p.request_id))
        work = [_Work(self.reqs[str(s.request_id)], s.token_start, s.token_end,
                      s.phase == Phase.DECODE, s.samples_token) for s in plan.run]
        dispatches = self._dispatches
        while work:
            if any(w.req.pending for w in work if not w.decode):
                # a prefill (a recomputed request's) reads tokens still on the device: read them
                self._collect(keep=0)
                work = [w for w in work if not w.req.done]
            pre = [w for w in work if not w.decode]
            dec = [w for w in work if w.decode]
            if mixed and pre:  # a mixed lane's decode tokens: rows of its prefill call
                lanes = {self._lane_key(w.req.model) for w in pre}
                fold = [w for w in dec if w.end - w.start == 1 and self._lane_key(w.req.model) in lanes]
                if fold:
                    folded_ids = {id(w) for w in fold}
                    dec = [w for w in dec if id(w) not in folded_ids]
                    pre += [_Work(w.req, w.start, w.end, False, True) for w in fold]
                    self.mixed_rows += len(fold)
            rest: list[_Work] = []
            if pre:
                rest += self._run(pre, False)
            if dec:  # (a cancel during the prefill's compile may have ended some)
                rest += self._run([w for w in dec if not w.req.done], True)
            if not self.overlap:
                self._collect(keep=0)
            # a decode range cut at a segment end continues in a follow-up call unless it ended
            work = [w for w in rest if not w.req.done]
        calls = self._dispatches - dispatches
        self.calls += calls
        self._launched = (calls, tuple(preempted))
        # reads inside launch (overlap off, or a prefill that needs tokens in flight) are waits
        self.launch_seconds += self._now() - t_launch - (self.wait_seconds - waited)

    def _mixed_lanes(self, held: frozenset[str], held_prefills: frozenset[str]) -> set[Any]:
        """(`mixed_steps`) Lanes that have prompt tokens to prefill this step: a running or waiting
        request with prompt left that is not held (`held_models`, `held_prefills`)."""
        out = set()
        for rid in (*self.planner.running(), *self.planner.waiting()):
            r = self.reqs.get(rid)
            if r is None or r.model in held or rid in held_prefills or self.planner.prefill_span(rid) is None:
                continue
            out.add(self._lane_key(r.model))
        return out

    def prefill_budget(self, decoding: bool) -> int:
        """Most prompt tokens this step may prefill. With requests decoding: the tokens whose
        predicted seconds (`prefill_fit`, fitted on this group's measured prefill calls, or its
        prior while the fit cannot tell per-call from per-FLOP costs: `prefill_cost`; priced at
        the longest context a running prefill continues from) fit `prefill_share` x the measured
        decode call (EMA), so a step that mixes prefill with decode costs about 1 + prefill_share
        decode steps. At least one chunk (`prefill_chunk`: prefill always progresses, in calls
        large enough to be worth their fixed cost), at most `max_prefill_tokens`. With nothing
        decoding, or before a decode call and a prefill call are measured: `max_prefill_tokens`."""
        most = self.max_prefill_tokens
        if not decoding or self.decode_call_seconds is None:
            return most
        seconds = self.prefill_share * self.decode_call_seconds
        floor = min(self.prefill_chunk, most)
        context, model = 0, None
        for rid in self.planner.running():
            info = self.planner.info(rid)
            if info.phase == Phase.PREFILL and (model is None or info.kv_len > context):
                context, model = info.kv_len, self.reqs[rid].model
        if model is None:  # a step that admits: its prompts start at 0 (priced as the first waiting)
            model = next((self.reqs[rid].model for rid in self.planner.waiting() if rid in self.reqs), None)
        n = None
        if model is not None:
            # priced as one call (a request's tokens of a step run in one, `_run`) in the program
            # of its token bucket: T rows on each KV device
            n = self.prefill_fit.tokens_within(seconds, self._model_costs(model), context, most,
                                               self.token_bucket, self.store.num_kv)
        if n is None:  # no prefill call measured yet
            return most
        return int(min(most, max(floor, n)))

    def _model_costs(self, model: str) -> ModelCosts:
        """`model`'s per-token costs from its shapes (`models.costs`), kept per model."""
        c = self._costs.get(model)
        if c is None:
            cfg = self.store.models[model].config
            c = model_costs(cfg, self.store.layout.dtype, self.geoms[model].bytes_per_token_used)
            self._costs[model] = c
        return c

    # -- swap --
    def _swap(self, plan: Any, to_host: bool) -> None:
        """Copies a request's pages between the arena and the host swap slots (`plan.copies`)."""
        if not plan.copies:
            return
        st = self.store
        idx = np.array([c.device * st.layout.num_pages + st.kv_first_page + c.device_page
                        for c in plan.copies], np.int32)
        slots = np.array([c.host_slot for c in plan.copies], np.int64)
        if self._host_swap is None:
            raise RuntimeError("a swap was planned but the runner has no host swap space")
        t0 = time.perf_counter()
        if to_host:
            self._host_swap[slots] = np.asarray(_gather_pages(st.arena, jnp.asarray(idx)))
        else:
            st.arena = _scatter_pages(st.arena, jnp.asarray(idx), jnp.asarray(self._host_swap[slots]))
            st.arena.block_until_ready()
        self.swapped_pages += len(plan.copies)
        # measured host link rate (EMA) feeds the planner's swap-or-recompute choice
        rate = len(plan.copies) * st.layout.page_bytes / max(time.perf_counter() - t0, 1e-9)
        self.link_rate = rate if self.link_rate is None else 0.8 * self.link_rate + 0.2 * rate
        self.planner.update_costs(host_link_bytes_per_s=self.link_rate)


@functools.partial(jax.jit)
def _gather_pages(arena: jax.Array, idx: jax.Array) -> jax.Array:
    """[n] global page indices -> [n, rows_per_page, R] (a device-to-host swap's source)."""
    return arena[idx]


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_pages(arena: jax.Array, idx: jax.Array, pages: jax.Array) -> jax.Array:
    """Writes [n, rows_per_page, R] pages back at global page indices. donates: the arena."""
    return arena.at[idx].set(pages.astype(arena.dtype))
