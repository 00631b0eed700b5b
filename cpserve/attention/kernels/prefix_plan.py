"""Planning the attention of queries over a cached prefix, on the host, once per step.

A chunk that continues a prompt (a later chunk, a prefix-cache hit, a PCP split after a
prefix) asks the sharded-KV primitive for many queries of one sequence that all see the same
local prefix on this shard. That is a non-causal attention of those queries over one key
range, which library kernels run at full speed once the prefix is gathered from its blocks:

    rows of one paged call     query_seq   3 3 3 3 3 3 7 9 3 3    (PCP: a sequence's rows sit
                               kv_len      L L L L L L a b L L     in every rank's block)
    group (seq 3, L), 8 rows   -> library: gather seq 3's first L local tokens once, then one
                                  non-causal attention of the 8 rows over them
    seq 7, seq 9 (a row each)  -> the Triton paged kernel (decodes and short runs)

The plan holds, already on the device:
  library  a permutation of the rows putting each group's rows together (None when the rows
           are one group in order), per group its query rows and gathered key rows, varlen
           offsets, and the gather's work items;
  triton   the other rows, their sequence and length, and tiles for the kernel's tiled mode.
Rows that see nothing on this shard (length 0: a shard holding none of a short prefix, PCP
padding rows) are in neither: they return out 0 and lse -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpserve.attention.kernels.gather import GatherWork
from cpserve.attention.kernels.paged import PagedTiles, plan_tiles, wants_tiles

# Fewest queries of one group for the library path: below it, one Triton tile reads the
# prefix once anyway, and the gather would cost as much as the attention.
MIN_LIBRARY_QUERIES = 64
# Tokens per gather work item (kernels/gather.py).
GATHER_BLOCK_TOKENS = 32


@dataclass(frozen=True)
class LibraryPart:
    rows: torch.Tensor | None  # device [num_rows]: the call's rows, group by group
    num_rows: int
    # Per group: rows [q_lo, q_hi) of the permuted queries over gathered rows [k_lo, k_hi).
    pieces: tuple[tuple[int, int, int, int], ...]
    cu_q: torch.Tensor  # device int32 [groups + 1]: one variable-length call
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    gather: GatherWork


@dataclass(frozen=True)
class TritonPart:
    rows: torch.Tensor | None  # device [n]; None: every row of the call, in order
    seq: torch.Tensor
    kv_len: torch.Tensor
    tiles: PagedTiles | None  # None: decode mode (one query per program row)


@dataclass(frozen=True)
class PrefixPlan:
    num_queries: int
    library: LibraryPart | None
    triton: TritonPart | None


def _to(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    return t.to(device, non_blocking=True)


def _is_all_rows(rows: torch.Tensor, n: int) -> bool:
    return rows.numel() == n and bool((rows == torch.arange(n)).all())


def build_prefix_plan(query_seq: torch.Tensor, query_kv_len: torch.Tensor, num_seqs: int,
                      device: torch.device, *, library: bool, tile_queries: int,
                      gather_capacity: int | None = None) -> PrefixPlan:
    """Host tensors in (a device tensor here costs a synchronisation: only the backend's
    call-time planning passes those). `gather_capacity` bounds the gathered rows (the
    backend's workspace); groups past it take the Triton kernel."""
    seq, lens = query_seq.cpu().long(), query_kv_len.cpu().long()
    n = seq.numel()
    in_library = torch.zeros(n, dtype=torch.bool)
    library_part = None
    if library and n and int(lens.max()) > 0:
        library_part, in_library = _library_part(seq, lens, device, gather_capacity)
    rest = torch.nonzero((lens > 0) & ~in_library).squeeze(1)
    triton_part = None
    if rest.numel():
        rest_seq, rest_len = seq[rest], lens[rest]
        tiles = None
        if wants_tiles(rest.numel(), num_seqs):
            first, rows = plan_tiles(rest_seq, tile_queries)
            tile_of_row = torch.repeat_interleave(torch.arange(first.numel()), rows.long())
            tile_lens = torch.zeros(first.numel(), dtype=torch.long).scatter_reduce(
                0, tile_of_row, rest_len, "amax")
            tiles = PagedTiles(_to(device, first), _to(device, rows), _to(device, tile_lens),
                               tile_queries)
        triton_part = TritonPart(None if _is_all_rows(rest, n) else _to(device, rest),
                                 _to(device, rest_seq), _to(device, rest_len), tiles)
    return PrefixPlan(n, library_part, triton_part)


def _library_part(seq: torch.Tensor, lens: torch.Tensor, device: torch.device,
                  capacity: int | None) -> tuple[LibraryPart | None, torch.Tensor]:
    """Groups of rows with one (sequence, length), big enough for the library path."""
    span = int(lens.max()) + 1
    key = torch.where(lens > 0, seq * span + lens, torch.full_like(seq, -1))
    groups, group_of_row, counts = torch.unique(key, return_inverse=True, return_counts=True)
    group_seq, group_len = groups // span, groups % span
    chosen = (groups >= 0) & (counts >= MIN_LIBRARY_QUERIES)
    if capacity is not None:  # the first groups, while the workspace holds them
        chosen &= torch.cumsum(torch.where(chosen, group_len, 0), 0) <= capacity
    in_library = chosen[group_of_row]
    if not bool(in_library.any()):
        return None, in_library
    rows = torch.nonzero(in_library).squeeze(1)
    rows = rows[torch.argsort(group_of_row[rows], stable=True)]
    counts, group_seq, group_len = counts[chosen], group_seq[chosen], group_len[chosen]
    cu_q = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    cu_k = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(group_len, 0)])
    pieces = tuple((int(cu_q[g]), int(cu_q[g + 1]), int(cu_k[g]), int(cu_k[g + 1]))
                   for g in range(counts.numel()))
    gather = _gather_work(group_seq, group_len, cu_k, device)
    part = LibraryPart(None if _is_all_rows(rows, seq.numel()) else _to(device, rows),
                       rows.numel(), pieces, _to(device, cu_q.int()), _to(device, cu_k.int()),
                       int(counts.max()), int(group_len.max()), gather)
    return part, in_library


def _gather_work(group_seq: torch.Tensor, group_len: torch.Tensor, cu_k: torch.Tensor,
                 device: torch.device) -> GatherWork:
    """Items of at most GATHER_BLOCK_TOKENS tokens: group g's local tokens [0, len_g) go to
    gathered rows [cu_k[g], cu_k[g + 1])."""
    block = GATHER_BLOCK_TOKENS
    per_group = -(-group_len // block)
    group = torch.repeat_interleave(torch.arange(group_len.numel()), per_group)
    index = torch.arange(int(per_group.sum())) - (torch.cumsum(per_group, 0) - per_group)[group]
    src = index * block
    items = torch.stack([group_seq[group], src, cu_k[group] + src,
                         torch.clamp(group_len[group] - src, max=block)]).int()
    return GatherWork(_to(device, items), int(cu_k[-1]), block)
