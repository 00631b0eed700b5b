"""Frames on a KV connection: a msgpack header, then raw bytes (never pickle).

    | u32 big-endian: header length | msgpack map (the header) | payload: header["nbytes"] |

The header says what the payload is; the reader knows beforehand how many bytes it may take
(a block list it asked for, the size of a layer), so every read is bounded: a header longer
than MAX_HEADER_BYTES or a payload of another size than expected ends the connection.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack
import torch

MAX_HEADER_BYTES = 16 * 2**20  # a 1M-token block list fits many times over
PROTOCOL_VERSION = 1
_LENGTH = struct.Struct(">I")


class ProtocolError(ConnectionError):
    """The peer sent something this side did not ask for (or not in this protocol)."""


class PeerClosed(ConnectionError):
    """The peer closed the connection between two frames."""


class Channel:
    """One TCP connection carrying frames, with a timeout on every blocking call."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock = sock
        sock.settimeout(timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def connect(host: str, port: int, timeout_s: float) -> Channel:
        return Channel(socket.create_connection((host, port), timeout=timeout_s), timeout_s)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, header: dict[str, Any], payload: memoryview | bytes | None = None) -> None:
        if payload is not None:
            header = {**header, "nbytes": len(payload)}
        data = msgpack.packb(header, use_bin_type=True)
        self.sock.sendall(_LENGTH.pack(len(data)) + data)
        if payload is not None and len(payload):
            self.sock.sendall(payload)

    def recv(self) -> dict[str, Any]:
        first = self.sock.recv(_LENGTH.size)
        if not first:
            raise PeerClosed("the peer closed the KV connection")
        (length,) = _LENGTH.unpack(first + self._exact(_LENGTH.size - len(first)))
        if length > MAX_HEADER_BYTES:
            raise ProtocolError(f"a KV frame header of {length} bytes (at most "
                                f"{MAX_HEADER_BYTES})")
        try:
            header = msgpack.unpackb(self._exact(length), raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"a KV frame header that is not msgpack: {exc}") from None
        if not isinstance(header, dict):
            raise ProtocolError("a KV frame header that is not a map")
        return header

    def recv_into(self, buffer: memoryview) -> None:
        """Fill `buffer` (bytes) from the connection."""
        view, got = buffer.cast("B"), 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError("the KV connection closed mid-transfer")
            got += n

    def _exact(self, n: int) -> bytes:
        buffer = bytearray(n)
        self.recv_into(memoryview(buffer))
        return bytes(buffer)


def expect(header: dict[str, Any], nbytes: int) -> None:
    """Check that a reply carries a payload of exactly `nbytes`, or raise what it says."""
    if not header.get("ok", False):
        raise RemoteError(str(header.get("error", "the peer refused")),
                          str(header.get("code", "refused")))
    if header.get("nbytes") != nbytes:
        raise ProtocolError(f"expected {nbytes} bytes of KV, the peer announced "
                            f"{header.get('nbytes')}")


class RemoteError(RuntimeError):
    """The peer answered with an error (`code`: a short word the caller can act on)."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (any dtype, bf16 and fp8 too)."""
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


def indexable(cache: torch.Tensor) -> torch.Tensor:
    """`cache` as something index_select / index_copy_ take: an FP8 cache's bytes (torch has
    no such kernels for float8 on every device); other dtypes as they are."""
    return cache.view(torch.uint8) if cache.element_size() == 1 else cache
