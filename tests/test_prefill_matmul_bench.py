"""`benchmarks/prefill_matmul.py --smoke` on CPU: every kernel passes its correctness check under
the interpreters and every implementation gets a timing row."""

from __future__ import annotations

import json

from benchmarks import prefill_matmul


def test_prefill_matmul_smoke(tmp_path) -> None:
    out = tmp_path / "pm.json"
    assert prefill_matmul.main(["--smoke", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["correctness"] and all(c["ok"] for c in res["correctness"])
    impls = {r["impl"] for r in res["rows"]}
    assert {"triton default", "mgpu default", "mgpu-ws default", "xla ragged_dot (pre-sliced)",
            "dense (same FLOPs)"} <= impls
    assert any(i.startswith("xla batched, groups padded to") for i in impls)
    assert all(r["us"] > 0 and r["tflops"] > 0 for r in res["rows"])
    layers = res["moe_layers"]
    assert {r["impl"] for r in layers} == set(prefill_matmul.LAYER_VARIANTS)
    assert all(r["ok"] and r["rel_err"] < 1e-2 and r["us"] > 0 for r in layers)


def test_padded_batched_matmul_matches_groups() -> None:
    """The capacity-padded baseline: each group's rows times its own weight, 0 past sum(sizes),
    empty groups included."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(3)
    sizes = np.array([3, 0, 5, 2], np.int32)
    x = rng.standard_normal((12, 8)).astype(np.float32)
    w = rng.standard_normal((4, 8, 6)).astype(np.float32)
    got = np.asarray(prefill_matmul.padded_batched_matmul(jnp.asarray(x), jnp.asarray(w),
                                                          jnp.asarray(sizes), capacity=8))
    want = np.zeros((12, 6), np.float32)
    at = 0
    for g, s in enumerate(sizes):
        want[at:at + s] = x[at:at + s] @ w[g]
        at += s
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sliced_dot_is_the_projection() -> None:
    """XLA's dot baseline of a projection: the [K, N] weight sliced from its arena rows, both
    output dtypes, against the float64 product of the same bf16 values."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    arena, offs = prefill_matmul.arena_of(1, 256, 384, 128)
    x = jax.random.normal(jax.random.key(0), (40, 256), jnp.bfloat16)
    want = prefill_matmul.numpy_product(x, arena, offs, np.array([40]), 256, 384, panels=False)
    for dt, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
        got = prefill_matmul.sliced_dot(x, arena, jnp.asarray(offs), None, k=256, n=384, out_dtype=dt)
        assert got.dtype == jnp.dtype(dt)
        err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
        assert err < tol, (dt, err)


def test_case_and_implementation_filters(tmp_path) -> None:
    """--impls keeps only the implementations it names (baselines always run); an unknown --cases
    name is an error."""
    import pytest

    out = tmp_path / "pm.json"
    assert prefill_matmul.main(["--smoke", "--impls", "triton", "--cases", "toy", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {c["impl"] for c in res["correctness"]} == {"triton default"}
    ours = {r["impl"] for r in res["rows"]} - {"xla ragged_dot (pre-sliced)", "dense (same FLOPs)"}
    assert {i for i in ours if not i.startswith("xla batched")} == {"triton default"}
    with pytest.raises(SystemExit):
        prefill_matmul.main(["--smoke", "--cases", "no such case"])


def test_layer_tilings_add_fused_variants(tmp_path) -> None:
    """--layer-tilings adds fused-layer variants (tilings per matmul, bf16 down rows), each
    checked against the unfused layer and timed; a malformed variant is an error."""
    import pytest

    spec = "gu.num_stages=2,dn.num_warps=8;dn.out=bfloat16"
    assert prefill_matmul.parse_layer_tilings(spec) == {
        "fused gu.num_stages=2,dn.num_warps=8": ({"num_stages": 2}, {"num_warps": 8}, None),
        "fused dn.out=bfloat16": ({}, {}, "bfloat16")}
    out = tmp_path / "pm.json"
    assert prefill_matmul.main(["--smoke", "--layers-only", "--layer-cases", "toy layer",
                                "--layer-tilings", spec, "--json", str(out)]) == 0
    layers = json.loads(out.read_text())["moe_layers"]
    impls = {r["impl"] for r in layers}
    assert impls == set(prefill_matmul.LAYER_VARIANTS) | {"fused gu.num_stages=2,dn.num_warps=8",
                                                          "fused dn.out=bfloat16"}
    assert all(r["ok"] and r["rel_err"] < 1e-2 and r["us"] > 0 and r["of_peak"] > 0 for r in layers)
    for bad in ("gu.colour=3", "dn.out=int8", "xx.bm=64", "gu.bm=big"):
        with pytest.raises(ValueError):
            prefill_matmul.parse_layer_tilings(bad)
    with pytest.raises(SystemExit):
        prefill_matmul.main(["--smoke", "--layers-only", "--layer-tilings", "gu.colour=3"])


def test_tilings_add_triton_variants(tmp_path) -> None:
    """--tilings adds Triton tilings: each checked for correctness and timed; a malformed one is
    an error."""
    import pytest

    assert prefill_matmul.parse_tilings("programs=100000;num_warps=8,bn=256") == (
        {"programs": 100000}, {"num_warps": 8, "bn": 256})
    out = tmp_path / "pm.json"
    assert prefill_matmul.main(["--smoke", "--impls", "triton programs", "--cases", "toy",
                                "--tilings", "programs=100000", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {c["impl"] for c in res["correctness"]} == {"triton programs=100000"}
    assert all(c["ok"] for c in res["correctness"])
    assert "triton programs=100000" in {r["impl"] for r in res["rows"]}
    for bad in ("colour=3", "bm=big"):
        with pytest.raises(ValueError):
            prefill_matmul.parse_tilings(bad)
    with pytest.raises(SystemExit):
        prefill_matmul.main(["--smoke", "--tilings", "colour=3"])
