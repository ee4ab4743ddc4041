"""`pallas_kernels.dispatch`: which attention kernel family a call runs, and that the step
programs ask it.

* The rule: "triton" never tries Mosaic GPU; "mosaic" tries it on the backends it has (gpu,
  interpret); "auto" only on a Hopper GPU under the "gpu" backend, for the calls
  `auto_uses_mosaic` names (MLA decode; GQA prefill with a group of 2 or more).
* Under "mosaic" with the interpret backend (Mosaic GPU's interpreter on CPU) the dispatched GQA
  prefill and MLA decode equal the jnp references; a call the Mosaic kernel refuses (an f32
  arena) runs the Triton kernel (interpreted) with the same result.
(tests/test_attention_kernels_step.py: the step programs ask the dispatcher.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from kvcase import make_case, page_bytes_for, rel_err, tol

from pallas_kernels import dispatch
from pallas_kernels import mla_decode_mgpu as mdm
from pallas_kernels import prefill_mgpu as pm
from pallas_kernels.decode import paged_mla_decode_attention_reference
from pallas_kernels.page_layout import KVSpec
from pallas_kernels.prefill import paged_prefill_attention_reference


@pytest.mark.parametrize(("kernels", "backend", "call", "hopper", "want"), [
    ("triton", "gpu", "mla_decode", True, False),
    ("triton", "interpret", "gqa_prefill", True, False),
    ("mosaic", "interpret", "gqa_prefill", False, True),
    ("mosaic", "gpu", "mla_prefill", True, True),
    ("mosaic", "gpu", "mla_prefill", False, False),  # not Hopper: no wgmma, Triton
    ("mosaic", "reference", "mla_decode", True, False),
    ("mosaic", "tpu", "gqa_prefill", True, False),
    ("auto", "gpu", "mla_decode", True, True),
    ("auto", "gpu", "mla_decode", False, False),
    ("auto", "interpret", "mla_decode", True, False),
    ("auto", "gpu", "gqa_prefill", True, True),
    ("auto", "gpu", "gqa_prefill", False, False),
    ("auto", "gpu", "mla_prefill", True, dispatch.MLA_PREFILL_MOSAIC),
])
def test_rule(kernels, backend, call, hopper, want):
    assert dispatch.wants_mosaic(kernels, backend, call, hopper=hopper) is want


@pytest.mark.parametrize(("kernels", "call", "heads", "want"), [
    ("auto", "mla_decode", 128, True),  # DeepSeek-V3
    ("auto", "mla_decode", 16, False),  # DeepSeek-V2-Lite: padded to 64 rows, slower than Triton
    ("auto", "mla_prefill", 16, False),
    ("auto", "mla_prefill", 64, dispatch.MLA_PREFILL_MOSAIC),
    ("auto", "gqa_prefill", 16, True),  # GQA: heads do not matter
    ("mosaic", "mla_decode", 16, True),  # asked for: always tried
])
def test_auto_takes_mosaic_mla_from_64_heads(kernels, call, heads, want):
    assert dispatch.MLA_AUTO_MIN_HEADS == 64
    assert dispatch.wants_mosaic(kernels, "gpu", call, hopper=True, heads=heads) is want


def test_unknown_values_are_refused():
    with pytest.raises(ValueError, match="attention_kernels"):
        dispatch.wants_mosaic("cutlass", "gpu", "mla_decode")
    with pytest.raises(ValueError, match="call"):
        dispatch.auto_uses_mosaic("gqa_decode")


def test_not_hopper_here():
    assert dispatch.is_hopper() is False  # CI: CPU only


def _gqa_case(dtype: str):
    rng = np.random.default_rng(7)
    spec = KVSpec.gqa(1, 64)
    case = make_case(rng, spec, [40, 21], dtype=dtype, row_elems=64,
                     page_bytes=page_bytes_for(spec, 64, dtype, 16))
    q = jnp.asarray(rng.standard_normal((13, 2, 64)), jnp.dtype(dtype))
    cu = jnp.asarray([0, 8, 13], jnp.int32)  # the last 8 of 40 tokens, the last 5 of 21
    return case, q, cu


class _Spy:
    """Wraps a Mosaic entry point: counts calls, then runs it (or raises ValueError)."""

    def __init__(self, fn, refuse: bool = False):
        self.fn, self.refuse, self.calls = fn, refuse, 0

    def __call__(self, *args, **kw):
        self.calls += 1
        if self.refuse:
            raise ValueError("refused by the test")
        return self.fn(*args, **kw)


def test_gqa_prefill_mosaic_interpreted(monkeypatch):
    case, q, cu = _gqa_case("bfloat16")
    spy = _Spy(pm.paged_prefill_attention_mgpu)
    monkeypatch.setattr(pm, "paged_prefill_attention_mgpu", spy)
    args = (q, case.arena, case.table, case.lens, cu, case.geom)
    out = dispatch.prefill_attention(*args, kernels="mosaic", backend="interpret")
    assert spy.calls == 1
    ref = paged_prefill_attention_reference(*args)
    assert out.shape == q.shape and rel_err(out, ref) < tol("bfloat16")


def test_refused_call_runs_triton(monkeypatch):
    case, q, cu = _gqa_case("float32")  # wgmma needs bf16 / f16: the Mosaic kernel refuses
    spy = _Spy(pm.paged_prefill_attention_mgpu)
    monkeypatch.setattr(pm, "paged_prefill_attention_mgpu", spy)
    args = (q, case.arena, case.table, case.lens, cu, case.geom)
    out, lse = dispatch.prefill_attention(*args, kernels="mosaic", backend="interpret",
                                          return_lse=True)
    assert spy.calls == 1
    ref, ref_lse = paged_prefill_attention_reference(*args, return_lse=True)
    assert rel_err(out, ref) < tol("float32")
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)


def test_mla_decode_mosaic_interpreted(monkeypatch):
    rng = np.random.default_rng(3)
    spec = KVSpec.mla(128, 64)
    case = make_case(rng, spec, [0, 17, 40], dtype="bfloat16", row_elems=64,
                     page_bytes=page_bytes_for(spec, 64, "bfloat16", 16))
    ql = jnp.asarray(rng.standard_normal((3, 16, 128)), jnp.bfloat16)
    qr = jnp.asarray(rng.standard_normal((3, 16, 64)), jnp.bfloat16)
    spy = _Spy(mdm.paged_mla_decode_attention_mgpu)
    monkeypatch.setattr(mdm, "paged_mla_decode_attention_mgpu", spy)
    args = (ql, qr, case.arena, case.table, case.lens, case.geom)
    out = dispatch.mla_decode_attention(*args, scale=0.1, kernels="mosaic", backend="interpret")
    assert spy.calls == 1
    ref = paged_mla_decode_attention_reference(*args, scale=0.1)
    assert rel_err(out, ref) < tol("bfloat16")
