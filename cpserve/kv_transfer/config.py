"""`--kv-transfer-config`: vLLM's JSON, with the connector cpserve has.

    {"kv_connector": "CpserveConnector", "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
     "kv_ip": "127.0.0.1", "kv_port": 14579, "engine_id": "...",
     "kv_load_failure_policy": "fail" | "recompute",
     "kv_connector_extra_config": {"kv_lease_duration": 480, "kv_transport": "auto", ...}}

A producer (the prefill instance) keeps the KV blocks of a request sent with
`kv_transfer_params: {"do_remote_decode": true}` under a lease until a consumer (the decode
instance) has pulled them, or until the lease runs out. Rank r of an instance serves and pulls
KV on `kv_port + r` of its host (rank 0's port also answers the handshake); `kv_port` 0 takes
any free ports, which the handshake reports.

Every key is checked here, once, at start-up: an unknown connector, role, policy or key stops
the server with a message naming it. vLLM's keys that mean nothing to this connector
(`kv_buffer_device`, `kv_buffer_size`, `kv_rank`, `kv_parallel_size`) are accepted and unused,
as `--trust-remote-code` is.
"""

from __future__ import annotations

import ipaddress
import math
import uuid
from dataclasses import dataclass
from typing import Any

from cpserve.config import ConfigError

CONNECTOR = "CpserveConnector"
ROLES = ("kv_producer", "kv_consumer", "kv_both")
FAILURE_POLICIES = ("fail", "recompute")
TRANSPORTS = ("auto", "tcp")
# vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT: how long a prefill instance holds KV nobody pulls.
DEFAULT_LEASE_S = 480.0
DEFAULT_IO_TIMEOUT_S = 30.0
DEFAULT_KV_PORT = 14579  # vLLM's default kv_port

_UNUSED_VLLM_KEYS = ("kv_buffer_device", "kv_buffer_size", "kv_rank", "kv_parallel_size")
_TOP_KEYS = ("kv_connector", "kv_role", "engine_id", "kv_ip", "kv_port",
             "kv_load_failure_policy", "kv_connector_extra_config", "kv_connector_module_path",
             "enable_permute_local_kv", *_UNUSED_VLLM_KEYS)
_EXTRA_KEYS = {
    "kv_lease_duration": "seconds a prefill instance keeps a request's KV for the decode "
                         f"instance to pull (default {DEFAULT_LEASE_S:g})",
    "kv_transport": "'auto' (CUDA IPC between GPUs of one host, else TCP) or 'tcp'",
    "kv_io_timeout": "seconds a KV connection may stay silent before it counts as lost "
                     f"(default {DEFAULT_IO_TIMEOUT_S:g})",
    "max_send_mb_per_s": "cap on each prefill rank's sending rate over TCP, in MB/s "
                         "(default: none)",
}


