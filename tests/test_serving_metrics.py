"""Prometheus metrics of a real server: scraped over HTTP on 127.0.0.1 and parsed."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crosspool_jax.engine_api import EngineStats
from serving.client import CrossPoolClient
from serving.metrics import ServerMetrics, start_metrics_http
from serving.server import demo_engine, start_server

NAME = "demo-mixtral"


@pytest.fixture(scope="module")
def served():
    engine = demo_engine(max_live_requests=4, names=[NAME])
    metrics = ServerMetrics(engine)
    s = start_server(engine, port=0, metrics=metrics)
    httpd, maddr = start_metrics_http(metrics, 0)
    yield s, f"http://{maddr}/metrics"
    httpd.shutdown()
    s.stop(grace=0)


def _scrape(url):
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(body):
        for sm in fam.samples:
            out[(sm.name, tuple(sorted(sm.labels.items())))] = sm.value
    return out


def test_metrics_count_what_was_streamed(served):
    s, url = served
    streamed = []
    with CrossPoolClient(s.address) as c:
        for i, n in enumerate((3, 5, 1, 4)):
            resps = list(
                c.generate_stream(NAME, prompt=f"hello {i}", max_new_tokens=n, ignore_eos=True, timeout=60)
            )
            assert resps[-1].finish_reason != 0
            streamed.append(len(resps))
        # one cancelled stream: queued behind nothing, cancelled after its first token
        call = c.generate_stream(NAME, prompt="cancel me", max_new_tokens=200, ignore_eos=True, timeout=60)
        next(iter(call))
        call.cancel()
        end = time.time() + 10
        while c.stats().live_request_ids and time.time() < end:
            time.sleep(0.02)
    assert streamed == [3, 5, 1, 4]
    m = _scrape(url)
    model = (("model", NAME),)
    # the cancelled stream sent >= 1 token; its first token counts in TTFT, its gaps in TBT
    assert m[("crosspool_ttft_seconds_count", model)] == len(streamed) + 1
    tbt = m[("crosspool_tbt_seconds_count", model)]
    assert tbt >= sum(n - 1 for n in streamed)
    assert m[("crosspool_ttft_seconds_sum", model)] > 0
    assert m[("crosspool_requests_finished_total", (("model", NAME), ("reason", "length")))] == 4
    end = time.time() + 10
    while m.get(("crosspool_requests_cancelled_total", model), 0) < 1 and time.time() < end:
        time.sleep(0.05)
        m = _scrape(url)
    assert m[("crosspool_requests_cancelled_total", model)] == 1
    assert m[("crosspool_queue_depth", ())] == 0
    assert m[("crosspool_requests_running", ())] == 0
    assert m[("crosspool_weights_bytes", model)] == s.engine.weights_bytes(NAME) > 0
    assert not any(k[0].startswith("crosspool_kv_pages") for k in m)  # the reference engine has no KV pool
    assert m[("crosspool_preemptions_total", ())] == 0  # ... and never preempts


def test_tbt_counts_exact_without_cancel():
    engine = demo_engine(max_live_requests=2, names=[NAME])
    metrics = ServerMetrics(engine)
    s = start_server(engine, port=0, metrics=metrics)
    httpd, maddr = start_metrics_http(metrics, 0)
    try:
        with CrossPoolClient(s.address) as c:
            lens = [
                len(list(c.generate_stream(NAME, prompt="x" * (i + 1), max_new_tokens=k, ignore_eos=True)))
                for i, k in enumerate((2, 6, 3))
            ]
        m = _scrape(f"http://{maddr}/metrics")
        model = (("model", NAME),)
        assert m[("crosspool_ttft_seconds_count", model)] == 3
        assert m[("crosspool_tbt_seconds_count", model)] == sum(n - 1 for n in lens) == 8
        assert m[("crosspool_queue_depth", ())] == 0
    finally:
        httpd.shutdown()
        s.stop(grace=0)


class FakePoolEngine:
    """Only `stats()`: what the metrics read from a pooled engine, set by the test."""

    def __init__(self):
        self.kv_pages: tuple = ()
        self.preemptions = 0

    def stats(self):
        return EngineStats(
            queue_depth=1,
            running=2,
            max_live_requests=8,
            live_request_ids=("a", "b", "c"),
            completed=0,
            cancelled=0,
            failed=0,
            tokens_generated=0,
            models=(),
            kv_pages=self.kv_pages,
            preemptions=self.preemptions,
        )


def test_kv_pages_and_preemptions_follow_the_engine():
    from prometheus_client import generate_latest

    engine = FakePoolEngine()
    metrics = ServerMetrics(engine)

    def scrape():
        out = {}
        for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
            for sm in fam.samples:
                out[(sm.name, tuple(sorted(sm.labels.items())))] = sm.value
        return out

    m = scrape()
    assert not any(k[0].startswith("crosspool_kv_pages") for k in m)  # no KV pool reported: no gauges
    assert m[("crosspool_preemptions_total", ())] == 0 and m[("crosspool_queue_depth", ())] == 3
    engine.kv_pages = (("cuda:0", 10, 100), ("cuda:1", 0, 100))
    engine.preemptions = 3
    m = scrape()
    used = {k[1][0][1]: v for k, v in m.items() if k[0] == "crosspool_kv_pages_used"}
    free = {k[1][0][1]: v for k, v in m.items() if k[0] == "crosspool_kv_pages_free"}
    assert used == {"cuda:0": 10, "cuda:1": 0} and free == {"cuda:0": 90, "cuda:1": 100}
    assert m[("crosspool_preemptions_total", ())] == 3
    engine.kv_pages = (("cuda:0", 0, 100), ("cuda:1", 0, 100))  # pages back to zero
    engine.preemptions = 5
    m = scrape()
    assert m[("crosspool_kv_pages_used", (("device", "cuda:0"),))] == 0
    assert m[("crosspool_kv_pages_free", (("device", "cuda:0"),))] == 100
    assert m[("crosspool_preemptions_total", ())] == 5


def test_engine_stats_new_fields_default():
    st = EngineStats(0, 0, 1, (), 0, 0, 0, 0, ())
    assert st.kv_pages == () and st.preemptions == 0


def test_serve_cli_metrics_flag():
    from serving.cli import build_parser

    args = build_parser().parse_args(["serve", "--metrics-port", "0"])
    assert args.metrics_port == 0
    assert build_parser().parse_args(["serve"]).metrics_port is None
