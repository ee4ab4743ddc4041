"""`benchmarks/prefill_attention.py --smoke` on CPU: the chosen cases and configurations are each
checked against the float32 reference and get a row; an unknown case is refused."""

from __future__ import annotations

import json

import pytest

from benchmarks import prefill_attention


def test_cases_and_configs_are_run_and_checked(tmp_path) -> None:
    out = tmp_path / "pa.json"
    n = len(prefill_attention.CONFIGS)
    prefill_attention.main(["--smoke", "--cases", "1x2048@0,1x2048@30K",
                            "--configs", f"0,{n - 2}", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    got = {(r["geometry"], r["case"], r["config"]) for r in rows}
    assert got == {(g, c, cfg) for g in prefill_attention.GEOMETRIES
                   for c in ("1x2048@0", "1x2048@30K") for cfg in ("default", "num_splits=1")}
    assert all(r["rel_err"] < 2e-2 and r["us"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        prefill_attention.main(["--smoke", "--cases", "1x9@0"])
