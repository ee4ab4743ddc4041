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
    assert all(r["us"] > 0 and r["tflops"] > 0 for r in res["rows"])
    layers = res["moe_layers"]
    assert {r["impl"] for r in layers} == {"fused", "unfused"}
    assert all(r["ok"] and r["rel_err"] < 1e-2 and r["us"] > 0 for r in layers)
