"""`benchmarks/load_test.py`'s stream checks and tally, without a server: a right stream counts
as ok with its TTFT and gaps; lost, duplicated, re-ordered or wrong streams and a request id seen
twice count as corrupted or lost."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.load_test import _check_grpc, _PassTally

CASE = {"model": "demo-mixtral", "prompt": "hi", "max_new": 3, "ref": [5, 6, 7]}


def msg(i: int, tok: int, fin: int = 0, rid: str = "r1", n: int = 3) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, index=i, token_id=tok, finish_reason=fin,
                           usage=SimpleNamespace(completion_tokens=n))


def stream(toks=(5, 6, 7), **kw) -> list[SimpleNamespace]:
    return [msg(i, t, fin=int(i == len(toks) - 1), **kw) for i, t in enumerate(toks)]


def test_right_stream_passes() -> None:
    assert _check_grpc(stream(), CASE) is None


@pytest.mark.parametrize("resps, why", [
    ([], "lost"),
    ([msg(0, 5), msg(1, 6), msg(2, 7)], "lost"),  # no final message
    ([msg(0, 5, fin=1), msg(1, 6), msg(2, 7, fin=1)], "duplicated final"),
    ([msg(0, 5), msg(1, 6, rid="r2"), msg(2, 7, fin=1)], "several request ids"),
    ([msg(0, 5), msg(2, 6), msg(1, 7, fin=1)], "bad indices"),
    (stream(n=4), "usage"),
    (stream((5, 6, 8)), "differ from the reference"),
])
def test_wrong_streams_are_named(resps, why) -> None:
    assert why in _check_grpc(resps, CASE)


def test_tally_counts_ok_streams_and_a_repeated_id() -> None:
    tally = _PassTally()
    tally.stream(CASE, {"r1"}, None, 10.0, [10.5, 10.6, 10.8])
    assert tally.counts["ok"] == 1 and tally.counts["tokens"] == 3
    assert tally.ttft == [pytest.approx(0.5)] and tally.tbt == pytest.approx([0.1, 0.2])
    tally.stream(CASE, {"r1"}, None, 11.0, [11.5])  # the same request id in a second stream
    tally.stream(CASE, {"r2"}, "usage mismatch", 12.0, [12.5])
    tally.exhausted()
    tally.error("UNAVAILABLE: gone")
    assert tally.counts == {"ok": 1, "exhausted": 1, "errors": 1, "mismatch": 2, "tokens": 3}
    assert "request id r1 streamed twice" in tally.errors[0] and "usage mismatch" in tally.errors[1]
    assert tally.seen_ids == {"r1", "r2"}
