"""The bucket grid of a device group's runner (`GroupRunner`, which inherits it): the one-lane
step program shapes (`StepSpec`) a lane's calls round up to, the lane's top programs, the prefill
token buckets, and every shape up to a context and slot count (`bucket_specs`, what
`StepPrograms.precompile` compiles ahead of time).

`StepGrid` keeps no state; it reads the runner's store, geometries, buckets and settings
(`steps_per_call`, `micro_batches`, `max_prefill_tokens`, `prefill_chunk`, `warm_slots`,
`mixed_steps`, `stop_width`, backend, attention kernels, platform). Host-side bookkeeping only:
nothing here is traced.
"""

from __future__ import annotations

from typing import Any

from crosspool_jax.execution.pooled_step import LaneShape, StepSpec
from crosspool_jax.execution.step_programs import _pow2
from crosspool_jax.models.config import AttentionKind


class StepGrid:
    """The bucket grid of a `GroupRunner` (module docstring); a base class of it, not used alone."""

    def _prefill_spec(self, cls: Any, g: int, slots: int, tokens: int, pages: int) -> StepSpec:
        """The one-lane prefill program of class `cls`: G = `g`, `slots` slots, `tokens` prompt
        tokens, page tables of `pages` pages."""
        return StepSpec((LaneShape(cls, g, slots, tokens, pages, stop_width=self.stop_width),), False, 1,
                        self.backend, attention_kernels=self.attention_kernels,
                        one_row_decode=self.mixed_steps)

    def _decode_specs(self, cls: Any, g: int, slots: int, pages: int,
                      schedule: str = "split") -> list[StepSpec]:
        """The one-lane decode program of class `cls` (K = steps_per_call, attention `schedule`)
        and, with micro_batches = 2, its ping-pong pair (two equal lanes)."""
        ln = LaneShape(cls, g, slots, slots, pages, stop_width=self.stop_width)
        out = [StepSpec((ln,), True, self.steps_per_call, self.backend, attention_schedule=schedule,
                        attention_kernels=self.attention_kernels)]
        if self.micro_batches == 2:
            out.append(StepSpec((ln, ln), True, self.steps_per_call, self.backend,
                                attention_schedule=schedule, attention_kernels=self.attention_kernels))
        return out

    def _top_specs(self, key: tuple[Any, str | None], pages: int) -> list[StepSpec]:
        """The box's largest prefill and decode programs of lane `key` (`warm_specs` item 2) with
        page tables of `pages` pages: G = the lane's models rounded to a power of two, `warm_slots`
        slots, `max_prefill_tokens` prefill tokens; the decode with its ping-pong pair
        (micro_batches = 2) and, for a GQA lane on GPU, its persistent-schedule twin. They
        dominate every call of the lane whose page tables fit `pages`. With `mixed_steps`, also
        the prefill program of one chunk's tokens in `warm_slots` slots: what a mixed step's call
        (a chunk beside the lane's decode rows) runs without padding to `max_prefill_tokens`."""
        cls, bk = key[0], self.buckets
        g = self._lane_groups(key)[1]
        b = bk.round(self.warm_slots, bk.slots_floor)
        t = self.token_buckets()[-1]
        specs = [self._prefill_spec(cls, g, min(b, t), t, pages)]
        tc = self.token_bucket(min(self.prefill_chunk, t))
        if self.mixed_steps and tc < t:  # a mixed step's call: a chunk beside up to b decode rows
            specs.append(self._prefill_spec(cls, g, min(b, tc), tc, pages))
        specs += self._decode_specs(cls, g, b, pages)
        if self.platform == "gpu" and cls.config.attention == AttentionKind.GQA:
            specs += self._decode_specs(cls, g, b, pages, "persistent")
        return specs

    def _lane_groups(self, key: tuple[Any, str | None]) -> tuple[int, int]:
        """(G of the lane's smallest programs, G of its largest): the lane's placed models rounded
        to a power of two for the largest; 1 for the smallest unless buckets are "placed"."""
        g_top = _pow2(sum(1 for n in self.store.models if self._lane_key(n) == key))
        return (g_top if self.buckets.groups == "placed" else 1), g_top

    def _pages_bucket(self, model: str, tokens: int) -> int:
        """The page-table bucket (pages per layer) of `tokens` tokens of `model`."""
        return self.buckets.round(-(-tokens // self.geoms[model].tokens_per_page), self.buckets.pages_floor)

    def token_buckets(self) -> list[int]:
        """The prefill programs' token buckets (query rows T per KV device), ascending: the
        buckets' ladder topped by `max_prefill_tokens` rounded up to a power of two (itself a
        bucket: coarse's 512, 2,048, 8,192 would put a 4,096-token call in 8,192 rows)."""
        bk = self.buckets
        return bk.ladder(_pow2(self.max_prefill_tokens), bk.tokens_floor, _pow2(self.max_prefill_tokens))

    def token_bucket(self, tokens: int) -> int:
        """The prefill token bucket of a call of `tokens` query rows per KV device."""
        bk = self.buckets
        return bk.round(tokens, bk.tokens_floor, _pow2(self.max_prefill_tokens))

    def _chunk_spec(self, key: tuple[Any, str | None], tokens: int, pages: int) -> StepSpec:
        """The prefill program of one request's chunk of `tokens` tokens in lane `key` with page
        tables of `pages` pages (G as `warm_specs` item 1, the smallest slot bucket)."""
        bk = self.buckets
        return self._prefill_spec(key[0], self._lane_groups(key)[0], bk.round(1, bk.slots_floor),
                                  self.token_bucket(tokens), pages)

    def _lane_key(self, model: str) -> tuple[Any, str | None]:
        """The lane a model's slots go to: its class (GQA: shared by the class's models), or
        (class, model) for MLA (one model per lane)."""
        cls = self.store.models[model].cls
        return cls, (model if cls.config.attention == AttentionKind.MLA else None)

    def lane_keys(self) -> list[tuple[Any, list[str]]]:
        """(model class, the placed models one lane of it holds) per lane the runner can build:
        one per GQA class, one per MLA model."""
        lanes: dict[tuple[Any, str | None], list[str]] = {}
        for name in sorted(self.store.models):
            lanes.setdefault(self._lane_key(name), []).append(name)
        return [(key[0], names) for key, names in lanes.items()]

    def bucket_specs(self, max_context: int, max_slots: int) -> list[StepSpec]:
        """Every one-lane program shape (decode and prefill) of the bucket grid up to `max_context`
        tokens per request and `max_slots` requests per KV device, and at each page bucket the
        lane's top programs (`_top_specs`: with micro_batches = 2 the ping-pong decode pairs, on GPU
        a GQA lane's persistent-schedule decode, with `mixed_steps` a mixed step's chunk program):
        what `precompile` compiles. Without the top programs the grid covered no width past the
        warm box (`_covered_width`), so every prompt past `warm_context` tokens was held
        (`held_prefills`) until they compiled in the background: 128 held steps in an H100 replay
        of 2026-12-06, its 8K-75K prompts waiting seconds. Programs mixing lanes of several
        classes are not in it (they compile when first met)."""
        bk = self.buckets
        specs = []
        steps = [self.steps_per_call] if bk.fixed_steps else bk.ladder(self.steps_per_call, 1)
        for cls, names in self.lane_keys():
            g = _pow2(len(names)) if bk.groups == "placed" or len(names) == 1 else None
            groups = [g] if g else bk.ladder(len(names), 1)
            tpp = self.geoms[names[0]].tokens_per_page
            pages = bk.ladder(-(-max_context // tpp), bk.pages_floor)
            slots = bk.ladder(max_slots, bk.slots_floor)
            for gg in groups:
                for p in pages:
                    for b in slots:
                        for k in steps:
                            lane = LaneShape(cls, gg, b, b, p, stop_width=self.stop_width)
                            specs.append(StepSpec((lane,), True, k, self.backend,
                                                  attention_kernels=self.attention_kernels))
                    for t in self.token_buckets():
                        specs += [self._prefill_spec(cls, gg, b, t, p) for b in slots if b <= t]
            key = self._lane_key(names[0])
            specs += [sp for p in pages for sp in self._top_specs(key, p)]
        return list(dict.fromkeys(specs))
