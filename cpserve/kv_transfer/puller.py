"""A decode rank's side: pull the blocks of its shard and heads from the prefill ranks.

Each load runs in a thread of its own while the rank goes on running steps; it writes only
blocks the driver allocated for that request, which no step touches until the driver has seen
every rank finish (the poll in worker.py). For one load, on this rank:

    1. the prefill instance's description (rank 0 of it, "engine"), cached per instance
    2. plan_pulls(prefill layout, this layout, this rank, ...)  -> blocks and heads per source
    3. per source rank, over this rank's one connection to it:
         device path (same host, CUDA): pin, copy GPU to GPU from the mapped cache, unpin
         TCP: "pull", then a frame per layer (or part of one) scattered into the cache

A load ends DONE or with one failure code (below), which the driver turns into the request's
fate (kv_load_failure_policy).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from cpserve.kv_transfer import device_path
from cpserve.kv_transfer.resharding import InstanceLayout, Pull, incompatibility, plan_pulls
from cpserve.kv_transfer.server import FRAME_BYTES
from cpserve.kv_transfer.wire import (
    PROTOCOL_VERSION,
    Channel,
    PeerClosed,
    ProtocolError,
    RemoteError,
    byte_view,
    expect,
    indexable,
)

logger = logging.getLogger(__name__)

PENDING, DONE = 0, 1
# Failure codes, in the order the driver prefers to report them when ranks differ.
UNREACHABLE, LOST, EXPIRED, INCOMPATIBLE, PROTOCOL, CANCELLED = 2, 3, 4, 5, 6, 7
WHY = {
    UNREACHABLE: "the prefill instance could not be reached",
    LOST: "the connection to the prefill instance was lost mid-transfer",
    EXPIRED: "the prefill instance no longer holds the KV (its lease expired or was released)",
    INCOMPATIBLE: "the two instances cannot exchange KV",
    PROTOCOL: "the prefill instance answered outside the KV protocol",
    CANCELLED: "the request was aborted",
}
_CODE_OF = {"expired": EXPIRED, "incompatible": INCOMPATIBLE, "stale": UNREACHABLE,
            "bad_request": PROTOCOL}


class LoadFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RemoteKV:
    """Where a request's prompt KV is, as the prefill instance's kv_transfer_params say."""

    engine_id: str
    instance: str
    host: str
    port: int
    request_id: str
    block_ids: tuple[int, ...]


@dataclass
class Load:
    request_id: str
    blocks: list[int]  # this instance's block table of the request
    first_token: int
    end_token: int
    remote: RemoteKV
    cancel: threading.Event = field(default_factory=threading.Event)
    status: int = PENDING
    error: str = ""
    bytes: int = 0
    ipc_bytes: int = 0  # of which over the device path


@dataclass
class _Link:
    """This rank's connection to one prefill rank."""

    channel: Channel
    info: dict
    lock: threading.Lock = field(default_factory=threading.Lock)
    ipc: list | None = None  # the source rank's caches, mapped (device path)


