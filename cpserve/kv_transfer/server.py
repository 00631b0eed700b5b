"""A prefill rank's KV server: decode ranks connect here and read leased blocks.

Every rank of a producer listens on `kv_port + rank`; one connection per (this rank, decode
rank) pair, kept open across requests. Requests on a connection, each a frame (wire.py):

    {"op": "engine"}                    rank 0: the instance (layout, KV format, rank addresses)
    {"op": "release", "request", ...}   rank 0: a decode instance is done with a lease
    {"op": "hello", "engine_id", ...}   this rank's part of the KV (heads, blocks, GPU, host)
    {"op": "pull", "request", "blocks", "head", "heads"}
        -> per layer, frames of at most FRAME_BYTES: K then V of the blocks, heads
           [head, head + heads) of this rank's, in the order asked for
    {"op": "pin", "request", "blocks"} / {"op": "unpin"}
        the device path: the decode rank copies from the mapped cache between the two

Nothing here writes the cache; a reader pins its lease while it reads (leases.py).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from cpserve.kv_transfer import device_path
from cpserve.kv_transfer.leases import Lease, RankLeases
from cpserve.kv_transfer.wire import (
    PROTOCOL_VERSION,
    Channel,
    ProtocolError,
    RemoteError,
    byte_view,
    indexable,
)

logger = logging.getLogger(__name__)

FRAME_BYTES = 32 * 2**20  # K+V bytes of one frame: bounds the gather's temporary memory
MAX_CONNECTIONS = 256


class KVServer:
    def __init__(self, *, host: str, port: int, rank: int, kv_caches: list, leases: RankLeases,
                 rank_info: dict, io_timeout_s: float, max_bytes_per_s: float | None,
                 device: torch.device) -> None:
        self.rank = rank
        self.kv_caches = kv_caches
        self.leases = leases
        self.rank_info = rank_info
        self.io_timeout_s = io_timeout_s
        self.max_bytes_per_s = max_bytes_per_s
        self.device = device
        self.engine_info: dict | None = None  # rank 0, once every rank's address is known
        self.on_release: Callable[[str, int], None] | None = None  # rank 0: the driver's
        self.on_tick: Callable[[], None] | None = None  # about once a second
        self._ipc: list | None = None
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._stop = threading.Event()
        self._open = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise RuntimeError(f"KV transfer: rank {rank} cannot listen on {host}:{port} "
                               f"(--kv-transfer-config kv_ip / kv_port; rank r uses kv_port + "
                               f"r, 0 picks free ports): {exc}") from None
        self._sock.listen(64)
        self._sock.settimeout(1.0)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"cpserve-kv-server-{rank}")
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    # Connections ------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if self.on_tick is not None:
                try:
                    self.on_tick()
                except Exception:
                    logger.exception("KV server tick failed")
            try:
                sock, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._open.acquire(blocking=False):
                sock.close()
                logger.warning("KV server rank %d: refused %s, %d connections open", self.rank,
                               peer, MAX_CONNECTIONS)
                continue
            threading.Thread(target=self._serve, args=(Channel(sock, self.io_timeout_s), peer),
                             daemon=True, name=f"cpserve-kv-conn-{self.rank}").start()

    def _serve(self, channel: Channel, peer: Any) -> None:
        pinned: list[Lease] = []  # device path: leases this peer holds pinned
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a thread starts on device 0
        try:
            while not self._stop.is_set():
                try:
                    header = channel.recv()
                except TimeoutError:
                    continue  # an idle connection stays open
                op = header.get("op")
                try:
                    self._dispatch(op, header, channel, pinned)
                except RemoteError as exc:
                    channel.send({"ok": False, "code": exc.code, "error": str(exc)})
        except (ConnectionError, OSError, ProtocolError) as exc:
            logger.debug("KV server rank %d: %s left: %s", self.rank, peer, exc)
        except Exception:
            logger.exception("KV server rank %d: connection from %s failed", self.rank, peer)
        finally:
            for lease in pinned:
                self.leases.unpin(lease)
            channel.close()
            self._open.release()

    def _dispatch(self, op: Any, header: dict, channel: Channel, pinned: list[Lease]) -> None:
        if op == "engine":
            if self.engine_info is None:
                raise RemoteError("this rank does not answer for the instance", "bad_request")
            channel.send({"ok": True, "engine": self.engine_info})
        elif op == "release":
            if self.on_release is None:
                raise RemoteError("this rank does not hold leases' fate", "bad_request")
            self.on_release(str(header.get("request")), int(header.get("bytes") or 0))
            channel.send({"ok": True})
        elif op == "hello":
            self._hello(header, channel)
        elif op == "pull":
            self._pull(header, channel)
        elif op == "pin":
            lease = self._pin(header)
            pinned.append(lease)
            channel.send({"ok": True})
        elif op == "unpin":
            if pinned:
                self.leases.unpin(pinned.pop())
            channel.send({"ok": True})
        else:
            raise ProtocolError(f"unknown KV op {op!r}")

    def _hello(self, header: dict, channel: Channel) -> None:
        if header.get("version") != PROTOCOL_VERSION:
            raise RemoteError(f"KV protocol version {header.get('version')} is not this "
                              f"instance's ({PROTOCOL_VERSION}): run the same cpserve release "
                              "on both", "incompatible")
        for key in ("engine_id", "instance"):
            if header.get(key) != self.rank_info[key]:
                raise RemoteError(f"this is {key} {self.rank_info[key]!r}, not "
                                  f"{header.get(key)!r} (the instance restarted?)", "stale")
        info = dict(self.rank_info)
        if header.get("want_ipc") and self.device.type == "cuda":
            if self._ipc is None:
                self._ipc = device_path.export_caches(self.kv_caches)
            info["ipc"] = self._ipc
        channel.send({"ok": True, "rank": info})

    def _checked(self, header: dict) -> tuple[str, list[int], int, int]:
        request_id = header.get("request")
        blocks = header.get("blocks")
        head, heads = header.get("head"), header.get("heads")
        num_blocks, my_heads = self.rank_info["num_blocks"], self.rank_info["heads"][1]
        if not isinstance(request_id, str) or not isinstance(blocks, list) or not all(
                isinstance(b, int) and 0 <= b < num_blocks for b in blocks):
            raise RemoteError("a KV request needs a request id and block ids", "bad_request")
        if not isinstance(head, int) or not isinstance(heads, int) or not (
                0 <= head and 0 < heads and head + heads <= my_heads):
            raise RemoteError(f"heads [{head}, {head}+{heads}) are not within this rank's "
                              f"{my_heads}", "bad_request")
        return request_id, blocks, head, heads

    def _pin(self, header: dict) -> Lease:
        request_id, blocks, _, _ = self._checked({**header, "head": 0, "heads": 1})
        return self.leases.pin(request_id, blocks, self.io_timeout_s)

    def _pull(self, header: dict, channel: Channel) -> None:
        request_id, blocks, head, heads = self._checked(header)
        lease = self.leases.pin(request_id, blocks, self.io_timeout_s)
        self.leases.unpin(lease)
        index = torch.tensor(blocks, dtype=torch.long)
        started, sent = time.monotonic(), 0
        for layer, pair in enumerate(self.kv_caches):
            per_block = sum(_block_bytes(c, heads) for c in pair if c is not None)
            step = max(1, FRAME_BYTES // per_block)
            for first in range(0, len(blocks), step):
                rows = index[first:first + step]
                with self.leases.reading(lease):
                    payload = self._gather(pair, rows, head, heads)
                channel.send({"ok": True, "layer": layer, "first": first}, byte_view(payload))
                sent += payload.numel()
                self._pace(started, sent)

    def _gather(self, pair: tuple, rows: torch.Tensor, head: int, heads: int) -> torch.Tensor:
        """K then V of `rows`, heads [head, head + heads), as one flat CPU byte tensor."""
        def flat() -> torch.Tensor:
            parts = [indexable(c).index_select(0, rows.to(c.device))[:, :, head:head + heads]
                     for c in pair if c is not None]
            return torch.cat([p.reshape(-1).view(torch.uint8) for p in parts])

        if self._stream is None:
            return flat()
        # A stream of its own: the compute stream runs the next steps meanwhile.
        with torch.cuda.stream(self._stream):
            gathered = flat()
            host = torch.empty(gathered.numel(), dtype=torch.uint8, pin_memory=True)
            host.copy_(gathered, non_blocking=True)
        self._stream.synchronize()
        return host

    def _pace(self, started: float, sent: int) -> None:
        """Keep under max_send_mb_per_s (--kv-transfer-config), if set."""
        if self.max_bytes_per_s:
            ahead = sent / self.max_bytes_per_s - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


def _block_bytes(cache: torch.Tensor, heads: int) -> int:
    """Bytes of one block of `cache` [blocks, B, H, D] restricted to `heads` heads."""
    return cache.shape[1] * heads * cache.shape[3] * cache.element_size()