@dataclass(frozen=True)
class KVTransferConfig:
    role: str
    engine_id: str
    kv_ip: str = "127.0.0.1"
    kv_port: int = DEFAULT_KV_PORT
    failure_policy: str = "fail"
    lease_s: float = DEFAULT_LEASE_S
    transport: str = "auto"
    io_timeout_s: float = DEFAULT_IO_TIMEOUT_S
    max_send_bytes_per_s: float | None = None

    @property
    def is_producer(self) -> bool:
        return self.role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.role in ("kv_consumer", "kv_both")

    def rank_port(self, rank: int) -> int:
        """The port rank `rank` listens on (0: any free one)."""
        return self.kv_port + rank if self.kv_port else 0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> KVTransferConfig:
        return KVTransferConfig(**data)

    @staticmethod
    def from_json(raw: dict[str, Any]) -> KVTransferConfig:
        """Parse vLLM's `--kv-transfer-config` object; every refusal names the key."""
        flag = "--kv-transfer-config"
        unknown = sorted(set(raw) - set(_TOP_KEYS))
        if unknown:
            raise ConfigError(f"{flag}: unknown key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(_TOP_KEYS)}")
        connector = raw.get("kv_connector")
        if connector != CONNECTOR:
            raise ConfigError(f"{flag}: kv_connector {connector!r} is not supported; cpserve "
                              f"supports {CONNECTOR!r} (vLLM's NixlConnector request protocol, "
                              "so vLLM's disaggregation proxy works with it)")
        if raw.get("kv_connector_module_path") is not None:
            raise ConfigError(f"{flag}: kv_connector_module_path: cpserve loads no connector "
                              f"code; leave it out and use {CONNECTOR!r}")
        if raw.get("enable_permute_local_kv"):
            raise ConfigError(f"{flag}: enable_permute_local_kv: cpserve's KV layout is the "
                              "same on both instances; leave it out")
        role = raw.get("kv_role")
        if role not in ROLES:
            raise ConfigError(f"{flag}: kv_role {role!r} must be one of {', '.join(ROLES)}")
        policy = raw.get("kv_load_failure_policy", "fail")
        if policy not in FAILURE_POLICIES:
            raise ConfigError(f"{flag}: kv_load_failure_policy {policy!r} must be 'fail' or "
                              "'recompute'")
        engine_id = raw.get("engine_id")
        if engine_id is None:
            engine_id = str(uuid.uuid4())
        if not isinstance(engine_id, str | int) or isinstance(engine_id, bool) \
                or not str(engine_id):
            raise ConfigError(f"{flag}: engine_id {engine_id!r} must be a non-empty string")
        kv_ip = raw.get("kv_ip", "127.0.0.1")
        _check_ip(kv_ip)
        kv_port = _port(raw.get("kv_port", DEFAULT_KV_PORT))
        extra = raw.get("kv_connector_extra_config") or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{flag}: kv_connector_extra_config must be a JSON object")
        unknown = sorted(set(extra) - set(_EXTRA_KEYS))
        if unknown:
            known = "; ".join(f"{k}: {why}" for k, why in _EXTRA_KEYS.items())
            raise ConfigError(f"{flag}: kv_connector_extra_config has unknown key(s) "
                              f"{', '.join(unknown)}; {CONNECTOR} knows {known}")
        lease = _positive(extra.get("kv_lease_duration", DEFAULT_LEASE_S), "kv_lease_duration")
        timeout = _positive(extra.get("kv_io_timeout", DEFAULT_IO_TIMEOUT_S), "kv_io_timeout")
        rate = extra.get("max_send_mb_per_s")
        rate = None if rate is None else _positive(rate, "max_send_mb_per_s") * 1e6
        transport = extra.get("kv_transport", "auto")
        if transport not in TRANSPORTS:
            raise ConfigError(f"{flag}: kv_connector_extra_config.kv_transport {transport!r} "
                              "must be 'auto' or 'tcp'")
        return KVTransferConfig(role=role, engine_id=str(engine_id), kv_ip=kv_ip,
                                kv_port=kv_port, failure_policy=policy, lease_s=lease,
                                transport=transport, io_timeout_s=timeout,
                                max_send_bytes_per_s=rate)


def check_kv_transfer(config: KVTransferConfig, nnodes: int, world_size: int) -> None:
    """Rules that need the rest of the engine config."""
    if config.kv_port and config.kv_port + world_size - 1 > 65535:
        raise ConfigError(f"--kv-transfer-config: kv_port {config.kv_port} + {world_size} "
                          "ranks runs past port 65535 (rank r listens on kv_port + r)")
    if nnodes > 1 and ipaddress.ip_address(config.kv_ip).is_loopback:
        raise ConfigError(f"--kv-transfer-config: kv_ip {config.kv_ip} is a loopback address, "
                          f"but the ranks run on --nnodes {nnodes} nodes: give node 0's "
                          "address, which the decode instance connects to")


def _check_ip(kv_ip: Any) -> None:
    try:
        address = ipaddress.ip_address(kv_ip)
    except (TypeError, ValueError):
        raise ConfigError(f"--kv-transfer-config: kv_ip {kv_ip!r} must be an IP address (the "
                          "one the other instance connects to)") from None
    if address.is_unspecified:
        raise ConfigError(f"--kv-transfer-config: kv_ip {kv_ip} listens everywhere but names "
                          "no address the other instance could connect to: give this host's "
                          "address")


def _port(value: Any) -> int:
    try:
        port = int(value)  # vLLM's own examples write it as a string: "30000"
    except (TypeError, ValueError):
        raise ConfigError(f"--kv-transfer-config: kv_port {value!r} must be a port number") \
            from None
    if isinstance(value, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"--kv-transfer-config: kv_port {value!r} must be in [0, 65535] "
                          "(0: any free ports)")
    return port


def _positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or not math.isfinite(value):
        raise ConfigError(f"--kv-transfer-config: kv_connector_extra_config.{key} {value!r} "
                          "must be a positive number")
    return float(value)
