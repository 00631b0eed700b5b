"""The driver's side of KV transfer, in the scheduler's terms.

Prefill instance (producer): a request sent with `do_remote_decode` finishes as usual, but its
blocks go under a lease instead of back to the pool, and its output carries the
kv_transfer_params a decode instance needs. The lease ends when the decode instance says it is
done ("release", on rank 0's KV server) or after `kv_lease_duration` seconds.

Decode instance (consumer): a request sent with `do_remote_prefill` is admitted by allocating
blocks for its prompt (after any local prefix-cache hit), then waits while every rank pulls
its share (status WAITING_FOR_REMOTE_KV). Once every rank has finished:

    all done       -> prompt[:-1] counts as computed; back to the head of the waiting queue,
                      where the next step computes the last prompt token and samples
    a rank failed  -> kv_load_failure_policy: "recompute" prefills it here, "fail" ends it
                      with an error; either way its blocks are freed only now, when no rank
                      writes them any more (an aborted load waits the same way)

Either way the prefill instance is told to release its lease.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from cpserve.kv.manager import KVCacheManager
from cpserve.kv_transfer.config import KVTransferConfig
from cpserve.kv_transfer.params import RemotePrefill, prefill_reply, prompt_hash
from cpserve.kv_transfer.puller import DONE, INCOMPATIBLE, PENDING, RemoteKV
from cpserve.kv_transfer.stats import KVTransferStats
from cpserve.kv_transfer.wire import Channel
from cpserve.kv_transfer.worker import KVTransferWorker
from cpserve.request import Request, RequestStatus

logger = logging.getLogger(__name__)

@dataclass
class _Loading:
    request: Request
    remote: RemotePrefill
    first_token: int
    end_token: int
    started: float
    aborted: bool = False


class KVTransferScheduler:
    def __init__(self, config: KVTransferConfig, kv: KVCacheManager,
                 worker: KVTransferWorker) -> None:
        self.config = config
        self.kv = kv
        self.worker = worker
        host, port = worker.address
        layout = worker.layout
        self._reply = dict(engine_id=config.engine_id, instance=worker.instance, host=host,
                           port=port, tp=layout.tp,
                           layout={"tp": layout.tp, "pcp": layout.pcp, "dcp": layout.dcp,
                                   "interleave": layout.interleave,
                                   "block_size": layout.block_size})
        self.leases: dict[str, float] = {}  # request id -> when it expires (monotonic)
        self._next_expiry = math.inf  # read by the KV server's thread
        self.loads: dict[str, _Loading] = {}
        self._settled: dict[str, tuple[int, int, int, str]] = {}  # loads that needed no ranks
        self._ops: dict[str, list] = _no_ops()
        self._releases: deque[tuple[str, int]] = deque()  # from the KV server's threads
        self.wakeup: Callable[[], None] | None = None  # the engine loop's, if it sleeps
        self.stats = KVTransferStats(config.role)
        self._sender = _ReleaseSender(min(config.io_timeout_s, 5.0)) \
            if config.is_consumer else None
        if worker.server is not None:
            worker.server.on_release = self._on_release
            worker.server.on_tick = self._on_tick

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()

    # Other threads ---------------------------------------------------------------------------
    def _on_release(self, request_id: str, nbytes: int) -> None:
        self._releases.append((request_id, nbytes))
        self._wake()

    def _on_tick(self) -> None:
        if self._next_expiry <= time.monotonic():
            self._wake()

    def _wake(self) -> None:
        if self.wakeup is not None:
            self.wakeup()

    # The scheduler's calls -------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.loads or self._releases or any(self._ops.values())
                    or self._next_expiry <= time.monotonic())

    def begin_step(self) -> tuple[list[Request], list[Request]]:
        """Settle what finished since the last step: (requests back to the head of the waiting
        queue, requests failed)."""
        now = time.monotonic()
        self._end_leases(now)
        results = {**self._settled, **self.worker.take_poll_result()}
        self._settled = {}
        ready: list[Request] = []
        failed: list[Request] = []
        for request_id, (status, nbytes, ipc_bytes, why) in results.items():
            if status == PENDING or request_id not in self.loads:
                continue
            loading = self.loads.pop(request_id)
            self._ops["forget"].append(request_id)
            self.stats.bytes_received_ipc_total += ipc_bytes
            self._settle(loading, status, nbytes, why, now, ready, failed)
        self.stats.loads_active = len(self.loads)
        return ready, failed

    def start_load(self, request: Request) -> bool:
        """Admit a waiting request whose prompt KV is elsewhere: blocks for its prompt, then a
        load on every rank. False (nothing changed) if the blocks are not there yet."""
        size = self.kv.layout.virtual_block_size
        cached = self.kv.find_cached_prefix(request)
        num_cached = len(cached) * size
        if self.kv.allocate(request, request.num_tokens - num_cached, cached) is None:
            return False
        self.kv.record_prefix_lookup(request.num_tokens, num_cached)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.time()
            request.num_cached_tokens = num_cached
        remote, rid = request.remote_prefill, request.request_id
        end = request.num_tokens - 1  # the last prompt token is computed here, for its logits
        self.loads[rid] = _Loading(request, remote, num_cached, end, time.monotonic())
        self.stats.loads_active = len(self.loads)
        mismatch = _prompt_mismatch(request, remote)
        if mismatch is not None:
            self._settled[rid] = (INCOMPATIBLE, 0, 0, mismatch)
        elif end <= num_cached:  # nothing to pull: a one-token prompt, or all cached here
            self._settled[rid] = (DONE, 0, 0, "")
        else:
            spec = {**asdict(remote.kv), "block_ids": list(remote.kv.block_ids)}
            self._ops["loads"].append([rid, self.kv.block_table(rid), num_cached, end, spec])
        return True

    def on_finish(self, request: Request, status: RequestStatus) -> bool:
        """A request ends: True if its blocks stay held (a lease for a decode instance, or a
        load the ranks are still writing, freed once they stop)."""
        rid = request.request_id
        loading = self.loads.get(rid)
        if loading is not None:
            if not loading.aborted:
                loading.aborted = True
                if rid not in self._settled:
                    self._ops["cancel"].append(rid)
            return True
        if not (request.remote_decode and self.config.is_producer
                and status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)):
            return False
        table = self.kv.lease(request)
        expiry = time.monotonic() + self.config.lease_s
        self.leases[rid] = expiry
        self._next_expiry = min(self._next_expiry, expiry)
        self._ops["leases"].append([rid, table])
        request.kv_transfer_output = prefill_reply(
            **self._reply, request_id=rid, block_ids=table,
            prompt_token_ids=request.prompt_token_ids)
        self.stats.leases_granted_total += 1
        self.stats.leases_active = len(self.leases)
        return True

    def take_ops(self) -> dict | None:
        """What the ranks must hear with the next plan; loads in flight are polled."""
        ops = {k: v for k, v in self._ops.items() if v}
        self._ops = _no_ops()
        polled = [rid for rid in self.loads if rid not in self._settled]
        if polled:
            ops["poll"] = polled
        return ops or None

    def snapshot(self) -> KVTransferStats:
        return replace(self.stats, load_seconds_counts=list(self.stats.load_seconds_counts))

    def status(self) -> dict:
        return {"role": self.config.role, "engine_id": self.config.engine_id,
                "instance": self.worker.instance, "leases": len(self.leases),
                "loads": len(self.loads), "stats": asdict(self.snapshot())}

    # Inside -----------------------------------------------------------------------------------
    def _end_leases(self, now: float) -> None:
        while self._releases:
            request_id, nbytes = self._releases.popleft()
            if request_id in self.leases:
                self._end_lease(request_id)
                self.stats.leases_released_total += 1
                self.stats.bytes_sent_total += nbytes
        if self._next_expiry <= now:
            for request_id in [r for r, t in self.leases.items() if t <= now]:
                logger.warning("KV lease of request %s expired after %g s: no decode instance "
                               "pulled it", request_id, self.config.lease_s)
                self._end_lease(request_id)
                self.stats.leases_expired_total += 1
            self._next_expiry = min(self.leases.values(), default=math.inf)
        self.stats.leases_active = len(self.leases)

    def _end_lease(self, request_id: str) -> None:
        del self.leases[request_id]
        self.kv.release_lease(request_id)
        self._ops["lease_ends"].append(request_id)

    def _settle(self, loading: _Loading, status: int, nbytes: int, why: str, now: float,
                ready: list[Request], failed: list[Request]) -> None:
        request = loading.request
        self._sender.release(loading.remote.kv, nbytes)
        self.stats.bytes_received_total += nbytes
        if loading.aborted:
            self.kv.free(request)
            return
        request.remote_prefill = None
        request.status = RequestStatus.WAITING
        if status == DONE:
            request.num_computed_tokens = loading.end_token
            self.kv.cache_full_blocks(request)
            self.stats.loads_done_total += 1
            self.stats.observe_load(now - loading.started)
            ready.append(request)
            return
        self.kv.free(request)
        if self.config.failure_policy == "recompute":
            logger.warning("request %s: %s; computing its prompt here "
                           "(kv_load_failure_policy recompute)", request.request_id, why)
            request.num_computed_tokens = 0
            self.stats.loads_recomputed_total += 1
            ready.append(request)
            return
        request.error = f"KV transfer from the prefill instance failed: {why}"
        self.stats.loads_failed_total += 1
        failed.append(request)


def _no_ops() -> dict[str, list]:
    return {"leases": [], "lease_ends": [], "loads": [], "cancel": [], "forget": []}


def _prompt_mismatch(request: Request, remote: RemotePrefill) -> str | None:
    if (remote.num_tokens == request.num_prompt_tokens
            and remote.prompt_hash == prompt_hash(request.prompt_token_ids)):
        return None
    return (f"the prefill instance computed another prompt ({remote.num_tokens} tokens) than "
            f"this instance was given ({request.num_prompt_tokens} tokens): do both serve the "
            "same model, tokenizer and chat template?")


class _ReleaseSender:
    """Tells prefill instances their leases can go, from a thread of its own (best effort: a
    lease nobody releases expires)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._queue: queue.Queue[tuple[RemoteKV, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="cpserve-kv-release")
        self._thread.start()

    def release(self, remote: RemoteKV, nbytes: int) -> None:
        self._queue.put((remote, nbytes))

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            remote, nbytes = item
            try:
                channel = Channel.connect(remote.host, remote.port, self.timeout_s)
                try:
                    channel.send({"op": "release", "request": remote.request_id,
                                  "bytes": nbytes})
                    channel.recv()
                finally:
                    channel.close()
            except OSError as exc:
                logger.info("could not release the KV lease of %s at %s:%d (%s); it expires",
                            remote.request_id, remote.host, remote.port, exc)
