"""Device pages of the KV pool: who holds each, which are free, where new rows go (plain Python, no JAX).

`DevicePages` keeps every KV device's free pages as a stack and the owner of every page (page
indices count pages of one device's arena). `place_rows` decides on which devices a request's new
rows go, from the free rows per device alone (the split-KV placement policy, docs/planner.md);
`allocate_rows` then takes the pages of a placement off the stacks and appends them to the request's
segments, and `release_rows` gives a request's pages back so that they pop again in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

from crosspool_jax.memory.kv_requests import RequestKV, SegmentPages
from crosspool_jax.memory.kv_types import KVOutOfPages, PhysicalPage, RequestId

Placement = list[tuple[int, int]]  # [(device, rows)]


class DevicePages:
    """Free page stacks and page owners of every KV device."""

    def __init__(self, num_devices: int, pages_per_device: int) -> None:
        # free page stacks; pop() hands out the lowest index first on a fresh arena
        self.free_stacks: list[list[int]] = [
            list(range(pages_per_device - 1, -1, -1)) for _ in range(num_devices)
        ]
        # owners[device][page]: the request holding the page, None when it is free
        self.owners: list[list[RequestId | None]] = [[None] * pages_per_device for _ in range(num_devices)]

    def free_counts(self) -> list[int]:
        """Free pages per device."""
        return [len(f) for f in self.free_stacks]

    @property
    def total_free(self) -> int:
        """Free pages over all devices."""
        return sum(len(f) for f in self.free_stacks)

    def free_rows(self, num_layers: int) -> list[int]:
        """Per device, the rows of `num_layers` pages its free pages hold."""
        return [len(f) // num_layers for f in self.free_stacks]

    def out_of_pages(self, what: str, pages_needed: int) -> KVOutOfPages:
        """The error for an allocation of `pages_needed` pages that does not fit; `what` says which."""
        message = f"{what}; free pages per device: {self.free_counts()}"
        return KVOutOfPages(message, pages_needed, self.total_free)


def place_rows(
    free_rows: Sequence[int], last_device: int | None, rows: int, allow_split: bool
) -> Placement | None:
    """Where `rows` new rows go: [(device, rows)], first entry extends `last_device`; None if no fit.

    free_rows: rows each device can take now. last_device: the device of the request's last segment
    (None for a request that holds no pages).

    Policy: extend the last segment's device as far as it has room; then the device with the most
    free rows (ties: lowest index), and so on. Without split, everything must go on one device
    (the last segment's device for a request that already holds pages).
    """
    if not allow_split:
        if last_device is not None:
            return [(last_device, rows)] if free_rows[last_device] >= rows else None
        best = max(range(len(free_rows)), key=lambda d: (free_rows[d], -d))
        return [(best, rows)] if free_rows[best] >= rows else None
    if sum(free_rows) < rows:
        return None
    placement: Placement = []
    remaining = rows
    order = sorted(range(len(free_rows)), key=lambda d: (-free_rows[d], d))
    if last_device is not None:
        order.remove(last_device)
        order.insert(0, last_device)
    for device in order:
        take = min(remaining, free_rows[device])
        if take:
            placement.append((device, take))
            remaining -= take
        if remaining == 0:
            return placement
    raise AssertionError("unreachable: free rows were counted above")


def allocate_rows(pages: DevicePages, req: RequestKV, placement: Placement) -> list[PhysicalPage]:
    """Takes the rows of `placement` off the free stacks for `req`; returns the new pages in order.

    A placement entry on the device of the request's last segment extends that segment; any other
    opens a new segment. The placement must fit (as `place_rows` returns it).
    """
    tpp = req.layout.tokens_per_page
    layers = req.layout.num_layers
    new_pages: list[PhysicalPage] = []
    for device, rows in placement:
        if req.segments and req.segments[-1].device == device:
            seg = req.segments[-1]
        else:
            seg = SegmentPages(device, req.rows * tpp, layers)
            req.segments.append(seg)
        free = pages.free_stacks[device]
        owner = pages.owners[device]
        rid = req.request_id
        for _ in range(rows):
            row = free[-layers:][::-1]  # the pages `layers` pops would hand out, in that order
            del free[-layers:]
            for page in row:
                owner[page] = rid
            new_pages.extend([PhysicalPage(device, page) for page in row])
            seg.append_row(row)
    return new_pages


def release_rows(pages: DevicePages, req: RequestKV) -> None:
    """Gives every device page of `req` back to the free stacks; `req` is left with no segments."""
    # push in reverse allocation order (rows, then layers) so the pages pop back in their order
    for seg in reversed(req.segments):
        free = pages.free_stacks[seg.device]
        owner = pages.owners[seg.device]
        table = seg.layer_pages.tolist()
        for row in reversed(range(seg.rows)):
            for plist in reversed(table):
                page = plist[row]
                owner[page] = None
                free.append(page)
    req.segments = []
