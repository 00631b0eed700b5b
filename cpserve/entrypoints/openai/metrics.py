"""Prometheus metrics of one server, with vLLM's names, labels and buckets.

vLLM's Grafana dashboard and alert rules read `vllm:*` series labelled `model_name` (the first
served model name) and `engine` ("0": cpserve runs one engine per server), so cpserve writes
the same series:

    gauges      vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc
    counters    vllm:prompt_tokens_total, vllm:generation_tokens_total,
                vllm:num_preemptions_total, vllm:prefix_cache_queries_total,
                vllm:prefix_cache_hits_total, vllm:request_success_total{finished_reason}
    per step    vllm:iteration_tokens_total (a histogram, despite its name, as in vLLM)
    per token   vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds
    per request vllm:e2e_request_latency_seconds, vllm:request_queue_time_seconds,
                vllm:request_inference_time_seconds, vllm:request_prefill_time_seconds,
                vllm:request_decode_time_seconds, vllm:request_time_per_output_token_seconds,
                vllm:request_prompt_tokens, vllm:request_generation_tokens,
                vllm:request_max_num_generation_tokens, vllm:request_params_n

Two names vLLM has deprecated but its example Grafana dashboard still reads are written too,
labelled: vllm:gpu_cache_usage_perc (= kv_cache_usage_perc) and
vllm:time_per_output_token_seconds (= inter_token_latency_seconds).

A request is what a client sent: one prompt with its `n` completions counts once in
`request_success_total` (finished_reason "abort" if any completion was aborted, else "length"
if any hit a length limit, else "stop"); its generation tokens are those of all completions.

The `cpserve:*` names of the previous release are still written, unlabelled, as deprecated
aliases of the same data for this release only; they will be removed in the next one.

Gauges and counters are read from the engine's latest `EngineStats` at scrape time; the
histograms are fed by the engine thread (the `EngineObserver` callbacks). Each app has its own
`CollectorRegistry`, so several servers can live in one process (tests do that).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from cpserve.engine.output_processor import FinishedRequest

CONTENT_TYPE = CONTENT_TYPE_LATEST
FINISHED_REASONS = ("stop", "length", "abort")

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                         2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's buckets for token counts)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class _Histogram:
    """Bucket counts kept once, written under the vLLM name and any `vllm_aliases` (both
    labelled), and under a `cpserve:` alias (unlabelled) if given."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float],
                 alias: str | None = None, vllm_aliases: Sequence[str] = ()) -> None:
        self.name, self.doc, self.alias, self.vllm_aliases = name, doc, alias, vllm_aliases
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value

    def families(self, labels: dict[str, str]) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        cumulative, running = [], 0
        for bound, count in zip([*map(_le, self.bounds), "+Inf"], counts):
            running += count
            cumulative.append((bound, running))
        for name in (self.name, *self.vllm_aliases):
            doc = self.doc if name == self.name else _deprecated(self.name, by="vLLM")
            family = HistogramMetricFamily(name, doc, labels=list(labels))
            family.add_metric(list(labels.values()), cumulative, sum_value=total)
            yield family
        if self.alias:
            yield HistogramMetricFamily(self.alias, _deprecated(self.name), buckets=cumulative,
                                        sum_value=total)


def _le(bound: float) -> str:
    return repr(float(bound))


def _deprecated(name: str, by: str = "cpserve") -> str:
    if by == "vLLM":
        return f"DEPRECATED by vLLM: use {name}."
    return f"DEPRECATED alias of {name}, removed in the next release."


