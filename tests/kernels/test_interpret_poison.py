"""The kernels' outputs start out poisoned (NaN) under both interpreters.

This is what makes "no NaN in the result" in the other tests a check that every output element
was written: an element a kernel forgets comes out NaN, not 0 or stale data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


@pytest.mark.parametrize("interpret", ["generic", "tpu"])
def test_unwritten_output_elements_are_nan(interpret):
    def kernel(x_ref, o_ref):
        o_ref[0:4, :] = x_ref[0:4, :]  # rows 4..7 are never written

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        interpret=True if interpret == "generic" else pltpu.InterpretParams(),
    )(jnp.ones((8, 128), jnp.float32))
    out = np.asarray(out)
    assert np.all(out[:4] == 1.0)
    assert np.all(np.isnan(out[4:]))
