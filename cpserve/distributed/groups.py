"""Process groups of one rank, built from the layout in DESIGN.md.

    rank     = pcp_rank * tp + tp_rank
    dcp_rank = tp_rank % dcp                 # DCP groups: runs of dcp consecutive TP ranks
    cp_rank  = pcp_rank * dcp + dcp_rank     # which of the C = pcp * dcp KV shards it holds

Example tp=2, pcp=2, dcp=2 (world 4):

    rank  pcp_rank  tp_rank  dcp_rank  cp_rank   tp group   pcp group   dcp group   cp group
     0       0         0        0         0       {0,1}      {0,2}       {0,1}     {0,1,2,3}
     1       0         1        1         1       {0,1}      {1,3}       {0,1}     {0,1,2,3}
     2       1         0        0         2       {2,3}      {0,2}       {2,3}     {0,1,2,3}
     3       1         1        1         3       {2,3}      {1,3}       {2,3}     {0,1,2,3}

The cp group of a rank spans the C ranks holding shards of the same KV heads: its own DCP
group in every PCP rank. The ep group spans all ranks (expert parallelism: each holds whole
experts, in global rank order). Groups of size 1 are None, and the collectives below skip them.
Every rank builds every group, in the same order, as torch.distributed requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpserve.config import ParallelConfig

Group = dist.ProcessGroup | None


@dataclass(frozen=True)
class ParallelGroups:
    rank: int
    tp: int
    pcp: int
    dcp: int
    tp_group: Group = None
    pcp_group: Group = None
    dcp_group: Group = None
    cp_group: Group = None
    ep_group: Group = None  # all ranks, on the device's backend (expert parallelism)
    world_group: Group = None  # all ranks, on the device's backend (the same group as ep)
    cpu_group: Group = None  # gloo group of all ranks, for step plans
    # Whole experts per rank (rank r: the r-th share), not TP slices of all. A setting of the
    # engine, not of the pool: the model runner sets it on the groups it gives the model.
    expert_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pcp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pcp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dcp_rank(self) -> int:
        return self.tp_rank % self.dcp

    @property
    def cp_rank(self) -> int:
        return self.pcp_rank * self.dcp + self.dcp_rank

    @property
    def num_kv_shards(self) -> int:
        return self.pcp * self.dcp

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"rank {self.rank}: tp_rank {self.tp_rank}/{self.tp}, pcp_rank {self.pcp_rank}/"
                f"{self.pcp}, dcp_rank {self.dcp_rank}/{self.dcp}, cp_rank {self.cp_rank}/"
                f"{self.num_kv_shards}")


def layout_report(parallel: ParallelConfig, num_blocks: int, block_size: int) -> str:
    """The start-up table: each rank's place in the layout and the KV capacity in tokens."""
    lines = [f"cpserve layout: tp={parallel.tp} pcp={parallel.pcp} dcp={parallel.dcp} "
             f"({parallel.world_size} ranks, {parallel.num_kv_shards} KV shards per request, "
             f"interleave {parallel.interleave})",
             "  rank  tp_rank  pcp_rank  dcp_rank  cp_rank"]
    for rank in range(parallel.world_size):
        g = ParallelGroups(rank=rank, tp=parallel.tp, pcp=parallel.pcp, dcp=parallel.dcp)
        lines.append(f"  {rank:>4}  {g.tp_rank:>7}  {g.pcp_rank:>8}  {g.dcp_rank:>8}  {g.cp_rank:>7}")
    per_rank = num_blocks * block_size
    lines.append(f"  KV cache: {num_blocks} blocks of {block_size} tokens per rank = {per_rank} "
                 f"tokens per rank; {per_rank * parallel.num_kv_shards} tokens in total "
                 f"(one request's KV spread over {parallel.num_kv_shards} shards)")
    return "\n".join(lines)


def single_process_groups() -> ParallelGroups:
    return ParallelGroups(rank=0, tp=1, pcp=1, dcp=1)


def group_rank_lists(parallel: ParallelConfig) -> dict[str, list[list[int]]]:
    """Every group of each kind, as lists of global ranks (the table in the docstring)."""
    tp, pcp, dcp = parallel.tp, parallel.pcp, parallel.dcp
    return {
        "tp": [[p * tp + t for t in range(tp)] for p in range(pcp)],
        "pcp": [[p * tp + t for p in range(pcp)] for t in range(tp)],
        "dcp": [[p * tp + g * dcp + d for d in range(dcp)]
                for p in range(pcp) for g in range(tp // dcp)],
        "cp": [[p * tp + g * dcp + d for p in range(pcp) for d in range(dcp)]
               for g in range(tp // dcp)],
        "ep": [list(range(tp * pcp))],
    }


def build_groups(parallel: ParallelConfig, rank: int, cpu_group: Group) -> ParallelGroups:
    """Create the process groups of `rank`; call on every rank after init_process_group."""
    mine: dict[str, Group] = {}
    for kind, rank_lists in group_rank_lists(parallel).items():
        for ranks in rank_lists:
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine[kind] = group
    return ParallelGroups(rank=rank, tp=parallel.tp, pcp=parallel.pcp, dcp=parallel.dcp,
                          tp_group=mine["tp"], pcp_group=mine["pcp"], dcp_group=mine["dcp"],
                          cp_group=mine["cp"], ep_group=mine["ep"], world_group=mine["ep"],
                          cpu_group=cpu_group)


# Collectives that are no-ops on a group of one ------------------------------------------------
def all_reduce(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


def broadcast(tensor: torch.Tensor, group: Group, src: int = 0) -> torch.Tensor:
    """`tensor` of global rank `src` on every rank of `group` (in place)."""
    if group is not None:
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_gather(tensor: torch.Tensor, group: Group, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's `tensor` (same shape everywhere) along `dim`, in rank order."""
    if group is None:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
