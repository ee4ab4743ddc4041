"""`benchmarks/decode_costs.py`: the decode-call fit on a hand-made call log with known terms."""

from __future__ import annotations

import gzip
import json

import pytest

from benchmarks import decode_costs


def _call(requests: int, kv: int, ms: float, **kw) -> dict:
    return {"decode": True, "busy": ms / 1e3, "requests": requests, "kv_tokens": kv,
            "compiled": False, **kw}


def _log() -> list[dict]:
    # busy = 15 ms + 1.5 ms x requests + 0.1 ms per 1,000 KV tokens, exactly
    calls = [_call(r, kv, 15 + 1.5 * r + 0.1 * kv / 1e3)
             for r, kv in [(1, 7000), (1, 43000), (2, 20000), (4, 60000), (9, 120000), (3, 9000)]]
    calls.append(_call(1, 43000, 90.0, compiled=True))  # padded into a larger program: left out
    calls.append({"decode": False, "busy": 0.040, "requests": 1, "kv_tokens": 0,
                  "prefill_tokens": 2048})  # prefill: counted in the device time only
    return calls


def test_fit_recovers_the_terms_and_the_fixed_share(tmp_path) -> None:
    res = decode_costs.analyse(_log())
    assert res["decode_calls"] == 6 and res["padded_left_out"] == 1
    assert res["fixed_ms"] == pytest.approx(15.0)
    assert res["per_request_ms"] == pytest.approx(1.5)
    assert res["per_1k_kv_tokens_ms"] == pytest.approx(0.1)
    assert res["r2"] == pytest.approx(1.0)
    # decode busy: 6 x 15 + 1.5 x 20 + 0.1 x 259 = 145.9 ms; the fixed term is 90 of it
    assert res["decode_busy_s"] == pytest.approx(0.1459)
    assert res["all_busy_s"] == pytest.approx(0.1459 + 0.090 + 0.040)
    assert res["fixed_share"] == pytest.approx(90 / 145.9)
    bands = {b["kv_from"]: b for b in res["one_request"]}
    assert set(bands) == {0, 32768}
    assert bands[0]["calls"] == 1 and bands[0]["median_ms"] == pytest.approx(17.2)
    assert bands[32768]["median_ms"] == pytest.approx(20.8)


def test_main_reads_a_gzipped_log_and_writes_json(tmp_path, capsys) -> None:
    log = tmp_path / "calls_shared.jsonl.gz"
    with gzip.open(log, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(c) + "\n" for c in _log())
    out = tmp_path / "costs.json"
    assert decode_costs.main([str(log), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["log"] == str(log) and rows[0]["fixed_ms"] == pytest.approx(15.0)
    assert "busy = 15.00 ms + 1.500 ms x requests" in capsys.readouterr().out


def test_too_few_calls_is_an_error(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        decode_costs.fit([_call(1, 0, 10.0)])
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps(_call(1, 0, 10.0)) + "\n")
    assert decode_costs.main([str(short)]) == 1  # said, not a traceback
    assert "1 decode calls: at least 3 are needed" in capsys.readouterr().out
