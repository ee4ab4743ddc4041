"""Host-checkable pieces of the MoE layer (`crosspool_jax.models.moe`) against hand-worked numbers."""

import jax.numpy as jnp
import numpy as np

from crosspool_jax.models.moe import group_counts, unpermute_sum


def test_group_counts_counts_each_key_and_drops_out_of_range():
    keys = jnp.asarray([3, 0, 3, 5, 1, 3, 4], jnp.int32)  # 5 and 4 are past n = 4: not counted
    got = group_counts(keys, 4)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), [1, 1, 0, 3])


def test_group_counts_matches_bincount_on_random_keys():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 65, size=4096)
    np.testing.assert_array_equal(np.asarray(group_counts(jnp.asarray(keys, jnp.int32), 64)),
                                  np.bincount(keys, minlength=65)[:64])


def test_group_counts_of_no_keys_is_zeros():
    np.testing.assert_array_equal(np.asarray(group_counts(jnp.zeros((0,), jnp.int32), 3)), [0, 0, 0])


def test_unpermute_sum_adds_each_tokens_rows():
    # 2 tokens, k = 2: entries (token, choice) 0:(0,0) 1:(0,1) 2:(1,0) 3:(1,1), stored in `order`
    order = jnp.asarray([2, 0, 3, 1], jnp.int32)
    rows = jnp.asarray([[10.0], [1.0], [20.0], [2.0]])  # row i holds entry order[i]
    np.testing.assert_array_equal(np.asarray(unpermute_sum(rows, order, 2)), [[3.0], [30.0]])
