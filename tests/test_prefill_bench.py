"""`benchmarks/prefill.py` on CPU (`--smoke`): the correctness check passes, every (prompt, variant)
row is written with positive tokens/s and MFU, and the chunk bookkeeping (which chunks are timed,
how a prompt's seconds are summed) is exact."""

from __future__ import annotations

import json

from benchmarks import prefill


def test_timed_chunks_and_their_sum() -> None:
    assert prefill.timed_chunks(3) == [0, 1, 2]
    got = prefill.timed_chunks(16)  # 32K prompt in 2,048-token chunks: 8 of 16 timed, ends included
    assert len(got) == prefill.MAX_TIMED_CHUNKS and got[0] == 0 and got[-1] == 15
    # chunks 0 and 2 timed at 1 s and 3 s: chunk 1 is interpolated at 2 s
    assert prefill.prompt_seconds({0: 1.0, 2: 3.0}, 3) == 6.0


def test_prefill_smoke_on_cpu(tmp_path) -> None:
    out = tmp_path / "prefill.json"
    assert prefill.main(["--smoke", "--iters", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["correctness"] == {"demo-mixtral engine": True, "demo-mixtral xla": True}
    rows = {(r["prompt"], r["variant"]): r for r in res["rows"]}
    assert set(rows) == {(16, "engine"), (16, "xla"), (64, "engine"), (64, "xla")}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["model_flops"] > 0
        assert r["chunks"] == r["prompt"] // 16 and r["timed_chunks"] == list(range(r["chunks"]))
    # the longer prompt attends over more context: a larger share of its FLOPs is attention
    assert rows[(64, "engine")]["attention_share"] > rows[(16, "engine")]["attention_share"]
