"""The KV transfer part of one rank: its server (prefill side), its loads (decode side), and
what the driver's step plans say about them.

A step plan may carry `kv`, applied on every rank before the step computes anything:

    {"leases": [[request_id, block_ids]], "lease_ends": [request_id],      prefill side
     "loads": [[request_id, block_ids, first_token, end_token, remote]],   decode side
     "cancel": [request_id], "forget": [request_id],
     "poll": [request_id]}

`poll` is a collective: every rank reports each load's status and bytes to the driver
(a gather over the CPU group), which settles a load once every rank has finished it.
"""

from __future__ import annotations

import socket
import uuid
from typing import TYPE_CHECKING

import msgpack
import torch
import torch.distributed as dist

from cpserve.kv_transfer import device_path
from cpserve.kv_transfer.leases import RankLeases
from cpserve.kv_transfer.puller import DONE, PENDING, PROTOCOL, WHY, Load, Puller, RemoteKV
from cpserve.kv_transfer.resharding import InstanceLayout
from cpserve.kv_transfer.server import KVServer
from cpserve.kv_transfer.wire import PROTOCOL_VERSION

if TYPE_CHECKING:
    from cpserve.engine.model_runner import ModelRunner


def instance_layout(config) -> InstanceLayout:
    par, model = config.parallel, config.model
    return InstanceLayout(par.tp, par.pcp, par.dcp, par.interleave, config.cache.block_size,
                          model.num_kv_heads, model.is_mla)


