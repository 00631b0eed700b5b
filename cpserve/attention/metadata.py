"""Per-step index math: which tokens a rank computes, and where their KV goes.

A step computes `num_new` tokens of each planned request, from position `start`. With PCP, a
request with enough new tokens is *split*: its new tokens are cut into 2 * pcp chunks and PCP
rank p takes chunks p and 2*pcp-1-p (head-tail), which balances causal attention work:

    num_new = 10, pcp = 2, chunk = ceil(10 / 4) = 3
    offsets     0 1 2 | 3 4 5 | 6 7 8 | 9
    chunk         0       1       2     3
    rank 0 takes chunks 0, 3 -> 0 1 2 9          rank 1 takes chunks 1, 2 -> 3 4 5 6 7 8

Other requests (decodes, short chunks) are *replicated*: every PCP rank computes all their new
tokens. A rank's local tokens are, request by request in plan order, all new tokens of a
replicated request or its own part of a split one.

Every query's attention has two parts, merged by LSE:
  new part:    over the new tokens of its request in this step, causal by position
               (replicated: all are here; split: exchanged across the PCP group);
  prefix part: over the tokens cached before this step, through the sharded-KV primitive
               (only when the request has any: a decode, a later chunk, a prefix-cache hit).

A step of few new tokens per request, none split (a decode step: one; a verification step of
speculative decoding: the last token and K drafts) skips the new part: its KV is written
first and each query attends through the paged cache alone, query j of a request seeing
`local_count(start + j + 1)` tokens on this shard (DESIGN.md, "Speculative decoding"). When
such a step has requests of more than one token, each request gets exactly `q` rows, the
rows past its tokens padding (position -1: no KV written, nothing visible), so that the
paged kernel reads each request's KV once for all its queries and CUDA graphs see fixed
shapes (`decode_metadata` with `queries_per_seq`, built by engine/step_inputs.py):

    q = 3, requests of 1 and 3 tokens at positions 9 and 20..22
    rows      0   1   2  | 3   4   5
    seq       0   0   0  | 1   1   1
    position  9  -1  -1  | 20  21  22
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from cpserve.distributed.groups import ParallelGroups
from cpserve.kv.layout import KVLayout


@dataclass(frozen=True)
class PlannedSeq:
    start: int  # position of the first new token (= tokens already in cache)
    num_new: int
    split: bool  # new tokens divided head-tail over the PCP ranks


def head_tail_offsets(num_new: int, pcp: int, pcp_rank: int) -> torch.Tensor:
    """Offsets (from the request's first new token) that `pcp_rank` computes."""
    chunk = -(-num_new // (2 * pcp))
    head = torch.arange(pcp_rank * chunk, min((pcp_rank + 1) * chunk, num_new))
    tail_start = (2 * pcp - 1 - pcp_rank) * chunk
    tail = torch.arange(min(tail_start, num_new), min(tail_start + chunk, num_new))
    return torch.cat([head, tail])


@dataclass
class StepAttentionMetadata:
    """Everything the attention layers need for one step, the same for every layer.

    Built in two stages (`step_token_layout`, then `attach_block_tables`): the index math of
    the step's tokens on the host, where the backend plans from it, then the fields that
    read block tables (`block_tables` and the slots), wherever the tables live (the model
    runner keeps them on the device). Until then those three are None.
    """

    num_seqs: int
    block_tables: torch.Tensor | None  # [num_seqs, max_blocks]
    # Replicated tokens: attend to their request's new tokens here (every rank has them all)
    # and to the cached prefix through the sharded-KV primitive.
    rep_index: torch.Tensor  # their rows among the local tokens
    rep_slots: torch.Tensor | None  # cache slot on this rank, -1 if another shard holds it
    rep_seq: torch.Tensor
    rep_pos: torch.Tensor
    rep_prefix_len: torch.Tensor  # cached tokens visible on this shard: local_count(start)
    has_rep_prefix: bool  # some replicated request continues after cached tokens
    # A decode or verification step (few new tokens per request, none split): write their
    # KV first and let each query see the cache up to and including it: local_count(pos + 1)
    # (0 for a padding row). One paged call; no dense part.
    rep_kv_len: torch.Tensor
    rep_decode_only: bool
    # Split tokens: this rank's rows, and the split tokens of every PCP rank, `pad` rows each.
    split_index: torch.Tensor
    split_pos: torch.Tensor
    split_seq: torch.Tensor
    pad: int
    gathered_pos: torch.Tensor  # [pcp * pad], -1 in padding rows
    gathered_seq: torch.Tensor  # [pcp * pad], -1 in padding rows
    gathered_slots: torch.Tensor | None  # [pcp * pad], this rank's cache slots, -1 elsewhere
    gathered_prefix_len: torch.Tensor  # [pcp * pad], cached tokens visible on this shard
    has_prefix: bool  # some split request continues after cached tokens
    # > 1: the replicated rows are `rep_queries_per_seq` consecutive rows per request (the
    # padded layout above), which the paged kernel reads as one tile per request.
    rep_queries_per_seq: int = 1

    @property
    def has_replicated(self) -> bool:
        return self.rep_index.numel() > 0

    @property
    def has_split(self) -> bool:
        return self.pad > 0

    def index_tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields, by name (what moves to the device)."""
        return {name: value for name, value in vars(self).items()
                if isinstance(value, torch.Tensor)}


@dataclass
class StepTokens:
    """The local tokens of a step on one rank."""

    seq: torch.Tensor  # which planned request each local token belongs to
    offset: torch.Tensor  # its index among that request's new tokens (>= num_new: padding)
    positions: torch.Tensor
    metadata: StepAttentionMetadata


def expand_ranges(owner: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranges [lo[i], hi[i]) laid end to end, without a loop over them.

        owner  = [0, 0, 1]    lo = [0, 9, 0]    hi = [3, 10, 2]
        ->  owner per element  0 0 0 0 1 1
            value per element  0 1 2 9 0 1

    Returns (owner of each element, its value). Empty ranges (hi <= lo) add nothing.
    """
    lengths = (hi - lo).clamp(min=0)
    which = torch.arange(len(lengths)).repeat_interleave(lengths)
    first = lengths.cumsum(0) - lengths
    values = lo[which] + torch.arange(len(which)) - first[which]
    return owner[which], values


def _rank_tokens(num_new: torch.Tensor, split: torch.Tensor, pcp: int, pcp_rank: int,
                 only_split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq index, offset) of the tokens `pcp_rank` computes, in local order: per request,
    all its new tokens if replicated (none if `only_split`), else its head then its tail."""
    chunk = -(-num_new // (2 * pcp))
    head_lo = pcp_rank * chunk
    head_hi = torch.minimum((pcp_rank + 1) * chunk, num_new)
    tail_lo = torch.minimum((2 * pcp - 1 - pcp_rank) * chunk, num_new)
    tail_hi = torch.minimum(tail_lo + chunk, num_new)
    whole_hi = torch.zeros_like(num_new) if only_split else num_new
    lo = torch.stack([torch.where(split, head_lo, 0), torch.where(split, tail_lo, 0)], 1)
    hi = torch.stack([torch.where(split, head_hi, whole_hi), torch.where(split, tail_hi, 0)], 1)
    owner = torch.arange(len(num_new)).repeat_interleave(2)
    return expand_ranges(owner, lo.flatten(), hi.flatten())


def step_token_layout(seqs: list[PlannedSeq], layout: KVLayout,
                      groups: ParallelGroups) -> StepTokens:
    """The host stage: which tokens this rank computes, their positions, and every index
    the attention needs but the block tables (see `StepAttentionMetadata`). Vector work
    over the requests, no loop over tokens."""
    pcp, me, cp_rank = groups.pcp, groups.pcp_rank, groups.cp_rank
    starts = torch.tensor([s.start for s in seqs] or [0], dtype=torch.long)
    num_new = torch.tensor([s.num_new for s in seqs] or [0], dtype=torch.long)
    split = torch.tensor([s.split for s in seqs] or [False])
    local_seq, local_offset = _rank_tokens(num_new, split, pcp, me, only_split=False)
    positions = starts[local_seq] + local_offset
    is_split = split[local_seq]
    rep_index = torch.nonzero(~is_split).squeeze(1)
    rep_seq, rep_pos = local_seq[rep_index], positions[rep_index]
    split_index = torch.nonzero(is_split).squeeze(1)

    # Every rank derives every PCP rank's split tokens from the plan: no sizes are exchanged.
    per_rank = [_rank_tokens(num_new, split, pcp, p, only_split=True) for p in range(pcp)]
    pad = max(len(seq_ids) for seq_ids, _ in per_rank)
    gathered_seq = torch.full((pcp * pad,), -1, dtype=torch.long)
    gathered_pos = torch.full((pcp * pad,), -1, dtype=torch.long)
    for p, (seq_ids, offs) in enumerate(per_rank):
        gathered_seq[p * pad: p * pad + len(seq_ids)] = seq_ids
        gathered_pos[p * pad: p * pad + len(seq_ids)] = starts[seq_ids] + offs
    real = gathered_seq >= 0
    prefix_len = layout.local_count(starts[gathered_seq.clamp(min=0)], cp_rank)

    meta = StepAttentionMetadata(
        num_seqs=len(seqs),
        block_tables=None,
        rep_index=rep_index,
        rep_slots=None,
        rep_seq=rep_seq,
        rep_pos=rep_pos,
        rep_prefix_len=layout.local_count(starts[rep_seq], cp_rank),
        has_rep_prefix=any(not s.split and s.start > 0 for s in seqs),
        rep_kv_len=layout.local_count(rep_pos + 1, cp_rank),
        rep_decode_only=bool(seqs) and all(not s.split and s.num_new == 1 for s in seqs),
        split_index=split_index,
        split_pos=positions[split_index],
        split_seq=local_seq[split_index],
        pad=pad,
        gathered_pos=gathered_pos,
        gathered_seq=gathered_seq,
        gathered_slots=None,
        gathered_prefix_len=torch.where(real, prefix_len, torch.zeros_like(prefix_len)),
        has_prefix=any(s.split and s.start > 0 for s in seqs),
    )
    return StepTokens(seq=local_seq, offset=local_offset, positions=positions, metadata=meta)


def attach_block_tables(meta: StepAttentionMetadata, block_tables: torch.Tensor,
                        layout: KVLayout, cp_rank: int) -> StepAttentionMetadata:
    """The table stage: `meta` (its tensors where `block_tables` is) with the step's tables
    [num_seqs, max_blocks] and the cache slots they give. Pure tensor work on the tables'
    device; nothing waits for the host."""

    def slots_of(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        blocks = block_tables[seq, pos // layout.virtual_block_size]
        return layout.slot_mapping(pos, blocks, cp_rank)

    real = meta.gathered_seq >= 0
    gathered = slots_of(meta.gathered_seq.clamp(min=0), meta.gathered_pos.clamp(min=0))
    return dataclasses.replace(
        meta, block_tables=block_tables, rep_slots=slots_of(meta.rep_seq, meta.rep_pos),
        gathered_slots=torch.where(real, gathered, torch.full_like(gathered, -1)))


def build_step_tokens(seqs: list[PlannedSeq], block_tables: torch.Tensor, layout: KVLayout,
                      groups: ParallelGroups) -> StepTokens:
    """Both stages at once, over tables given on the host (tests, benchmarks)."""
    tokens = step_token_layout(seqs, layout, groups)
    tokens.metadata = attach_block_tables(tokens.metadata, block_tables, layout, groups.cp_rank)
    return tokens


def decode_metadata(block_tables: torch.Tensor, positions: torch.Tensor, layout: KVLayout,
                    cp_rank: int, seq: torch.Tensor | None = None,
                    queries_per_seq: int = 1) -> StepAttentionMetadata:
    """A decode-only step from its per-request vectors alone, on their device: request i
    computes one token at `positions[i]` with table `block_tables[seq[i]]` (`seq` defaults
    to 0, 1, ...; the model runner passes its persistent tables and each request's row, so
    no table is copied). A position of -1 is a padding row (a CUDA graph's bucket): no
    slot, no visible tokens. `queries_per_seq > 1`: a verification step's padded layout
    (the module docstring), rows in runs of that many per request, `seq` given per row.

    Pure tensor work, so a CUDA graph captures it and replays it on new inputs.
    """
    rows = torch.arange(positions.shape[0], device=positions.device)
    seq = rows if seq is None else seq
    real = positions >= 0
    pos = positions.clamp(min=0)
    blocks = block_tables[seq, pos // layout.virtual_block_size]
    slots = torch.where(real, layout.slot_mapping(pos, blocks, cp_rank),
                        torch.full_like(pos, -1))
    kv_len = torch.where(real, layout.local_count(pos + 1, cp_rank), torch.zeros_like(pos))
    none = rows[:0]
    return StepAttentionMetadata(
        num_seqs=positions.shape[0], block_tables=block_tables, rep_index=rows,
        rep_slots=slots, rep_seq=seq, rep_pos=pos, rep_prefix_len=kv_len,
        has_rep_prefix=True, rep_kv_len=kv_len, rep_decode_only=True, split_index=none,
        split_pos=none, split_seq=none, pad=0, gathered_pos=none, gathered_seq=none,
        gathered_slots=none, gathered_prefix_len=none, has_prefix=False,
        rep_queries_per_seq=queries_per_seq)
