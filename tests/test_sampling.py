"""`crosspool_jax.execution.sampling`: the sort order the filters use and the sampled tokens."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.execution.sampling import descending_keys, descending_order, sample_tokens


def _cases():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 257)).astype(np.float32)
    ties = np.round(x, 1)
    zeros = x.copy()
    zeros[:, ::3], zeros[:, 1::3] = 0.0, -0.0  # numpy's order: -0.0 == 0.0, index breaks ties
    infs = x.copy()
    infs[:, ::5], infs[:, 2::7] = -np.inf, np.inf
    nans = x.copy()
    nans[:, ::11] = np.nan  # NaN last
    bf16 = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # many exact ties
    return {"plain": x, "ties": ties, "signed zeros": zeros, "infinities": infs, "nan": nans,
            "bf16 values": bf16, "one column": x[:, :1]}


@pytest.mark.parametrize("name", list(_cases()))
def test_descending_order_is_numpys_stable_argsort_of_minus_x(name):
    x = jnp.asarray(_cases()[name])
    want = np.asarray(jnp.argsort(-x, axis=-1, stable=True))
    np.testing.assert_array_equal(np.asarray(descending_order(x)), want)


def test_keys_are_ordered_by_hand():
    x = jnp.asarray([3.0, -0.0, 0.0, -jnp.inf, jnp.inf, -2.5, jnp.nan, 1e-30], jnp.float32)
    keys = np.asarray(descending_keys(x)).astype(np.uint64)
    # +inf, 3, 1e-30, 0 == -0, -2.5, -inf, NaN
    assert keys[4] < keys[0] < keys[7] < keys[1] == keys[2] < keys[5] < keys[3] < keys[6]


def test_the_sort_compares_unsigned_keys_only():
    """The sort's comparator is one unsigned less-than on its key operands (a float key's
    comparator canonicalises NaN and -0.0 on both operands at every comparison)."""
    text = jax.jit(descending_order).lower(jnp.zeros((8, 50304), jnp.float32)).as_text()
    sort = text[text.index("stablehlo.sort"):]
    body = sort[:sort.index("})")]
    compares = re.findall(r"stablehlo\.compare\s+(\w+),.*?,\s*(\w+)\s*:", body)
    assert compares == [("LT", "UNSIGNED")], body


def test_filters_and_draws_by_hand():
    logits = jnp.asarray([[2.0, 1.0, 0.5, -jnp.inf], [0.0, 4.0, 4.0, 1.0]] * 64, jnp.float32)
    b = logits.shape[0]
    seeds = jnp.stack([jnp.zeros(b, jnp.uint32), jnp.arange(b, dtype=jnp.uint32)], axis=1)
    pos = jnp.arange(b, dtype=jnp.int32)

    def run(t, k, p):
        return np.asarray(sample_tokens(logits, jnp.full(b, t, jnp.float32),
                                        jnp.full(b, k, jnp.int32), jnp.full(b, p, jnp.float32),
                                        seeds, pos)).reshape(-1, 2)

    greedy = run(0.0, 0, 1.0)
    assert (greedy[:, 0] == 0).all() and (greedy[:, 1] == 1).all()  # ties: the lower index
    top1 = run(1.0, 1, 1.0)
    np.testing.assert_array_equal(top1, greedy)
    top2 = run(1.0, 2, 1.0)
    assert set(top2[:, 0]) == {0, 1} and set(top2[:, 1]) == {1, 2}  # both tied tokens drawn
    # p = 0.5: row 0's first token holds 0.63 of the mass (alone); row 1's first two 0.48 each
    nucleus = run(1.0, 0, 0.5)
    assert set(nucleus[:, 0]) == {0} and set(nucleus[:, 1]) == {1, 2}
    anything = run(1.0, 0, 1.0)
    assert 3 not in set(anything[:, 0]) and set(anything[:, 0]) == {0, 1, 2}  # -inf never drawn