class KVTransferWorker:
    def __init__(self, runner: ModelRunner) -> None:
        config, groups = runner.config, runner.groups
        kvt = config.kv_transfer
        self.rank, self.groups, self.config = groups.rank, groups, kvt
        self.layout = instance_layout(config)
        spec = runner.kv_spec
        # MTP modules' caches (--speculative-config deepseek_mtp) travel with the main
        # ones, so both instances must have them or neither.
        self.kv_format = {"num_layers": config.model.num_layers,
                          "mtp_layers": runner.num_cache_layers - config.model.num_layers,
                          "k_dim": spec.k_dim,
                          "v_dim": spec.v_dim, "dtype": str(spec.dtype).removeprefix("torch."),
                          # An FP8 cache's per-layer scales, as lists (what msgpack returns).
                          "scales": (None if runner.kv_scales is None
                                     else [list(pair) for pair in runner.kv_scales])}
        heads = self.layout.heads(self.rank)
        self.leases = RankLeases(runner.device) if kvt.is_producer else None
        self.server = None
        host = _listen_host(kvt.kv_ip, config.launch, self.rank, groups.world_size)
        if kvt.is_producer:
            rank_info = {"rank": self.rank, "engine_id": kvt.engine_id, "instance": "",
                         "heads": [heads.start, len(heads)], "num_blocks": runner.num_blocks,
                         "host_id": device_path.host_id(),
                         "gpu": device_path.gpu_uuid(runner.device)}
            self.server = KVServer(host=host, port=kvt.rank_port(self.rank), rank=self.rank,
                                   kv_caches=runner.kv_caches, leases=self.leases,
                                   rank_info=rank_info, io_timeout_s=kvt.io_timeout_s,
                                   max_bytes_per_s=kvt.max_send_bytes_per_s,
                                   device=runner.device)
        self.puller = Puller(rank=self.rank, layout=self.layout, kv_caches=runner.kv_caches,
                             kv_format=self.kv_format, device=runner.device,
                             io_timeout_s=kvt.io_timeout_s,
                             transport=kvt.transport) if kvt.is_consumer else None
        mine = {"host": host, "port": self.server.port if self.server else 0,
                "instance": uuid.uuid4().hex}
        everyone = _all_gather_msgpack(mine, groups)
        self.instance = everyone[0]["instance"]  # rank 0's names this start of the instance
        self.ranks = [[e["host"], e["port"]] for e in everyone]
        if self.server is not None:
            self.server.rank_info["instance"] = self.instance
            if self.rank == 0:
                self.server.engine_info = {
                    "engine_id": kvt.engine_id, "instance": self.instance,
                    "version": PROTOCOL_VERSION, "layout": self.layout.to_dict(),
                    "kv_format": self.kv_format, "ranks": self.ranks}
        self.poll_result: dict[str, tuple[int, int, int, str]] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where decode instances reach this instance (rank 0's server)."""
        host, port = self.ranks[0]
        return host, port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.leases is not None:
            self.leases.end_all()
        if self.puller is not None:
            self.puller.close()

    def apply(self, ops: dict) -> None:
        for request_id, blocks in ops.get("leases", ()):
            self.leases.add(request_id, blocks)
        for request_id in ops.get("lease_ends", ()):
            self.leases.end(request_id, self.config.io_timeout_s)
        for request_id, blocks, first, end, remote in ops.get("loads", ()):
            remote = RemoteKV(**{**remote, "block_ids": tuple(remote["block_ids"])})
            self.puller.start(Load(request_id, list(blocks), first, end, remote))
        for request_id in ops.get("cancel", ()):
            self.puller.cancel(request_id)
        for request_id in ops.get("forget", ()):
            self.puller.forget(request_id)
        if ops.get("poll"):
            self.poll_result = self._poll(ops["poll"])

    def take_poll_result(self) -> dict[str, tuple[int, int, int, str]]:
        result, self.poll_result = self.poll_result, None
        return result or {}

    def _poll(self, request_ids: list[str]) -> dict[str, tuple[int, int, int, str]] | None:
        """(status, bytes received over all ranks, of which over CUDA IPC, why it failed) of
        each load, on the driver:
        pending while any rank is still at it; otherwise done, or the failure of the first
        rank that failed."""
        loads = [self.puller.loads.get(rid) for rid in request_ids]
        local = torch.tensor([[load.status, load.bytes, load.ipc_bytes] if load
                              else [PROTOCOL, 0, 0] for load in loads], dtype=torch.long)
        world = self.groups.world_size
        if world == 1:
            per_rank = [local]
        else:
            per_rank = [torch.empty_like(local) for _ in range(world)] if self.rank == 0 else None
            dist.gather(local, per_rank, dst=0, group=self.groups.cpu_group)
            if self.rank != 0:
                return None
        statuses = torch.stack([p[:, 0] for p in per_rank])  # [ranks, loads]
        received = torch.stack([p[:, 1:] for p in per_rank]).sum(0)  # [loads, (all, ipc)]
        result = {}
        for i, request_id in enumerate(request_ids):
            column = statuses[:, i].tolist()
            moved = (int(received[i, 0]), int(received[i, 1]))
            if PENDING in column:
                result[request_id] = (PENDING, *moved, "")
                continue
            failed = [(rank, code) for rank, code in enumerate(column) if code != DONE]
            if not failed:
                result[request_id] = (DONE, *moved, "")
                continue
            rank, code = failed[0]
            mine = loads[i].error if rank == 0 and loads[i] is not None else ""
            message = mine or f"{WHY[code]} (decode rank {rank}; its log says more)"
            result[request_id] = (code, *moved, message)
        return result


def _all_gather_msgpack(value: dict, groups) -> list[dict]:
    """Every rank's `value`, in rank order, on every rank (msgpack over the CPU group)."""
    data = msgpack.packb(value, use_bin_type=True)
    if groups.world_size == 1:
        return [value]
    size = torch.tensor([len(data)])
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(groups.world_size)]
    dist.all_gather(sizes, size, group=groups.cpu_group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    parts = [torch.empty_like(padded) for _ in range(groups.world_size)]
    dist.all_gather(parts, padded, group=groups.cpu_group)
    return [msgpack.unpackb(p[:int(s.item())].numpy().tobytes(), raw=False)
            for p, s in zip(parts, sizes)]


def _listen_host(kv_ip: str, launch, rank: int, world_size: int) -> str:
    """Ranks on node 0 listen on kv_ip; ranks of other nodes on their address towards node 0
    (the interface their process group uses), which the handshake reports."""
    if launch.nnodes == 1 or rank < world_size // launch.nnodes:
        return kv_ip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((launch.master_addr, launch.master_port))  # UDP: sends nothing
        return probe.getsockname()[0]