class Puller:
    def __init__(self, *, rank: int, layout: InstanceLayout, kv_caches: list, kv_format: dict,
                 device: torch.device, io_timeout_s: float, transport: str) -> None:
        self.rank = rank
        self.layout = layout
        self.kv_caches = kv_caches
        self.kv_format = kv_format
        self.device = device
        self.io_timeout_s = io_timeout_s
        self.transport = transport
        self.loads: dict[str, Load] = {}
        self._engines: dict[tuple[str, int], dict] = {}
        self._links: dict[tuple[str, int], _Link] = {}
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, load: Load) -> None:
        self.loads[load.request_id] = load
        threading.Thread(target=self._run, args=(load,), daemon=True,
                         name=f"cpserve-kv-load-{self.rank}").start()

    def cancel(self, request_id: str) -> None:
        load = self.loads.get(request_id)
        if load is not None:
            load.cancel.set()

    def forget(self, request_id: str) -> None:
        self.loads.pop(request_id, None)

    def close(self) -> None:
        for load in list(self.loads.values()):
            load.cancel.set()
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.channel.close()

    # One load -----------------------------------------------------------------------------
    def _run(self, load: Load) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a thread starts on device 0
        try:
            engine = self._engine(load.remote)
            source = InstanceLayout.from_dict(engine["layout"])
            self._check_format(engine, source)
            pulls = plan_pulls(source, self.layout, self.rank, load.first_token, load.end_token,
                               list(load.remote.block_ids), load.blocks)
            for pull in pulls:
                self._pull(load, engine, pull)
            if self._stream is not None:
                self._stream.synchronize()
            load.status = DONE
        except LoadFailed as exc:
            load.status, load.error = exc.code, str(exc)
        except ValueError as exc:  # plan_pulls: tables that do not cover the tokens
            load.status, load.error = PROTOCOL, str(exc)
        except Exception as exc:
            logger.exception("KV load of request %s failed", load.request_id)
            load.status, load.error = PROTOCOL, f"{type(exc).__name__}: {exc}"
        if load.status != DONE:
            logger.warning("KV transfer for request %s failed on rank %d: %s", load.request_id,
                           self.rank, load.error)

    def _engine(self, remote: RemoteKV) -> dict:
        key = (remote.host, remote.port)
        with self._lock:
            engine = self._engines.get(key)
        if engine is None or engine["instance"] != remote.instance:
            try:
                channel = Channel.connect(remote.host, remote.port, self.io_timeout_s)
            except OSError as exc:
                raise LoadFailed(UNREACHABLE, f"{WHY[UNREACHABLE]} at {remote.host}:"
                                              f"{remote.port}: {exc}") from None
            try:
                channel.send({"op": "engine", "version": PROTOCOL_VERSION})
                reply = channel.recv()
            except (OSError, ProtocolError) as exc:
                raise LoadFailed(LOST, f"{WHY[LOST]} (handshake with {remote.host}:"
                                       f"{remote.port}): {exc}") from None
            finally:
                channel.close()
            if not reply.get("ok"):
                raise LoadFailed(PROTOCOL, f"the handshake with {remote.host}:{remote.port} "
                                           f"failed: {reply.get('error')}")
            engine = reply["engine"]
            with self._lock:
                self._engines[key] = engine
        if engine["engine_id"] != remote.engine_id or engine["instance"] != remote.instance:
            raise LoadFailed(UNREACHABLE, f"{remote.host}:{remote.port} is engine "
                                          f"{engine['engine_id']!r}, not the "
                                          f"{remote.engine_id!r} that prefilled the request "
                                          "(it restarted?)")
        return engine

    def _check_format(self, engine: dict, source: InstanceLayout) -> None:
        why = incompatibility(source, self.layout)
        if why is None and engine["kv_format"] != self.kv_format:
            why = (f"the KV caches differ: the prefill instance's {engine['kv_format']}, this "
                   f"one's {self.kv_format} (same model, --dtype, --kv-cache-dtype and MTP "
                   "--speculative-config on both?)")
        if why is not None:
            raise LoadFailed(INCOMPATIBLE, f"{WHY[INCOMPATIBLE]}: {why}")

    def _link(self, engine: dict, src_rank: int) -> _Link:
        key = (engine["instance"], src_rank)
        with self._lock:
            link = self._links.get(key)
        if link is not None:
            return link
        host, port = engine["ranks"][src_rank]
        try:
            channel = Channel.connect(host, port, self.io_timeout_s)
        except OSError as exc:
            raise LoadFailed(UNREACHABLE, f"{WHY[UNREACHABLE]}: prefill rank {src_rank} at "
                                          f"{host}:{port}: {exc}") from None
        want_ipc = self.transport == "auto" and self.device.type == "cuda"
        try:
            channel.send({"op": "hello", "version": PROTOCOL_VERSION,
                          "engine_id": engine["engine_id"], "instance": engine["instance"],
                          "want_ipc": want_ipc})
            reply = channel.recv()
            expect_ok(reply)
        except (OSError, ProtocolError) as exc:
            channel.close()
            raise LoadFailed(LOST, f"{WHY[LOST]}: prefill rank {src_rank}: {exc}") from None
        except RemoteError as exc:
            channel.close()
            raise _remote_failure(exc) from None
        link = _Link(channel, reply["rank"])
        if want_ipc:
            link.ipc = self._map(link.info)
        with self._lock:
            self._links[key] = link
        return link

    def _map(self, info: dict) -> list | None:
        """The source rank's caches through CUDA IPC, when it shares this host and a visible
        GPU; None (TCP) otherwise."""
        if info.get("ipc") is None or info.get("host_id") != device_path.host_id():
            return None
        device = device_path.local_device_of(info.get("gpu") or "")
        if device is None:
            return None
        try:
            return device_path.import_caches(info["ipc"], device)
        except Exception as exc:  # e.g. expandable segments, or IPC refused by the driver
            logger.warning("KV transfer: CUDA IPC mapping of prefill rank %s failed (%s); "
                           "using TCP", info.get("rank"), exc)
            return None

    def _drop_link(self, engine: dict, src_rank: int) -> None:
        with self._lock:
            link = self._links.pop((engine["instance"], src_rank), None)
            self._engines.pop(next((k for k, e in self._engines.items()
                                    if e["instance"] == engine["instance"]), None), None)
        if link is not None:
            link.channel.close()

    def _pull(self, load: Load, engine: dict, pull: Pull) -> None:
        for attempt in range(2):
            link = self._link(engine, pull.src_rank)
            before = load.bytes
            with link.lock:
                try:
                    if link.ipc is not None:
                        self._copy_ipc(load, link, pull)
                    else:
                        self._receive_tcp(load, link, pull)
                    return
                except (OSError, ProtocolError, LoadFailed, RemoteError) as exc:
                    self._drop_link(engine, pull.src_rank)  # its state mid-stream is unknown
                    # A connection kept from an earlier load may have been closed by the
                    # prefill rank since: before any byte came, once more on a new one.
                    if isinstance(exc, PeerClosed) and load.bytes == before and attempt == 0:
                        continue
                    raise _failure(exc, load, pull) from None

    def _receive_tcp(self, load: Load, link: _Link, pull: Pull) -> None:
        channel = link.channel
        channel.send({"op": "pull", "request": load.remote.request_id,
                      "blocks": list(pull.src_blocks), "head": pull.src_head,
                      "heads": pull.num_heads})
        index = torch.tensor(pull.dst_blocks, dtype=torch.long)
        for pair in self.kv_caches:
            shapes = [(c.shape[1], pull.num_heads, c.shape[3]) for c in pair if c is not None]
            per_block = sum(a * b * d for a, b, d in shapes) * pair[0].element_size()
            step = max(1, FRAME_BYTES // per_block)
            for first in range(0, len(index), step):
                if load.cancel.is_set():
                    raise LoadFailed(CANCELLED, WHY[CANCELLED])
                rows = index[first:first + step]
                header = channel.recv()
                expect(header, per_block * len(rows))
                buffer = torch.empty(per_block * len(rows), dtype=torch.uint8,
                                     pin_memory=self.device.type == "cuda")
                channel.recv_into(byte_view(buffer))
                self._scatter(pair, rows, pull, buffer)
                load.bytes += buffer.numel()

    def _scatter(self, pair: tuple, rows: torch.Tensor, pull: Pull, buffer: torch.Tensor) -> None:
        """Write K then V of `rows` blocks (heads of `pull`) from `buffer` into the cache."""
        def write() -> None:
            data = buffer.to(self.device, non_blocking=True)
            offset = 0
            for cache in pair:
                if cache is None:
                    continue
                shape = (len(rows), cache.shape[1], pull.num_heads, cache.shape[3])
                count = shape[0] * shape[1] * shape[2] * shape[3] * cache.element_size()
                target = indexable(cache)
                part = data[offset:offset + count].view(target.dtype).view(shape)
                target[:, :, pull.dst_head:pull.dst_head + pull.num_heads].index_copy_(
                    0, rows.to(self.device), part)
                offset += count

        if self._stream is None:
            write()
            return
        with torch.cuda.stream(self._stream):
            write()
        self._stream.synchronize()  # before `buffer` is reused or freed

    def _copy_ipc(self, load: Load, link: _Link, pull: Pull) -> None:
        channel = link.channel
        channel.send({"op": "pin", "request": load.remote.request_id,
                      "blocks": list(pull.src_blocks)})
        reply = channel.recv()
        expect_ok(reply)
        try:
            src_index = torch.tensor(pull.src_blocks, dtype=torch.long)
            dst_index = torch.tensor(pull.dst_blocks, dtype=torch.long)
            with torch.cuda.stream(self._stream):
                for pair, src_pair in zip(self.kv_caches, link.ipc):
                    for cache, source in zip(pair, src_pair):
                        if cache is None:
                            continue
                        self._copy_blocks(cache, source, src_index, dst_index, pull)
                        copied = (len(dst_index) * cache.shape[1] * pull.num_heads
                                  * cache.shape[3] * cache.element_size())
                        load.bytes += copied
                        load.ipc_bytes += copied
                    if load.cancel.is_set():
                        break
            self._stream.synchronize()
        finally:
            channel.send({"op": "unpin"})
            expect_ok(channel.recv())
        if load.cancel.is_set():
            raise LoadFailed(CANCELLED, WHY[CANCELLED])

    def _copy_blocks(self, cache: torch.Tensor, source: torch.Tensor, src_index: torch.Tensor,
                     dst_index: torch.Tensor, pull: Pull) -> None:
        """GPU to GPU, at most FRAME_BYTES of temporary memory at a time."""
        per_block = cache.shape[1] * pull.num_heads * cache.shape[3] * cache.element_size()
        step = max(1, FRAME_BYTES // per_block)
        heads = slice(pull.src_head, pull.src_head + pull.num_heads)
        source = indexable(source)
        target = indexable(cache)[:, :, pull.dst_head:pull.dst_head + pull.num_heads]
        for first in range(0, len(src_index), step):
            rows = src_index[first:first + step].to(source.device, non_blocking=True)
            part = source.index_select(0, rows)[:, :, heads].to(cache.device, non_blocking=True)
            target.index_copy_(0, dst_index[first:first + step].to(cache.device), part)


def _failure(exc: BaseException, load: Load, pull: Pull) -> LoadFailed:
    if isinstance(exc, LoadFailed):
        return exc
    if isinstance(exc, RemoteError):
        return _remote_failure(exc)
    if load.cancel.is_set():
        return LoadFailed(CANCELLED, WHY[CANCELLED])
    return LoadFailed(LOST, f"{WHY[LOST]} (prefill rank {pull.src_rank}): "
                            f"{type(exc).__name__}: {exc}")


def _remote_failure(exc: RemoteError) -> LoadFailed:
    code = _CODE_OF.get(exc.code, PROTOCOL)
    return LoadFailed(code, f"{WHY[code]}: {exc}")


def expect_ok(reply: dict) -> None:
    if not reply.get("ok"):
        raise RemoteError(str(reply.get("error", "the prefill rank refused")),
                          str(reply.get("code", "refused")))
