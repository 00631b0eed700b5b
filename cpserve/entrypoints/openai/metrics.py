"""Prometheus metrics of one server, named like vLLM's with the `cpserve:` prefix.

Gauges and counters are read from the engine's latest `EngineStats` at scrape time; latency
histograms are fed by the engine thread through the `EngineObserver` callbacks. Each app has
its own `CollectorRegistry`, so several servers can live in one process (tests do that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from cpserve.engine.output_processor import FinishedRequest

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineStatsCollector:
    """Exposes the engine's own counters and gauges, read when Prometheus scrapes."""

    def __init__(self, get_stats: Callable[[], Any]) -> None:
        self._get_stats = get_stats

    def collect(self) -> Iterator[Metric]:
        s = self._get_stats()
        yield GaugeMetricFamily("cpserve:num_requests_running",
                                "Requests in the running batch.", value=s.num_running)
        yield GaugeMetricFamily("cpserve:num_requests_waiting",
                                "Requests waiting to be scheduled.", value=s.num_waiting)
        yield GaugeMetricFamily("cpserve:kv_cache_usage_perc",
                                "Fraction of KV cache blocks in use, 0 to 1.",
                                value=s.kv_cache_usage)
        for name, doc, value in (
            ("cpserve:num_preemptions", "Preemptions since start.", s.num_preemptions_total),
            ("cpserve:prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total),
            ("cpserve:generation_tokens", "Tokens generated.", s.generation_tokens_total),
            ("cpserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             s.prefix_cache_queries_total),
            ("cpserve:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             s.prefix_cache_hits_total),
        ):
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """The registry of one app; also the engine's `EngineObserver`."""

    def __init__(self, get_stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(get_stats))
        self.ttft = Histogram("cpserve:time_to_first_token_seconds",
                              "Time from arrival to the first generated token.",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("cpserve:inter_token_latency_seconds",
                             "Time between two generated tokens of a request.",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("cpserve:e2e_request_latency_seconds",
                             "Time from arrival to the last token.",
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("cpserve:request_success",
                                "Requests finished, by finish reason.", ["finished_reason"],
                                registry=self.registry)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def on_finished(self, request: FinishedRequest, e2e_s: float) -> None:
        self.e2e.observe(e2e_s)
        for reason in request.finish_reasons:
            self.finished.labels(finished_reason=reason or "abort").inc()

    def render(self) -> bytes:
        return _generate_latest(self.registry)
