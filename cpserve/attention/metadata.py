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
rows past its tokens padding (no KV written, nothing visible), so that the paged kernel
reads each request's KV once for all its queries and CUDA graphs see fixed shapes:

    q = 3, requests of 1 and 3 tokens at positions 9 and 20..22
    rows      0   1   2  | 3   4   5
    seq       0   0   0  | 1   1   1
    position  9   9   9  | 20  21  22
    padding   .   x   x  | .   .   .
"""

from __future__ import annotations

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
    """Everything the attention layers need for one step, the same for every layer."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks]
    # Replicated tokens: attend to their request's new tokens here (every rank has them all)
    # and to the cached prefix through the sharded-KV primitive.
    rep_index: torch.Tensor  # their rows among the local tokens
    rep_slots: torch.Tensor  # cache slot on this rank, -1 if another shard holds the token
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
    gathered_slots: torch.Tensor  # [pcp * pad], this rank's cache slots, -1 elsewhere
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


@dataclass
class StepTokens:
    """The local tokens of a step on one rank."""

    seq: torch.Tensor  # which planned request each local token belongs to
    offset: torch.Tensor  # its index among that request's new tokens (>= num_new: padding)
    positions: torch.Tensor
    metadata: StepAttentionMetadata


def build_step_tokens(seqs: list[PlannedSeq], block_tables: torch.Tensor, layout: KVLayout,
                      groups: ParallelGroups, max_paged_queries: int = 1) -> StepTokens:
    """`max_paged_queries`: requests of at most this many new tokens (none split) make a
    paged-only step (the module docstring); 1 unless speculative decoding is on."""
    pcp, me = groups.pcp, groups.pcp_rank
    paged_only = bool(seqs) and all(not s.split and s.num_new <= max_paged_queries
                                    for s in seqs)
    # Rows per request of a padded paged-only step; 1 keeps a decode step as it is.
    rows_per_seq = max_paged_queries if paged_only and any(s.num_new > 1 for s in seqs) else 0

    def offsets_of(seq: PlannedSeq, pcp_rank: int) -> torch.Tensor:
        if seq.split:
            return head_tail_offsets(seq.num_new, pcp, pcp_rank)
        return torch.arange(rows_per_seq or seq.num_new)

    def gather_rows(pcp_rank: int, only_split: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq index, offset) of the tokens `pcp_rank` computes, in local order."""
        seq_ids, offsets = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
        for i, seq in enumerate(seqs):
            if only_split and not seq.split:
                continue
            offs = offsets_of(seq, pcp_rank)
            seq_ids.append(torch.full_like(offs, i))
            offsets.append(offs)
        return torch.cat(seq_ids), torch.cat(offsets)

    starts = torch.tensor([s.start for s in seqs] or [0], dtype=torch.long)
    num_new = torch.tensor([s.num_new for s in seqs] or [1], dtype=torch.long)
    split_flags = torch.tensor([s.split for s in seqs] or [False])
    local_seq, local_offset = gather_rows(me, only_split=False)
    padding = local_offset >= num_new[local_seq]
    # A padding row sits at its request's last position: its rope stays in range.
    positions = starts[local_seq] + torch.minimum(local_offset, num_new[local_seq] - 1)
    is_split = split_flags[local_seq]

    def slots_of(seq_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        blocks = block_tables[seq_ids, pos // layout.virtual_block_size]
        return layout.slot_mapping(pos, blocks, groups.cp_rank)

    rep_index = torch.nonzero(~is_split).squeeze(1)
    rep_seq, rep_pos = local_seq[rep_index], positions[rep_index]
    split_index = torch.nonzero(is_split).squeeze(1)

    # Every rank derives every PCP rank's split tokens from the plan: no sizes are exchanged.
    per_rank = [gather_rows(p, only_split=True) for p in range(pcp)]
    pad = max(len(seq_ids) for seq_ids, _ in per_rank)
    gathered_seq = torch.full((pcp * pad,), -1, dtype=torch.long)
    gathered_pos = torch.full((pcp * pad,), -1, dtype=torch.long)
    for p, (seq_ids, offs) in enumerate(per_rank):
        gathered_seq[p * pad: p * pad + len(seq_ids)] = seq_ids
        gathered_pos[p * pad: p * pad + len(seq_ids)] = starts[seq_ids] + offs
    real = gathered_seq >= 0
    safe_seq = gathered_seq.clamp(min=0)
    gathered_slots = torch.where(real, slots_of(safe_seq, gathered_pos.clamp(min=0)),
                                 torch.full_like(gathered_pos, -1))
    prefix_len = layout.local_count(starts[safe_seq], groups.cp_rank)
    gathered_prefix_len = torch.where(real, prefix_len, torch.zeros_like(prefix_len))

    rep_padding = padding[rep_index]
    meta = StepAttentionMetadata(
        block_tables=block_tables,
        rep_index=rep_index,
        rep_slots=torch.where(rep_padding, -1, slots_of(rep_seq, rep_pos)),
        rep_seq=rep_seq,
        rep_pos=rep_pos,
        rep_prefix_len=layout.local_count(starts[rep_seq], groups.cp_rank),
        has_rep_prefix=any(not s.split and s.start > 0 for s in seqs),
        rep_kv_len=torch.where(rep_padding, 0, layout.local_count(rep_pos + 1, groups.cp_rank)),
        rep_decode_only=paged_only,
        split_index=split_index,
        split_pos=positions[split_index],
        split_seq=local_seq[split_index],
        pad=pad,
        gathered_pos=gathered_pos,
        gathered_seq=gathered_seq,
        gathered_slots=gathered_slots,
        gathered_prefix_len=gathered_prefix_len,
        has_prefix=any(s.split and s.start > 0 for s in seqs),
        rep_queries_per_seq=max(rows_per_seq, 1),
    )
    return StepTokens(seq=local_seq, offset=local_offset, positions=positions, metadata=meta)