class ServerMetrics:
    """The registry of one app; also the engine's `EngineObserver`."""

    def __init__(self, get_stats: Callable[[], Any], *, model_name: str,
                 max_model_len: int) -> None:
        self._get_stats = get_stats
        self.labels = {"model_name": model_name, "engine": "0"}
        tokens = buckets_1_2_5(max_model_len)
        h = _Histogram
        self.ttft = h("vllm:time_to_first_token_seconds",
                      "Histogram of time to first token in seconds.", TTFT_BUCKETS,
                      alias="cpserve:time_to_first_token_seconds")
        self.itl = h("vllm:inter_token_latency_seconds",
                     "Histogram of inter-token latency in seconds.", TOKEN_LATENCY_BUCKETS,
                     alias="cpserve:inter_token_latency_seconds",
                     vllm_aliases=["vllm:time_per_output_token_seconds"])
        self.e2e = h("vllm:e2e_request_latency_seconds",
                     "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS,
                     alias="cpserve:e2e_request_latency_seconds")
        self.queue = h("vllm:request_queue_time_seconds",
                       "Histogram of time spent in WAITING phase for request.",
                       REQUEST_LATENCY_BUCKETS)
        self.inference = h("vllm:request_inference_time_seconds",
                           "Histogram of time spent in RUNNING phase for request.",
                           REQUEST_LATENCY_BUCKETS)
        self.prefill = h("vllm:request_prefill_time_seconds",
                         "Histogram of time spent in PREFILL phase for request.",
                         REQUEST_LATENCY_BUCKETS)
        self.decode = h("vllm:request_decode_time_seconds",
                        "Histogram of time spent in DECODE phase for request.",
                        REQUEST_LATENCY_BUCKETS)
        self.tpot = h("vllm:request_time_per_output_token_seconds",
                      "Histogram of time_per_output_token_seconds per request.",
                      TOKEN_LATENCY_BUCKETS)
        self.prompt_tokens = h("vllm:request_prompt_tokens",
                               "Number of prefill tokens processed.", tokens)
        self.generation_tokens = h("vllm:request_generation_tokens",
                                   "Number of generation tokens processed.", tokens)
        self.max_generation_tokens = h(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.", tokens)
        self.params_n = h("vllm:request_params_n", "Histogram of the n request parameter.",
                          N_BUCKETS)
        self.iteration_tokens = h("vllm:iteration_tokens_total",
                                  "Histogram of number of tokens per engine_step.",
                                  ITERATION_TOKEN_BUCKETS)
        self._histograms = [v for v in vars(self).values() if isinstance(v, _Histogram)]
        self._finished = dict.fromkeys(FINISHED_REASONS, 0)
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # ---- EngineObserver (engine thread) ----------------------------------------------------

    def on_step(self, num_tokens: int) -> None:
        if num_tokens:
            self.iteration_tokens.observe(num_tokens)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_inter_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def on_finished(self, request: FinishedRequest, e2e_s: float) -> None:
        reasons = {reason or "abort" for reason in request.finish_reasons}
        self._count_finished("abort" if "abort" in reasons else
                             "length" if "length" in reasons else "stop")
        self.e2e.observe(e2e_s)
        lengths = request.num_generated_tokens
        self.prompt_tokens.observe(request.num_prompt_tokens)
        self.generation_tokens.observe(sum(lengths))
        self.max_generation_tokens.observe(max(lengths, default=0))
        self.params_n.observe(len(lengths))
        m = request.metrics
        if m is None or m.first_scheduled_time is None:
            return
        first_token = m.first_token_time or m.first_scheduled_time
        last_token = m.last_token_time or first_token
        self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
        self.prefill.observe(max(0.0, first_token - m.first_scheduled_time))
        self.decode.observe(max(0.0, last_token - first_token))
        self.inference.observe(max(0.0, last_token - m.first_scheduled_time))
        if max(lengths, default=0) > 1:
            self.tpot.observe(max(0.0, last_token - first_token) / (max(lengths) - 1))

    def on_aborted(self) -> None:
        self._count_finished("abort")

    def _count_finished(self, reason: str) -> None:
        with self._lock:
            self._finished[reason] = self._finished.get(reason, 0) + 1

    # ---- Prometheus collector (scrape thread) ------------------------------------------------

    def describe(self) -> list[Metric]:
        return []  # registering must not scrape

    def collect(self) -> Iterator[Metric]:
        s = self._get_stats()
        names, values = list(self.labels), list(self.labels.values())
        for name, doc, value in (
                ("num_requests_running", "Number of requests in model execution batches.",
                 s.num_running),
                ("num_requests_waiting", "Number of requests waiting to be processed.",
                 s.num_waiting),
                ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                 s.kv_cache_usage)):
            family = GaugeMetricFamily(f"vllm:{name}", doc, labels=names)
            family.add_metric(values, value)
            yield family
            yield GaugeMetricFamily(f"cpserve:{name}", _deprecated(f"vllm:{name}"), value=value)
        # vLLM's name before 0.9, which its example Grafana dashboard still reads.
        family = GaugeMetricFamily("vllm:gpu_cache_usage_perc",
                                   _deprecated("vllm:kv_cache_usage_perc", by="vLLM"),
                                   labels=names)
        family.add_metric(values, s.kv_cache_usage)
        yield family
        for name, doc, value in (
                ("prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens_total),
                ("generation_tokens", "Number of generation tokens processed.",
                 s.generation_tokens_total),
                ("num_preemptions", "Cumulative number of preemption from the engine.",
                 s.num_preemptions_total),
                ("prefix_cache_queries",
                 "Prefix cache queries, in terms of number of queried tokens.",
                 s.prefix_cache_queries_total),
                ("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                 s.prefix_cache_hits_total)):
            family = CounterMetricFamily(f"vllm:{name}", doc, labels=names)
            family.add_metric(values, value)
            yield family
            yield CounterMetricFamily(f"cpserve:{name}", _deprecated(f"vllm:{name}_total"),
                                      value=value)
        with self._lock:
            finished = dict(self._finished)
        success = CounterMetricFamily("vllm:request_success",
                                      "Count of successfully processed requests.",
                                      labels=[*names, "finished_reason"])
        alias = CounterMetricFamily("cpserve:request_success",
                                    _deprecated("vllm:request_success_total"),
                                    labels=["finished_reason"])
        for reason, count in finished.items():
            success.add_metric([*values, reason], count)
            alias.add_metric([reason], count)
        yield success
        yield alias
        for histogram in self._histograms:
            yield from histogram.families(self.labels)

    def render(self) -> bytes:
        return _generate_latest(self.registry)
