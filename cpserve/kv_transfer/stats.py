"""The counters of KV transfer on one instance: kept by the engine core
(scheduler_side.py), sent with every step's stats to the front end (engine/messages.py, as a
plain dict), shown on /metrics (metrics.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

LOAD_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        60.0)


@dataclass
class KVTransferStats:
    """Counters of one instance (a snapshot goes with EngineStats to /metrics)."""

    role: str
    leases_active: int = 0
    leases_granted_total: int = 0
    leases_released_total: int = 0
    leases_expired_total: int = 0
    bytes_sent_total: int = 0  # as the decode instances reported them
    loads_active: int = 0
    loads_done_total: int = 0
    loads_failed_total: int = 0
    loads_recomputed_total: int = 0
    bytes_received_total: int = 0
    bytes_received_ipc_total: int = 0  # of which over the device path (CUDA IPC)
    load_seconds_counts: list[int] = field(
        default_factory=lambda: [0] * (len(LOAD_SECONDS_BUCKETS) + 1))
    load_seconds_sum: float = 0.0

    def observe_load(self, seconds: float) -> None:
        index = next((i for i, b in enumerate(LOAD_SECONDS_BUCKETS) if seconds <= b),
                     len(LOAD_SECONDS_BUCKETS))
        self.load_seconds_counts[index] += 1
        self.load_seconds_sum += seconds
