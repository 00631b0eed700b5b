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

MLA's prefix read expanded (`build_latent_prefix_plan`, run by attention/latent_prefix.py)
groups rows the same way, but gathers each group's latents in pieces of a bounded workspace
(one gather work per piece); the other rows get a plan of their own for the Triton kernel,
which reads them absorbed.
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


def _group_rows(seq: torch.Tensor, lens: torch.Tensor, capacity: int | None):
    """Groups of rows with one (sequence, length), big enough for the library path: the rows
    in library groups (bool [n]), those rows group by group, and per chosen group its row
    count, sequence and length."""
    span = int(lens.max()) + 1
    key = torch.where(lens > 0, seq * span + lens, torch.full_like(seq, -1))
    groups, group_of_row, counts = torch.unique(key, return_inverse=True, return_counts=True)
    group_seq, group_len = groups // span, groups % span
    chosen = (groups >= 0) & (counts >= MIN_LIBRARY_QUERIES)
    if capacity is not None:  # the first groups, while the workspace holds them
        chosen &= torch.cumsum(torch.where(chosen, group_len, 0), 0) <= capacity
    in_library = chosen[group_of_row]
    rows = torch.nonzero(in_library).squeeze(1)
    rows = rows[torch.argsort(group_of_row[rows], stable=True)]
    return in_library, rows, counts[chosen], group_seq[chosen], group_len[chosen]


def _library_part(seq: torch.Tensor, lens: torch.Tensor, device: torch.device,
                  capacity: int | None) -> tuple[LibraryPart | None, torch.Tensor]:
    """The library groups, their prefixes gathered into one buffer."""
    in_library, rows, counts, group_seq, group_len = _group_rows(seq, lens, capacity)
    if not bool(in_library.any()):
        return None, in_library
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
                 device: torch.device, group_start: torch.Tensor | None = None) -> GatherWork:
    """Items of at most GATHER_BLOCK_TOKENS tokens: group g's local tokens
    [start_g, start_g + len_g) (start 0 unless `group_start`) go to gathered rows
    [cu_k[g], cu_k[g + 1])."""
    block = GATHER_BLOCK_TOKENS
    start = torch.zeros_like(group_len) if group_start is None else group_start
    per_group = -(-group_len // block)
    group = torch.repeat_interleave(torch.arange(group_len.numel()), per_group)
    index = torch.arange(int(per_group.sum())) - (torch.cumsum(per_group, 0) - per_group)[group]
    offset = index * block
    items = torch.stack([group_seq[group], start[group] + offset, cu_k[group] + offset,
                         torch.clamp(group_len[group] - offset, max=block)]).int()
    return GatherWork(_to(device, items), int(cu_k[-1]), block)


# MLA's prefix read expanded (cpserve/attention/forms.py) ------------------------------------
@dataclass(frozen=True)
class LatentGroup:
    """Permuted query rows [q_lo, q_hi), one sequence's prefix: its latents in pieces of at
    most the workspace's tokens, each gathered, expanded and attended in turn (LSE-merged)."""

    q_lo: int
    q_hi: int
    pieces: tuple[GatherWork, ...]


@dataclass(frozen=True)
class LatentPrefixPlan:
    num_queries: int
    rows: torch.Tensor | None  # device: the groups' rows, group by group; None: all, in order
    groups: tuple[LatentGroup, ...]
    # The other rows (decodes, small groups), read absorbed by the paged kernel: their
    # indices (None: every row) and their plan (library=False).
    absorbed_rows: torch.Tensor | None
    absorbed: PrefixPlan | None


def build_latent_prefix_plan(query_seq: torch.Tensor, query_kv_len: torch.Tensor,
                             num_seqs: int, device: torch.device, *, piece_tokens: int,
                             tile_queries: int) -> LatentPrefixPlan:
    """Host tensors in, as `build_prefix_plan`. Groups of at least MIN_LIBRARY_QUERIES rows
    read their prefix expanded, `piece_tokens` cached tokens at a time (a bounded workspace:
    a 32k prefix expanded at once would be tokens x heads x (192 + 128) x 2 bytes, 335 MB
    for DeepSeek-V2-Lite, per call); the rest go to the Triton kernel absorbed."""
    seq, lens = query_seq.cpu().long(), query_kv_len.cpu().long()
    n = seq.numel()
    groups: list[LatentGroup] = []
    in_library = torch.zeros(n, dtype=torch.bool)
    rows = None
    if n and int(lens.max()) > 0:
        in_library, order, counts, group_seq, group_len = _group_rows(seq, lens, None)
        cu_q = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]).tolist()
        for g, (s, length) in enumerate(zip(group_seq.tolist(), group_len.tolist())):
            starts = list(range(0, length, piece_tokens))
            sizes = torch.tensor([min(piece_tokens, length - a) for a in starts])
            pieces = tuple(
                _gather_work(torch.tensor([s]), sizes[i:i + 1], torch.tensor([0, int(sizes[i])]),
                             device, group_start=torch.tensor([a]))
                for i, a in enumerate(starts))
            groups.append(LatentGroup(cu_q[g], cu_q[g + 1], pieces))
        if groups and not _is_all_rows(order, n):
            rows = _to(device, order)
    rest = torch.nonzero(~in_library).squeeze(1)
    absorbed_rows = absorbed = None
    if rest.numel() and int(lens[rest].max()) > 0:
        absorbed = build_prefix_plan(seq[rest], lens[rest], num_seqs, device, library=False,
                                     tile_queries=tile_queries)
        absorbed_rows = None if _is_all_rows(rest, n) else _to(device, rest)
    return LatentPrefixPlan(n, rows, tuple(groups), absorbed_rows, absorbed)
