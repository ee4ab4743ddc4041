"""Growth of the running requests, and preemption when growth does not fit (plain Python, no JAX).

Running requests grow in precedence order (`GrowthRound`). When one does not fit
(`growth_shortfall`: its model's cap, the free pages beside other models' unused floors, or free
pages too scattered over the devices), the lowest-precedence running request that can help loses its
pages (`pick_victim`); if none is left, the growing request itself does. A preempted request's KV is
swapped to host or dropped to be recomputed (`choose_preemption_mode`, by the cost model of
`preemption_costs_s`). The pure decisions take what they need as arguments; `GrowthRound` applies
them to the virtualizer and the request book.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from crosspool_jax.memory.kv_virtualizer import KVVirtualizer, ModelId, RequestId
from crosspool_jax.memory.planner_config import PlannerConfig, PreemptionChoice, reserved_for_others
from crosspool_jax.memory.planner_types import (
    Preemption,
    PreemptionMode,
    RequestStatus,
    ScheduledRequest,
)
from crosspool_jax.memory.request_book import RequestBook, RequestRecord

# ---- decisions ----------------------------------------------------------------------------------


class Shortfall(NamedTuple):
    """Why a running request may not grow now."""

    cap_bound: bool  # the model's cap, not the pool, is what is short
    text: str


def growth_shortfall(
    model: ModelId, need: int, held: int, cap: int | None, free: int, reserved: int,
    fits_devices: Callable[[], bool],
) -> Shortfall | None:
    """Why growing a request of `model` by `need` pages is not allowed now (None: it is).

    held: pages the model holds; cap: the cap the request is held to (None: no cap); free: free
    device pages in the pool; reserved: pages of those kept for other models' floors; fits_devices:
    whether the free pages can place the growth (asked only when the page counts allow it).
    """
    if need == 0:
        return None
    if cap is not None and held + need > cap:
        return Shortfall(True, f"model {model!r} holds {held} of its {cap}-page cap, needs {need} more")
    if need > free - reserved:
        return Shortfall(
            False, f"needs {need} pages, {free} free of which {reserved} are other models' floors"
        )
    if not fits_devices():
        return Shortfall(False, f"needs {need} pages, the free ones are too scattered over devices")
    return None


def pick_victim(
    grower: RequestRecord, running: Iterable[RequestRecord], cap_bound: bool,
    kv_tokens: Callable[[RequestId], int], above_floor: Callable[[ModelId], bool],
) -> RequestRecord | None:
    """The lowest-precedence running request below `grower` whose preemption frees pages `grower`
    may use, or None.

    A candidate holds KV (`kv_tokens` > 0); when `grower`'s model is at its cap (`cap_bound`) it is
    of that model; a candidate of another model must hold more than its floor (`above_floor`).
    """
    best: RequestRecord | None = None
    for other in running:
        if other is grower or other.precedence < grower.precedence:
            continue
        if kv_tokens(other.spec.request_id) == 0:
            continue
        same_model = other.spec.model == grower.spec.model
        if cap_bound and not same_model:
            continue
        if not same_model and not above_floor(other.spec.model):
            continue
        if best is None or other.precedence > best.precedence:
            best = other
    return best


def preemption_costs_s(
    config: PlannerConfig, page_bytes: int, model: ModelId, pages: int, kv_tokens: int
) -> tuple[float, float]:
    """Estimated (swap round trip, recompute) seconds for a request of `model` holding `pages`
    device pages of `page_bytes` bytes and `kv_tokens` tokens of KV.

    Swap: pages * page_bytes copied out and back over the host link. Recompute: re-prefill of
    kv_tokens tokens at the model's prefill rate.
    """
    swap_s = 2 * pages * page_bytes / config.host_link_bytes_per_s
    rate = config.model_prefill_tokens_per_s.get(model, config.prefill_tokens_per_s)
    return swap_s, kv_tokens / rate


def choose_preemption_mode(
    choice: PreemptionChoice, kv_len: int, pages: int, can_swap: bool, host_free_pages: int,
    costs_s: tuple[float, float],
) -> tuple[PreemptionMode, str]:
    """Swap or recompute for a preempted request holding `kv_len` tokens in `pages` device pages,
    and why.

    can_swap: the host has room for its pages (`host_free_pages` slots free); costs_s: the
    (swap round trip, recompute) seconds `preemption_costs_s` estimates, compared under AUTO.
    """
    if kv_len == 0 or pages == 0:
        return PreemptionMode.RECOMPUTE, "nothing computed yet"
    if choice == PreemptionChoice.ALWAYS_RECOMPUTE:
        return PreemptionMode.RECOMPUTE, "policy: always recompute"
    if not can_swap:
        return PreemptionMode.RECOMPUTE, f"host swap space too small ({host_free_pages} slots free)"
    if choice == PreemptionChoice.PREFER_SWAP:
        return PreemptionMode.SWAP, "policy: prefer swap"
    swap_s, recompute_s = costs_s
    if swap_s <= recompute_s:
        return PreemptionMode.SWAP, f"swap {swap_s * 1e3:.3g} ms <= recompute {recompute_s * 1e3:.3g} ms"
    return PreemptionMode.RECOMPUTE, f"recompute {recompute_s * 1e3:.3g} ms < swap {swap_s * 1e3:.3g} ms"


# ---- one step's growth --------------------------------------------------------------------------


class GrowthRound:
    """One step's growth of the running requests over `kv` (which it drives), preempting as needed;
    the preemptions made are in `preempted`."""

    def __init__(self, kv: KVVirtualizer, config: PlannerConfig, book: RequestBook) -> None:
        self._kv = kv
        self._config = config
        self._book = book
        self.preempted: list[Preemption] = []

    def run(
        self, decode_targets: Mapping[RequestId, int], budget: int | None, held_prefills: frozenset[RequestId]
    ) -> tuple[list[ScheduledRequest], int | None]:
        """Grows the running requests in precedence order to their length after this step (the next
        prefill chunk within `budget` prefill tokens, None: no limit; or the decode to
        `decode_targets`, default one token), except prefills in `held_prefills`. Returns the work
        scheduled and the prefill budget left."""
        run: list[ScheduledRequest] = []
        order = sorted(self._book.running.values(), key=lambda r: r.precedence)
        leader = True  # the highest-precedence request that grows this step ignores floors
        for req in order:
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            if req.in_prefill and req.spec.request_id in held_prefills:
                continue
            target, chunk_tokens = req.next_length(decode_targets.get(req.spec.request_id), budget)
            if target == req.kv_len:
                continue  # a prefill with no budget left this step
            if not self.grow(req, target, ignore_floors=leader):
                continue  # it preempted itself
            leader = False
            if budget is not None:
                budget -= chunk_tokens
            run.append(req.schedule(target))
        return run, budget

    def grow(self, req: RequestRecord, target: int, ignore_floors: bool) -> bool:
        """Grow `req` to `target` KV tokens, preempting lower-precedence requests as needed.

        ignore_floors: other models' unused floors do not limit this growth (the step's leader).
        Returns False if `req` itself had to be preempted.
        """
        rid = req.spec.request_id
        while True:
            shortfall = self._shortfall(req, target, ignore_floors)
            if shortfall is None:
                self._kv.grow(rid, target, allow_split=self._config.allow_split_kv)
                return True
            victim = pick_victim(
                req, self._book.running.values(), shortfall.cap_bound, self._kv.num_tokens, self._above_floor
            )
            if victim is None:
                reason = (
                    f"could not grow to {target} tokens ({shortfall.text}) and no lower-precedence "
                    "request could give pages"
                )
                self.preempted.append(self.preempt(req, reason))
                return False
            reason = f"gave its pages to {rid!r}, which grows to {target} tokens ({shortfall.text})"
            self.preempted.append(self.preempt(victim, reason))

    def _shortfall(self, req: RequestRecord, target: int, ignore_floors: bool) -> Shortfall | None:
        kv = self._kv
        rid = req.spec.request_id
        need = kv.pages_to_grow(rid, target)
        if need == 0:
            return None
        model = req.spec.model
        reserved = 0 if ignore_floors else reserved_for_others(
            self._config, model, self._book.live_per_model, kv.model_pages
        )
        return growth_shortfall(
            model, need, kv.model_pages(model), req.cap_pages, kv.total_free_pages, reserved,
            lambda: kv.can_grow(rid, target, allow_split=self._config.allow_split_kv),
        )

    def _above_floor(self, model: ModelId) -> bool:
        return self._kv.model_pages(model) > self._config.limits(model).floor_pages

    def preempt(self, req: RequestRecord, reason: str) -> Preemption:
        """Takes a running request's device pages (swapped to host or dropped); it queues again."""
        kv = self._kv
        rid = req.spec.request_id
        pages_held = kv.device_pages_held(rid)
        mode, why = choose_preemption_mode(
            self._config.preemption, req.kv_len, pages_held, kv.can_swap_out(rid), kv.host_free_pages,
            preemption_costs_s(self._config, kv.config.page_bytes, req.spec.model, pages_held, req.kv_len),
        )
        kv_len = req.kv_len
        pages = kv.request_pages(rid)
        swap_out = None
        if mode == PreemptionMode.SWAP:
            swap_out = kv.swap_out(rid)
            req.status = RequestStatus.SWAPPED
        else:
            kv.evict(rid)
            req.status = RequestStatus.WAITING
            req.kv_len = 0
            req.prefill_target = 0  # set again at admission: prompt + generated
        del self._book.running[rid]
        req.num_preemptions += 1
        req.message = f"preempted ({mode}: {why}): {reason}"
        self._book.enqueue(req)
        return Preemption(rid, req.spec.model, mode, kv_len, pages, swap_out, f"{reason}; {why}")
