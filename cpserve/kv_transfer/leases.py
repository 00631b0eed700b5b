"""The KV a prefill rank may hand out: blocks held under a lease, pinned while being read.

The driver decides leases (scheduler side); every rank learns them from the step plan, before
the step that could reuse their blocks runs:

    plan N     the request's prompt is computed; it finishes, its blocks go under a lease
    plan N+1   "lease R: blocks [...]"  -> each rank: add(R)   (a decode rank may now read)
    ...        decode ranks pin R, copy blocks, unpin
    plan M     "lease R ended"          -> each rank: end(R) waits for pins to drop, then the
                                           driver may hand the blocks to other requests

A reader pins the lease for as long as it reads the cache (a TCP frame being gathered, a CUDA
IPC copy), so a lease never ends under a copy in flight. On CUDA, `add` records an event on
the compute stream: readers wait for it, so they see the prefill's writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cpserve.kv_transfer.wire import RemoteError

logger = logging.getLogger(__name__)
_REMEMBER_ENDED = 4096  # ended leases remembered, so late readers get "expired" at once


@dataclass
class Lease:
    request_id: str
    blocks: frozenset[int]
    ready: torch.cuda.Event | None = None
    pins: int = 0
    ended: bool = False


class RankLeases:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cv = threading.Condition()
        self._leases: dict[str, Lease] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        with self._cv:
            return len(self._leases)

    # Main thread (plan application) ---------------------------------------------------------
    def add(self, request_id: str, blocks: list[int]) -> None:
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        with self._cv:
            self._leases[request_id] = Lease(request_id, frozenset(blocks), ready)
            self._ended.pop(request_id, None)
            self._cv.notify_all()

    def end(self, request_id: str, timeout_s: float) -> None:
        """Forget a lease; returns once nobody reads its blocks (or after `timeout_s`, a reader
        that stopped answering)."""
        with self._cv:
            self._ended[request_id] = None
            while len(self._ended) > _REMEMBER_ENDED:
                self._ended.popitem(last=False)
            lease = self._leases.get(request_id)
            if lease is None:
                return
            lease.ended = True
            deadline = time.monotonic() + timeout_s
            while lease.pins and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
            if lease.pins:
                logger.warning("KV lease %s ended while %d reader(s) still held it", request_id,
                               lease.pins)
            del self._leases[request_id]

    def end_all(self) -> None:
        with self._cv:
            for lease in self._leases.values():
                lease.ended = True
            self._leases.clear()
            self._cv.notify_all()

    # Reader threads ---------------------------------------------------------------------------
    def pin(self, request_id: str, blocks: list[int], wait_s: float) -> Lease:
        """Pin the lease of `request_id`, checking it holds `blocks`. The lease may not be
        known yet (the plan that adds it is on its way): wait up to `wait_s` for it."""
        deadline = time.monotonic() + wait_s
        with self._cv:
            while True:
                lease = self._leases.get(request_id)
                if lease is not None and not lease.ended:
                    break
                if request_id in self._ended or time.monotonic() >= deadline:
                    raise RemoteError(f"no KV lease for request {request_id!r} on this "
                                      "prefill instance: it expired, was released, or was "
                                      "never held", "expired")
                self._cv.wait(deadline - time.monotonic())
            outside = set(blocks) - lease.blocks
            if outside:
                raise RemoteError(f"blocks {sorted(outside)[:8]} are not in the KV lease of "
                                  f"request {request_id!r}", "bad_request")
            lease.pins += 1
        if lease.ready is not None:
            lease.ready.synchronize()
        return lease

    def unpin(self, lease: Lease) -> None:
        with self._cv:
            lease.pins -= 1
            self._cv.notify_all()

    @contextmanager
    def reading(self, lease: Lease):
        """Re-pin a lease pinned before, for one read; raises if it ended meanwhile."""
        with self._cv:
            if lease.ended:
                raise RemoteError(f"the KV lease of request {lease.request_id!r} ended during "
                                  "the transfer", "expired")
            lease.pins += 1
        try:
            yield lease
        finally:
            self.unpin(lease)
