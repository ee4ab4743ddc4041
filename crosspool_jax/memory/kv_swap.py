"""Host swap slots of the KV pool and the page copies of a swap-out or swap-in (plain Python, no JAX).

A host slot holds one page (`page_bytes` bytes) of a swapped-out request; slots are indexed from 0
to `host_swap_pages - 1`. `HostSlots` keeps the free ones as a stack. `swap_out_copies` and
`swap_in_copies` pair a request's device pages with its host slots, page by page, into the copies
of the `SwapPlan` the engine performs; they read the request and change nothing. `KVVirtualizer`
moves the pages and slots in its books around them.
"""

from __future__ import annotations

from collections.abc import Sequence

from crosspool_jax.memory.kv_requests import RequestKV
from crosspool_jax.memory.kv_types import PageCopy


class HostSlots:
    """The free host swap slots, a stack: on a fresh pool `take` hands out the lowest index first."""

    def __init__(self, num_slots: int) -> None:
        self.free_slots: list[int] = list(range(num_slots - 1, -1, -1))

    def __len__(self) -> int:
        """Free slots."""
        return len(self.free_slots)

    def take(self, count: int) -> list[int]:
        """Takes `count` free slots (at most `len(self)`), in the order the stack hands them out."""
        return [self.free_slots.pop() for _ in range(count)]

    def give_back(self, host_slots: Sequence[Sequence[int]]) -> None:
        """Frees a request's slots ([layer] -> slots), layer by layer, each layer's in reverse."""
        for slots in host_slots:
            self.free_slots.extend(reversed(slots))


def swap_out_copies(req: RequestKV, slots: Sequence[int]) -> tuple[list[list[int]], tuple[PageCopy, ...]]:
    """The copies that move a resident request's device pages to host `slots`.

    slots: one per device page of the request, used in the order of the copies: layer by layer, each
    layer's pages in token order (over all segments). Returns the request's host slots per layer
    ([layer] -> slots in token order) and the copies.
    """
    copies: list[PageCopy] = []
    host_slots: list[list[int]] = [[] for _ in range(req.layout.num_layers)]
    next_slot = iter(slots)
    for layer in range(req.layout.num_layers):
        ordinal = 0
        for seg in req.segments:
            for page in seg.layer_pages[layer].tolist():
                slot = next(next_slot)
                host_slots[layer].append(slot)
                copies.append(PageCopy(layer, ordinal, seg.device, page, slot))
                ordinal += 1
    return host_slots, tuple(copies)


def swap_in_copies(req: RequestKV) -> tuple[PageCopy, ...]:
    """The copies that bring a swapped request's host slots back to its (newly allocated) device pages.

    `req` has both: its host slots and the segments just allocated for the same number of tokens;
    page ordinal i of a layer is copied from the layer's i-th slot to its i-th device page.
    """
    copies: list[PageCopy] = []
    for layer in range(req.layout.num_layers):
        device_pages = [(seg.device, p) for seg in req.segments for p in seg.layer_pages[layer].tolist()]
        layer_slots = req.host_slots[layer]
        for ordinal, ((device, page), slot) in enumerate(zip(device_pages, layer_slots, strict=True)):
            copies.append(PageCopy(layer, ordinal, device, page, slot))
    return tuple(copies)
