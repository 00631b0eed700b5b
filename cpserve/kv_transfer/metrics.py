"""Prometheus series of KV transfer (cpserve's own: vLLM's connectors name theirs per
connector), labelled as the server's other series (`model_name`, `engine`):

    prefill side  cpserve:kv_transfer_leases (gauge), cpserve:kv_transfer_leases_total{outcome=
                  "granted"|"released"|"expired"}, cpserve:kv_transfer_sent_bytes_total
    decode side   cpserve:kv_transfer_loads (gauge), cpserve:kv_transfer_loads_total{outcome=
                  "done"|"failed"|"recomputed"}, cpserve:kv_transfer_received_bytes_total{path=
                  "tcp"|"cuda_ipc"},
                  cpserve:kv_transfer_load_seconds (histogram: admission to the last byte)
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from cpserve.kv_transfer.stats import LOAD_SECONDS_BUCKETS, KVTransferStats


def families(s: KVTransferStats, labels: dict[str, str]) -> Iterator[Metric]:
    names, values = list(labels), list(labels.values())

    def gauge(name: str, doc: str, value: float) -> Metric:
        family = GaugeMetricFamily(f"cpserve:kv_transfer_{name}", doc, labels=names)
        family.add_metric(values, value)
        return family

    def counter(name: str, doc: str, value: float) -> Metric:
        family = CounterMetricFamily(f"cpserve:kv_transfer_{name}", doc, labels=names)
        family.add_metric(values, value)
        return family

    def outcomes(name: str, doc: str, counts: dict[str, int]) -> Metric:
        family = CounterMetricFamily(f"cpserve:kv_transfer_{name}", doc,
                                     labels=[*names, "outcome"])
        for outcome, count in counts.items():
            family.add_metric([*values, outcome], count)
        return family

    if s.role in ("kv_producer", "kv_both"):
        yield gauge("leases", "Requests whose KV this instance holds for a decode instance.",
                    s.leases_active)
        yield outcomes("leases", "KV leases by how they ended.",
                       {"granted": s.leases_granted_total, "released": s.leases_released_total,
                        "expired": s.leases_expired_total})
        yield counter("sent_bytes", "KV bytes decode instances pulled from this one.",
                      s.bytes_sent_total)
    if s.role in ("kv_consumer", "kv_both"):
        yield gauge("loads", "Requests whose prompt KV is being pulled.", s.loads_active)
        yield outcomes("loads", "KV loads by outcome.",
                       {"done": s.loads_done_total, "failed": s.loads_failed_total,
                        "recomputed": s.loads_recomputed_total})
        family = CounterMetricFamily("cpserve:kv_transfer_received_bytes",
                                     "KV bytes pulled from prefill instances, by path.",
                                     labels=[*names, "path"])
        family.add_metric([*values, "tcp"], s.bytes_received_total - s.bytes_received_ipc_total)
        family.add_metric([*values, "cuda_ipc"], s.bytes_received_ipc_total)
        yield family
        family = HistogramMetricFamily("cpserve:kv_transfer_load_seconds",
                                       "Seconds from a request's admission until its prompt "
                                       "KV had arrived.", labels=names)
        cumulative, running = [], 0
        for bound, count in zip([*map(repr, map(float, LOAD_SECONDS_BUCKETS)), "+Inf"],
                                s.load_seconds_counts):
            running += count
            cumulative.append((bound, running))
        family.add_metric(values, cumulative, sum_value=s.load_seconds_sum)
        yield family
