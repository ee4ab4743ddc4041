"""`benchmarks/ttft_tail.py` on hand-made requests: the slowest first tokens, the backlog each
joined and the same model's request it waited behind."""

from __future__ import annotations

import json

from benchmarks import ttft_tail


def _req(index: int, model: str, prompt: int, arrival: float, first: float) -> dict:
    return {"index": index, "model": model, "prompt_len": prompt, "arrival_s": arrival,
            "token_s": [first, first + 0.1]}


def test_slowest_first_tokens(tmp_path, capsys) -> None:
    reqs = [
        _req(0, "a", 1000, 10.0, 10.5),   # TTFT 0.5
        _req(1, "a", 9000, 10.2, 16.0),   # TTFT 5.8: behind #0
        _req(2, "b", 500, 10.3, 11.0),    # TTFT 0.7: nothing of b before it
        _req(3, "a", 200, 11.0, 16.2),    # TTFT 5.2: behind #1; joined #1's 9,000 tokens
    ]
    rows = ttft_tail.slowest(reqs, 2)
    assert [r["index"] for r in rows] == [1, 3]
    assert [round(r["ttft_s"], 3) for r in rows] == [5.8, 5.2]
    assert [round(r["arrived_s"], 3) for r in rows] == [0.2, 1.0]
    assert rows[0]["behind"] == {"index": 0, "prompt_len": 1000, "first_token_s": 0.5}
    assert rows[1]["behind"]["index"] == 1 and rows[1]["backlog_tokens"] == 9000
    assert rows[0]["backlog_tokens"] == 1000  # #0 was sent before #1 and had no token yet
    assert ttft_tail.slowest(reqs, 4)[-1]["behind"] is None  # #0: nothing of a before it
    path = tmp_path / "requests_shared.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*reqs, {**_req(4, "a", 5, 12, 0), "token_s": []}]))
    assert ttft_tail.main([str(path), "--top", "1", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "9,000" in out and "#0 (1,000 tokens" in out
    assert json.loads((tmp_path / "out.json").read_text())[0]["index"] == 1
