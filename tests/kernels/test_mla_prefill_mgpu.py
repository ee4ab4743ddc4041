"""`pallas_kernels.mla_prefill_mgpu` (MLA chunked prefill as rows of the Mosaic GPU MLA decode
kernel) in Mosaic GPU's interpreter, against `paged_mla_prefill_attention_reference`: ragged
chunks (empty, one token, a whole page, chunks crossing pages, after earlier KV), rows past the
last chunk, NaN-poisoned unwritten rows, shuffled page tables; bf16; the log-sum-exp."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kvcase import make_case, page_bytes_for, rel_err, tol

from pallas_kernels.mla_prefill_mgpu import paged_mla_prefill_attention_mgpu, prefill_rows
from pallas_kernels.page_layout import KVSpec
from pallas_kernels.prefill import paged_mla_prefill_attention_reference

KV_LENS = [0, 1, 9, 16, 40]
Q_LENS = [0, 1, 3, 16, 23]  # none; all of it; the tail; a whole page; 23 tokens after 17
PAD_ROWS = 2


def _cu(q_lens: list[int]) -> jnp.ndarray:
    return jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)


def test_prefill_rows_hand_checked():
    seq, length = prefill_rows(jnp.asarray([5, 3, 4]), _cu([2, 0, 3]), 7)
    # seq 0: positions 3, 4 -> lengths 4, 5; seq 2: positions 1, 2, 3 -> 2, 3, 4; 2 pad rows
    assert np.asarray(length).tolist() == [4, 5, 2, 3, 4, 0, 0]
    assert np.asarray(seq)[:5].tolist() == [0, 0, 2, 2, 2]


@pytest.mark.parametrize("kw", [{}, {"soft_cap": 5.0, "num_splits": 2}])
def test_interpreted_matches_reference(kw):
    rng = np.random.default_rng(7)
    spec = KVSpec.mla(128, 64)
    case = make_case(rng, spec, KV_LENS, dtype="bfloat16", row_elems=64,
                     page_bytes=page_bytes_for(spec, 64, "bfloat16", 16))
    assert case.geom.tokens_per_page == 16
    t, h = sum(Q_LENS) + PAD_ROWS, 16
    ql = jnp.asarray(rng.standard_normal((t, h, 128)), jnp.bfloat16)
    qr = jnp.asarray(rng.standard_normal((t, h, 64)), jnp.bfloat16)
    args = (ql, qr, case.arena, case.table, case.lens, _cu(Q_LENS))
    masks = {k: v for k, v in kw.items() if k == "soft_cap"}
    ref, ref_lse = jax.jit(lambda *a: paged_mla_prefill_attention_reference(
        *a, case.geom, scale=0.1, return_lse=True, **masks))(*args)
    out, lse = paged_mla_prefill_attention_mgpu(*args, case.geom, scale=0.1, backend="interpret",
                                                return_lse=True, block_t=16, **kw)
    assert out.shape == ql.shape and out.dtype == ql.dtype and lse.shape == (t, h)
    live = sum(Q_LENS)
    assert rel_err(out[:live], ref[:live]) < tol("bfloat16")
    assert float(jnp.abs(out[live:].astype(jnp.float32)).max()) == 0.0  # pad rows: exactly 0
    assert np.all(np.isneginf(np.asarray(lse[live:])))
    np.testing.assert_allclose(np.asarray(lse[:live]), np.asarray(ref_lse[:live]), rtol=1e-5,
                               atol=1e-4)


def test_rejects_chunks_that_do_not_fit_the_sequences():
    rng = np.random.default_rng(8)
    spec = KVSpec.mla(128, 64)
    case = make_case(rng, spec, KV_LENS, dtype="bfloat16", row_elems=64,
                     page_bytes=page_bytes_for(spec, 64, "bfloat16", 16))
    q = jnp.zeros((4, 16, 128), jnp.bfloat16)
    r = jnp.zeros((4, 16, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="cu_q_lens"):
        paged_mla_prefill_attention_mgpu(q, r, case.arena, case.table, case.lens, _cu([4]),
                                         case.geom, scale=0.1, backend="interpret")
