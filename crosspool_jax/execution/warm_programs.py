"""The warm-up half of a device group's runner (`GroupRunner`, which inherits it beside
`step_programs.StepPrograms`): the programs a newly loaded lane is given in the background
(`warm_specs`, docs/engine.md "Compiles off the serving path"), and the admission holds that wait
for them: a new lane's waiting requests while its gate programs compile (`held_models`), and a
prompt wider than its lane's compiled page tables while its programs compile (`held_prefills`).

`WarmPrograms` keeps its own state (`_init_warm`) and reads the runner's store, geometries,
planner, requests and the compiled-programs state and grid of `StepPrograms` (`_programs`,
`_ready`, `_background`, `_lane_key`, `_top_specs`, ...). Host-side bookkeeping only: nothing here
is traced.
"""

from __future__ import annotations

from typing import Any

from crosspool_jax.execution import compile_queue
from crosspool_jax.execution.pooled_step import StepSpec
from crosspool_jax.execution.step_programs import env_setting, program_cost

# The process-wide default of `warm_programs` where a runner is not given it (an int >= 0; see
# `step_programs.FALLBACK_ENV` for why a test run sets it).
WARM_PROGRAMS_ENV = "CROSSPOOL_WARM_PROGRAMS"


class WarmPrograms:
    """Warm-up plans and admission holds of a `GroupRunner` (module docstring); a base class of
    it, not used alone."""

    def _init_warm(self, warm_programs: int | None, warm_slots: int | None, warm_context: int | None
                   ) -> None:
        """The warm-up box (`GroupRunner`'s arguments of the same names; None: the platform's
        defaults, `$CROSSPOOL_WARM_PROGRAMS` for `warm_programs` when set) and the plans' state."""
        gpu = self.platform == "gpu"
        if warm_programs is None:
            warm_programs = env_setting(WARM_PROGRAMS_ENV, 8 if gpu else 4)
        self.warm_programs = max(0, warm_programs)
        self.warm_slots = warm_slots or (32 if gpu else 8)
        self.warm_context = warm_context or (8192 if gpu else 512)
        # lane key -> ((held_generation, lane groups) it was found at, `_covered_width`)
        self._covered: dict[Any, tuple[tuple[int, tuple[int, int]], int]] = {}
        self._warm_sets: dict[Any, set[StepSpec]] = {}  # lane key -> its warm programs (`warm_up`)
        # lane key -> the warm programs its waiting requests are held for (`held_models`)
        self._warm_gates: dict[Any, set[StepSpec]] = {}

    def warm_specs(self, model: str) -> list[StepSpec]:
        """The programs `model`'s lane is given at load, first needed first, at most
        `warm_programs` (the rule, docs/engine.md "Compiles off the serving path"):

        1. the smallest prefill program and the smallest decode program (K = steps_per_call) of
           the bucket grid, one model per lane (G = 1; "placed" buckets: G = the class's placed
           models): what a first request runs;
        2. the box's largest prefill and decode programs (G = the lane's placed models rounded to
           a power of two, `warm_slots` slots per KV device, pages of `warm_context` tokens,
           prefill tokens up to `max_prefill_tokens`): they dominate every shape inside the box,
           so with `fallback` no call inside it compiles on the serving path;
        3. the rest of the box's grid (G as in 1), smallest first.

        With micro_batches = 2 each decode program also comes as its ping-pong pair (two equal
        lanes), and on GPU a GQA lane's box decode also with the persistent attention schedule.
        Stop width: the runner's one `stop_width`; no split-KV extras (those compile when first met)."""
        return self._warm_plan(model)[0]

    def _warm_plan(self, model: str) -> tuple[list[StepSpec], int]:
        """(`warm_specs(model)`, how many of them are the gate: items 1 and 2 of its rule, those
        the lane's waiting requests are held for while other requests run, `held_models`)."""
        if self.warm_programs <= 0:
            return [], 0
        key = self._lane_key(model)
        cls, bk = key[0], self.buckets
        g_small = self._lane_groups(key)[0]
        tpp = self.geoms[model].tokens_per_page
        slots = bk.ladder(self.warm_slots, bk.slots_floor)
        pages = bk.ladder(-(-self.warm_context // tpp), bk.pages_floor)
        tokens = self.token_buckets()
        dec, pre = self._decode_specs, self._prefill_spec
        first = [pre(cls, g_small, slots[0], tokens[0], pages[0]), *dec(cls, g_small, slots[0], pages[0])]
        top = self._top_specs(key, pages[-1])
        rest = [sp for b in slots for p in pages for sp in dec(cls, g_small, b, p)]
        rest += [pre(cls, g_small, b, t, p) for t in tokens for b in slots if b <= t for p in pages]
        rest.sort(key=program_cost)
        gate = len(dict.fromkeys(first + top))
        specs = list(dict.fromkeys(first + top + rest))[: self.warm_programs]
        return specs, min(gate, len(specs))

    def held_prefills(self) -> frozenset[str]:
        """Requests whose prefill (running, or waiting to start one) reaches page tables wider than
        the lane's covered width (`_covered_width`: its top programs compiled; the warm box's
        `warm_context` at first): the prompt's own chunk program and the lane's top programs at
        the page bucket of the whole prompt (`_top_specs`: prefill and decode, so the decode that
        follows is covered too) are queued urgently in the background as soon as the request is
        seen; the request makes no prefill progress past the covered width until the top programs
        are ready, while other requests run. A new lane (nothing covered yet) is `held_models`'
        case, not this. When only held requests have work, nothing is held (the call then waits
        for its compile)."""
        if not self.fallback or not self.reqs:
            return frozenset()
        self._poll_background()
        covered: dict[Any, int] = {}
        held: set[str] = set()
        live = (*self.planner.running(), *self.planner.waiting())
        for rid in live:
            span = self.planner.prefill_span(rid) if rid in self.reqs else None
            if span is None:
                continue
            model = self.reqs[rid].model
            key = self._lane_key(model)
            if key not in covered:
                covered[key] = self._covered_width(key)
            if not covered[key]:  # a new lane: `held_models`' case
                continue
            whole = self._pages_bucket(model, span[1])
            if whole <= covered[key]:
                continue
            # its own chunks' program first (a lone long prompt's calls then run unpadded), then
            # the lane's top programs, which dominate every call at that width
            for sp in (self._chunk_spec(key, min(self.prefill_chunk, span[1]), whole),
                       *self._top_specs(key, whole)):
                if sp not in self._programs and sp not in self._ready:
                    self._compile_in_background(sp, compile_queue.URGENT)
            if self._pages_bucket(model, min(span[1], span[0] + self.max_prefill_tokens)) > covered[key]:
                held.add(rid)
        others = any(rid not in held for rid in live)
        return frozenset(held) if held and others else frozenset()

    def _covered_width(self, key: tuple[Any, str | None]) -> int:
        """The widest page tables (pages per layer) at which lane `key`'s top programs
        (`_top_specs`) are all compiled: every call of the lane up to it has a program (0: none).
        Kept per lane until the held programs (`held_generation`) or the lane's models change."""
        stamp = (self.held_generation, self._lane_groups(key))
        got = self._covered.get(key)
        if got is not None and got[0] == stamp:
            return got[1]
        width = self._find_covered_width(key)
        self._covered[key] = (stamp, width)
        return width

    def _find_covered_width(self, key: tuple[Any, str | None]) -> int:
        # the held programs are walked, not put in a set: a step spec's hash is deep (once per step
        # per held program was most of the simulator's host time)
        held = (*self._programs, *self._ready)
        widths = {ln.max_pages for sp in held if not sp.decode for ln in sp.lanes if ln.cls == key[0]}
        for w in sorted(widths, reverse=True):
            if all(sp in self._programs or sp in self._ready for sp in self._top_specs(key, w)):
                return w
        return 0

    def warm_up(self, model: str) -> int:
        """Queues `warm_specs(model)` for the background thread (those not held or queued yet);
        returns how many it queued. Called by `add_model` / `add_random_model`. The lane's earlier
        warm programs that left its set (a model added changed G) are dropped if not started."""
        specs, gate = self._warm_plan(model)
        key = self._lane_key(model)
        for old in self._warm_sets.get(key, set()) - set(specs):
            fut = self._background.get(old)
            if fut is not None and fut.cancel():
                del self._background[old]
        self._warm_sets[key] = set(specs)
        self._warm_gates[key] = set(specs[:gate])
        queued = 0
        for spec in specs:
            if spec not in self._background and spec not in self._programs and spec not in self._ready:
                self._compile_in_background(spec)
                queued += 1
        return queued

    def held_models(self) -> frozenset[str]:
        """Models whose waiting requests are not admitted now: while other requests run or wait, a
        new lane (no program of its class in service yet) whose gate programs (`_warm_plan`: the
        first and the box's largest) are still compiling in the background is held, so its first
        call does not compile on the serving path and stall every other request of the group.
        When only held models have requests, nothing is held (no one to stall: the call then waits
        for its compile). Waiting requests of other models count: between one request's end and
        the next one's admission nothing runs, and a held model admitted then would stall the next
        one."""
        if not self._warm_gates:
            return frozenset()
        self._poll_background()
        # a lane that has run calls (programs in service) is not new: its gate does not hold it
        serving = {ln.cls for sp in self._programs for ln in sp.lanes}
        compiling = {key for key, gate in self._warm_gates.items()
                     if key[0] not in serving and any(sp in self._background for sp in gate)}
        if not compiling:
            return frozenset()
        held = frozenset(n for n in self.store.models if self._lane_key(n) in compiling)
        others = bool(self.planner.running()) or any(
            self.planner.waiting(n) for n in self.store.models if n not in held)
        return held if others else frozenset()

    def gate_compiles(self) -> list[Any]:
        """Futures of the gate programs (`_warm_plan`) still compiling in the background: once
        they are done, every placed model's first request runs without a serving-path compile.
        Call it on the stepping thread or under its lock."""
        return [self._background[sp] for gate in self._warm_gates.values() for sp in gate
                if sp in self._background and not self._background[sp].done()]
