"""Prometheus metrics of a crosspool.v1 server, on a per-server `CollectorRegistry`.

Recorded by the server's Generate path (`serving.server.CrossPoolServicer`):
- `crosspool_ttft_seconds{model}`: histogram, Generate call received -> first token sent.
- `crosspool_tbt_seconds{model}`: histogram, gap between consecutive tokens sent (n-1 per stream).
- `crosspool_requests_finished_total{model,reason}`: stop / length / error.
- `crosspool_requests_cancelled_total{model}`: client cancel or deadline.
  These four count the OpenAI-compatible HTTP API's requests (serving/openai_api.py) the same way
  (request received -> first token handed to the HTTP layer; a client disconnect is a cancel).
- `crosspool_http_requests_total{path,status}`: HTTP API requests by path and HTTP status (the
  status of the response's start: a stream that fails later still counts 200).
Read from the engine at scrape time, from the same snapshot GetStats sends (serving/stats.py):
- `crosspool_queue_depth`: live requests (waiting + running); `crosspool_requests_waiting`
  (= GetStats.queue_depth), `crosspool_requests_running` (= GetStats.running).
- `crosspool_engine_info{mode,topology}`: 1 (GetStats.mode / .topology).
- `crosspool_weights_bytes{model}`: weights bytes per loaded model (= GetStats.weights[].bytes).
- `crosspool_model_state{model,state}`: 1 for the model's state, 0 for the others (resident /
  sleeping / on_disk / waking; = GetStats.model_states; pooled engine only).
- `crosspool_kv_pages_used{device}` / `crosspool_kv_pages_free{device}`: from `EngineStats.kv_pages`
  ((device, used, total) per KV device; = GetStats.kv_pages), only when it is not empty. The
  reference engine has no KV pool, so none are exported for it (no invented numbers).
- `crosspool_preemptions_total`: `EngineStats.preemptions` (0 for the reference engine, which never
  preempts), exported as a counter family read at scrape time.
- `crosspool_step_programs_compiled_total`: step programs the pooled engine compiled (each stalls
  its step for the compile; 0 for the reference engine).
`start_metrics_http(metrics, port)` serves them on 127.0.0.1 (port 0: a free port).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.stats import snapshot

# CPU reference path: tens of ms per token; GPUs: ~ms. Buckets cover both.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _EngineCollector(Collector):
    """Gauges read from `engine.stats()` (and optional engine reports) at scrape time."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snap = snapshot(self.engine)
        st = snap.stats
        yield GaugeMetricFamily(
            "crosspool_queue_depth",
            "Live requests in the engine (waiting + running)",
            value=st.queue_depth + st.running,
        )
        yield GaugeMetricFamily(
            "crosspool_requests_waiting", "Live requests not yet started", value=st.queue_depth
        )
        yield GaugeMetricFamily(
            "crosspool_requests_running", "Live requests generating now", value=st.running
        )
        if snap.mode:
            info = GaugeMetricFamily(
                "crosspool_engine_info", "The engine's mode and devices (value 1)",
                labels=["mode", "topology"],
            )
            info.add_metric([snap.mode, snap.topology], 1.0)
            yield info
        if snap.weights:
            g = GaugeMetricFamily(
                "crosspool_weights_bytes", "Weights bytes per loaded model", labels=["model"]
            )
            for w in snap.weights:
                g.add_metric([w.model], float(w.bytes))
            yield g
        if st.model_states:
            ms = GaugeMetricFamily(
                "crosspool_model_state", "1 for each registered model's current state "
                "(resident / sleeping / on_disk / waking)", labels=["model", "state"]
            )
            for model, state in st.model_states:
                for s in ("resident", "sleeping", "on_disk", "waking"):
                    ms.add_metric([model, s], 1.0 if s == state else 0.0)
            yield ms
        if st.kv_pages:
            used = GaugeMetricFamily(
                "crosspool_kv_pages_used", "KV pages in use per device", labels=["device"]
            )
            free = GaugeMetricFamily("crosspool_kv_pages_free", "KV pages free per device", labels=["device"])
            for dev, n_used, n_total in st.kv_pages:
                used.add_metric([str(dev)], float(n_used))
                free.add_metric([str(dev)], float(n_total - n_used))
            yield used
            yield free
        # read from the engine's own count at scrape time, so a counter family rather than a Counter
        yield CounterMetricFamily(
            "crosspool_preemptions", "Requests preempted (swapped out or recomputed)", value=st.preemptions
        )
        yield CounterMetricFamily(
            "crosspool_step_programs_compiled",
            "Step programs compiled by the pooled engine (each stalls its step)",
            value=snap.programs_compiled,
        )


class ServerMetrics:
    """The metrics of one server; `registry` is its own (never the process-global one)."""

    def __init__(self, engine: Any, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.ttft = Histogram(
            "crosspool_ttft_seconds",
            "Time to first token (Generate received -> first token sent)",
            ["model"],
            registry=self.registry,
            buckets=TTFT_BUCKETS,
        )
        self.tbt = Histogram(
            "crosspool_tbt_seconds",
            "Time between consecutive tokens sent",
            ["model"],
            registry=self.registry,
            buckets=TBT_BUCKETS,
        )
        self.finished = Counter(
            "crosspool_requests_finished",
            "Generate streams finished, by finish reason",
            ["model", "reason"],
            registry=self.registry,
        )
        self.cancelled = Counter(
            "crosspool_requests_cancelled",
            "Generate streams cancelled by the client or a deadline",
            ["model"],
            registry=self.registry,
        )
        self.http_requests = Counter(
            "crosspool_http_requests",
            "OpenAI-compatible HTTP API requests, by path and HTTP status",
            ["path", "status"],
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))

    def http_request(self, path: str, status: int) -> None:
        self.http_requests.labels(path, str(status)).inc()

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def token_gap(self, model: str, seconds: float) -> None:
        self.tbt.labels(model).observe(seconds)

    def finish(self, model: str, reason: str) -> None:
        self.finished.labels(model, reason).inc()

    def cancel(self, model: str) -> None:
        self.cancelled.labels(model).inc()


def start_metrics_http(metrics: ServerMetrics, port: int = 0, addr: str = "127.0.0.1") -> tuple[Any, str]:
    """Serves `metrics.registry` at http://addr:port/metrics (port 0: a free one). Returns
    (the WSGI server, to `shutdown()`; "addr:port")."""
    httpd, _thread = start_http_server(port, addr=addr, registry=metrics.registry)
    return httpd, f"{addr}:{httpd.server_port}"
