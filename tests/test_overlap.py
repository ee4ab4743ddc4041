"""Host work overlapping device work (`GroupRunner(overlap=True)`, the engine's default).

A step dispatches its calls, then reads the PREVIOUS step's tokens: the planner sees tokens in flight
as placeholders, decode inputs still on the device are gathered there, a stop read one call late
drops the tokens of the call that ran past it. Checked here: the schedule (every decode call after
the first is dispatched before its predecessor is read), equality with the reference and with
`overlap=False` (greedy, seeded sampling, stop ids, split KV), dropped tokens, cancel with calls in
flight, and the planner's placeholders being revised to the real tokens. Sampled requests (seeded;
GQA and MLA) equal the reference in both settings, so on and off agree on them too.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pooled_helpers import References, Req, build_runner, drive, f32

from crosspool_jax.demo import demo_models
from crosspool_jax.execution.runner_records import PENDING
from crosspool_jax.execution.sampling import SamplingParams

MIX, QWEN, DSV3 = "demo-mixtral", "demo-qwen3-moe", "demo-deepseek-v3"
SAMPLED = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=77)


def _prompt(seed: int, n: int) -> tuple[int, ...]:
    return tuple(int(t) for t in np.random.default_rng(seed).integers(3, 250, n))


@pytest.fixture(scope="module")
def demo():
    """The demo models' references and one runner shared by the tests (its compiled programs too):
    each test sets `runner.overlap` (allowed between steps) and uses its own request ids."""
    models = {name: (m.config, f32(m.weights)) for name, m in demo_models(seed=3).items()}
    return References(models), build_runner(models, kv_pages=6, prefill_chunk=32)


def _requests(refs: References, tag: str) -> list[Req]:
    reqs = [
        Req("mx", MIX, _prompt(11, 9), 13),
        Req("mx-stop", MIX, _prompt(12, 6), 14),
        Req("qw-s", QWEN, _prompt(13, 5), 11, SAMPLED),
        Req("ds-s", DSV3, _prompt(14, 7), 12, dataclasses.replace(SAMPLED, seed=5)),
        Req("ds-long", DSV3, _prompt(15, 44), 9),  # 53 KV tokens: past one KV device's 3 rows of 16
    ]
    full, _ = refs(reqs[1])
    stop = next(t for i, t in enumerate(full) if i >= 5 and t not in full[:i])  # mid 2nd decode call
    reqs[1] = dataclasses.replace(reqs[1], stop_ids=(stop,))
    return [dataclasses.replace(r, rid=f"{tag}{r.rid}") for r in reqs]


class Trace:
    """Records the order in which a runner dispatches calls and reads them (a context manager:
    the runner's methods are restored on exit)."""

    def __init__(self, runner):
        self.runner = runner
        self.events: list[tuple[str, int]] = []
        self.feeds = 0
        run, collect, feed = runner._run, runner._collect, runner._feed
        self._feed = feed
        dispatched = [0]

        def traced_run(items, decode):
            out = run(items, decode)
            self.events.append(("dispatch", dispatched[0]))
            dispatched[0] += 1
            return out

        def traced_collect(keep):
            before = dispatched[0] - len(runner._inflight)  # index of the oldest call in flight
            collect(keep)
            after = dispatched[0] - len(runner._inflight)
            self.events += [("read", i) for i in range(before, after)]

        def traced_feed(*a):
            self.feeds += 1
            return feed(*a)

        runner._run, runner._collect, runner._feed = traced_run, traced_collect, traced_feed

    def __enter__(self) -> Trace:
        return self

    def __exit__(self, *exc: object) -> None:
        for name in ("_run", "_collect", "_feed"):
            del self.runner.__dict__[name]  # back to the class's methods / the jitted feed below
        self.runner._feed = self._feed

    def order(self, kind: str, i: int) -> int:
        return self.events.index((kind, i))


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_schedule_and_reference_equality(demo, overlap: bool) -> None:
    refs, runner = demo
    runner.overlap = overlap
    dropped = runner.dropped_tokens
    reqs = _requests(refs, f"sched{int(overlap)}-")
    with Trace(runner) as trace:
        log = drive(runner, reqs)
    for r in reqs:
        want, reason = refs(r)
        assert log.tokens[r.rid] == want, (r.rid, want, log.tokens[r.rid])
        assert log.finished[r.rid][0] == reason, r.rid
    # a decode range cut at a segment end continues with its input fed from the call in flight
    assert log.max_segments[reqs[-1].rid] >= 2
    n = sum(1 for k, _ in trace.events if k == "dispatch")
    assert sorted(i for k, i in trace.events if k == "read") == list(range(n))  # every call read once
    late = [i for i in range(n - 1) if trace.order("dispatch", i + 1) < trace.order("read", i)]
    if overlap:
        # after the first step, a call is read only once the next step's calls are dispatched
        assert len(late) >= n - 3, trace.events
        assert trace.feeds > 0  # decode inputs gathered on the device
        assert runner.dropped_tokens > dropped  # mx-stop's stop was read a call late
    else:
        assert not late and trace.feeds == 0 and runner.dropped_tokens == dropped
    assert runner.kv.pool_stats().pages_used == 0 and not runner.reqs
    assert not runner.has_work and not runner._inflight  # nothing left to read later
    runner.kv.check_invariants()


def test_cancel_with_calls_in_flight_frees_pages_and_drops_tokens(demo) -> None:
    refs, runner = demo
    runner.overlap = True
    keep, gone = Req("keep", QWEN, _prompt(40, 6), 12), Req("gone", MIX, _prompt(41, 6), 12)
    for r in (keep, gone):
        runner.submit(r.rid, r.model, r.prompt, r.max_new, r.sampling)
    got: dict[str, list[int]] = {"keep": [], "gone": []}
    for _ in range(3):  # prefill, then decode calls: one call in flight after each step
        res = runner.step()
        for rid, toks in res.tokens.items():
            got[rid] += toks
    assert runner._inflight and runner.reqs["gone"].pending > 0
    assert runner.cancel("gone")
    assert not runner.kv.has_request("gone")
    dropped = runner.dropped_tokens
    finished = {}
    while runner.has_work:
        res = runner.step()
        assert "gone" not in res.tokens
        got["keep"] += res.tokens.get("keep", [])
        finished.update(res.finished)
    assert runner.dropped_tokens > dropped  # the cancelled request's tokens in flight
    assert got["keep"] == refs(keep)[0] and finished["keep"][0] == "length"
    assert got["gone"] == refs(gone)[0][: len(got["gone"])]
    assert runner.kv.pool_stats().pages_used == 0


def test_planner_placeholders_are_revised_to_the_real_tokens(demo) -> None:
    refs, runner = demo
    runner.overlap = True
    r = Req("p", DSV3, _prompt(50, 5), 10)
    runner.submit(r.rid, r.model, r.prompt, r.max_new, r.sampling)
    seen_pending = False
    got: list[int] = []
    while "p" in runner.reqs:
        res = runner.step()
        got += res.tokens.get("p", [])
        if "p" in runner.reqs:
            req, info = runner.reqs["p"], runner.planner.info("p")
            assert list(info.generated) == req.generated  # placeholders where tokens are in flight
            assert req.generated.count(PENDING) == req.pending
            assert req.generated[: len(got)] == got  # everything read is real
            seen_pending |= req.pending > 0
    assert seen_pending and got == refs(r)[0]
