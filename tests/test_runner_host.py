"""Host-side pieces of building a step, without a device: the request tokens a range reads and
the page tables the virtualizer hands out (numpy views, no per-step copies of Python lists)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from crosspool_jax.execution.lane_inputs import _tokens_at
from crosspool_jax.execution.runner_records import _Req
from crosspool_jax.execution.sampling import SamplingParams
from crosspool_jax.memory.kv_virtualizer import KVGeometry, KVPoolConfig, KVVirtualizer


def test_tokens_at_equals_slicing_the_whole_sequence() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        p, g, n = rng.randint(1, 6), rng.randint(0, 5), rng.randint(0, 4)
        r = _Req("x", "m", tuple(range(100, 100 + p)), 9, SamplingParams(), (), list(range(200, 200 + g)))
        new = list(range(300, 300 + n))
        full = list(r.prompt) + r.generated + new
        s = rng.randrange(len(full))
        e = rng.randint(s + 1, len(full))
        assert _tokens_at(r, new, s, e) == full[s:e], (p, g, n, s, e)
    r = _Req("x", "m", (1, 2), 9, SamplingParams(), (), [3])
    with pytest.raises(RuntimeError, match="past its 3 known tokens"):
        _tokens_at(r, [], 2, 4)


def test_segment_pages_are_read_only_snapshots() -> None:
    kv = KVVirtualizer(KVPoolConfig(2, 4096, 4096))
    kv.register_model("m", KVGeometry(3, 64, tokens_per_page_override=4))
    kv.add_request("r", "m")
    kv.grow("r", 4 * 40)  # 40 rows: the table grows past its first capacities
    (seg,) = kv.segments("r")
    assert seg.layer_pages.shape == (3, 40) and seg.pages_per_layer == 40
    assert seg.layer_pages.dtype == np.int32 and not seg.layer_pages.flags.writeable
    before = seg.layer_pages.copy()
    want = [[p.page for p in kv.layer_pages("r", layer)] for layer in range(3)]
    assert seg.layer_pages.tolist() == want
    kv.grow("r", 4 * 100)
    assert np.array_equal(seg.layer_pages, before)  # the old snapshot did not move
    (seg2,) = kv.segments("r")
    assert seg2.pages_per_layer == 100 and np.array_equal(seg2.layer_pages[:, :40], before)
    assert len({int(p) for p in seg2.layer_pages.ravel()}) == 300  # every page distinct
    kv.free("r")
    assert kv.pool_stats().pages_used == 0
    kv.check_invariants()
