"""A rank's persistent step state, and the inputs of one step built from it.

    RequestRows      every live request of this rank has a row: its block table in one device
                     tensor [max_num_seqs, blocks of a max_model_len request], updated in place
                     by the plan's diffs (the blocks a request gained), never rebuilt
    prepare_inputs   a plan -> token ids, positions and attention metadata on the device

Per step the host does vector work over the requests (no loop over tokens) and sends every
index vector of the step in ONE copy (`DevicePack`: pinned memory, asynchronous); positions'
cache slots are computed on the device from the persistent tables.

    host                                             device
    plan ─> RequestRows.apply: rows, table diff ─┐
          > per-request vectors (starts, rows)   ├─ one copy ─> table[diff] = blocks
          > token layout (decode: nothing)       ┘              slots from table rows
                                                                tokens the plan left PENDING
                                                                <- the previous step's samples

A paged-only step (a decode step: one new token per request; a verification step of
speculative decoding: the last token and its drafts, q = 1 + K rows a request; none split
over PCP) needs no token layout: its rows are vectors, and its metadata comes from three of
them (`decode_metadata`); a CUDA graph computes the same thing from the same vectors
(`engine/cuda_graphs.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpserve.attention.metadata import (
    PlannedSeq,
    StepAttentionMetadata,
    attach_block_tables,
    decode_metadata,
    expand_ranges,
    step_token_layout,
)
from cpserve.distributed.groups import ParallelGroups, broadcast
from cpserve.distributed.plan import PENDING_TOKEN, StepPlan
from cpserve.kv.layout import KVLayout


class RequestRows:
    """The live requests of this rank, one row each: the one place that holds a request's
    state here, so freeing it (finished, aborted, preempted) is `remove`.

    The block tables live on the device only. Their changes travel as (row, column, block)
    triples inside the step's one host-to-device copy: a staging buffer written in place
    could still be in flight for the previous step when the host prepares the next.
    """

    def __init__(self, max_rows: int, max_blocks: int, device: torch.device) -> None:
        self.table = torch.zeros(max_rows, max_blocks, dtype=torch.long, device=device)
        self.max_blocks = max_blocks
        self._row_of: dict[str, int] = {}
        self._num_blocks = [0] * max_rows
        self._free = list(range(max_rows - 1, -1, -1))  # pop() hands out row 0 first

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._row_of

    def __len__(self) -> int:
        return len(self._row_of)

    def row(self, request_id: str) -> int:
        return self._row_of[request_id]

    def num_blocks(self, request_id: str) -> int:
        return self._num_blocks[self._row_of[request_id]]

    def remove(self, request_id: str) -> None:
        row = self._row_of.pop(request_id, None)
        if row is not None:
            self._num_blocks[row] = 0  # stale ids past a row's length are never read
            self._free.append(row)

    def clear(self) -> None:
        for request_id in list(self._row_of):
            self.remove(request_id)

    def apply(self, plan: StepPlan) -> torch.Tensor | None:
        """Free the rows of freed requests, give new ones a row, and return the table diff
        as a host tensor [3, n] (rows, columns, block ids) for `write_diff`, or None."""
        for request_id in plan.freed_request_ids:
            self.remove(request_id)
        rows: list[int] = []
        cols: list[int] = []
        blocks: list[int] = []
        for r in plan.requests:
            if r.is_new:  # a re-admitted request starts over with its whole table
                self.remove(r.request_id)
                if not self._free:
                    raise RuntimeError(f"no free row for request {r.request_id!r}: more live "
                                       f"requests than the {len(self._num_blocks)} rows "
                                       "(max_num_seqs)")
                self._row_of[r.request_id] = self._free.pop()
            row = self._row_of[r.request_id]
            first, count = self._num_blocks[row], len(r.block_ids)
            if first + count > self.max_blocks:
                raise RuntimeError(f"request {r.request_id!r} would hold {first + count} "
                                   f"blocks, more than a max_model_len request ({self.max_blocks})")
            rows += [row] * count
            cols += range(first, first + count)
            blocks += r.block_ids
            self._num_blocks[row] = first + count
        return torch.tensor([rows, cols, blocks], dtype=torch.long) if rows else None

    def write_diff(self, diff: torch.Tensor) -> None:
        """Apply a diff from `apply`, already on the table's device."""
        self.table[diff[0], diff[1]] = diff[2]


class DevicePack:
    """Host int64 vectors that go to the device in one copy; `send` returns their views."""

    def __init__(self) -> None:
        self._parts: list[torch.Tensor] = []

    def add(self, values: torch.Tensor) -> int:
        """`values`: int64, any shape (flattened)."""
        self._parts.append(values if values.dim() == 1 else values.reshape(-1))
        return len(self._parts) - 1

    def send(self, device: torch.device) -> list[torch.Tensor]:
        if device.type == "cpu":
            return self._parts
        sizes = [p.numel() for p in self._parts]
        staging = torch.empty(sum(sizes), dtype=torch.long, pin_memory=True)
        torch.cat(self._parts, out=staging)
        # Pinned memory from the caching host allocator is not reused before this copy ran.
        return list(staging.to(device, non_blocking=True).split(sizes))


@dataclass
class PendingTokens:
    """The driver's values of a plan's PENDING_TOKEN entries: the k-th of them (plan order)
    is `samples[rows[k]]`, `samples` being the sampled ids of the step before, still on the
    device."""

    samples: torch.Tensor
    rows: list[int]


@dataclass
class StepInputs:
    """One step's inputs on one rank. `local_seq` / `local_offset` (host) say which planned
    request and which of its new tokens each local token is; the rest is on the device."""

    seqs: list[PlannedSeq]
    local_seq: torch.Tensor
    local_offset: torch.Tensor
    token_ids: torch.Tensor
    positions: torch.Tensor
    # Paged-only steps: [3, num_seqs * q] token ids, positions (-1: padding), table rows
    # (what a CUDA graph reads)
    # and metadata over the persistent tables; else the metadata of the token layout.
    decode_vectors: torch.Tensor | None
    metadata: StepAttentionMetadata
    host_metadata: StepAttentionMetadata | None  # what the backend plans from


def paged_rows(seqs: list[PlannedSeq], max_paged_queries: int = 1) -> int:
    """Rows per request of a paged-only step (attention/metadata.py), 0 if the step is not
    one: 1 for a decode step, `max_paged_queries` (1 + K) for a verification step of
    speculative decoding (some request has drafts)."""
    if not seqs or any(s.split or s.num_new > max_paged_queries for s in seqs):
        return 0
    return 1 if all(s.num_new == 1 for s in seqs) else max_paged_queries


def prepare_inputs(plan: StepPlan, seqs: list[PlannedSeq], rows: RequestRows,
                   diff: torch.Tensor | None, layout: KVLayout, groups: ParallelGroups,
                   device: torch.device,
                   pending_tokens: PendingTokens | None = None,
                   max_paged_queries: int = 1) -> StepInputs:
    """The step's inputs (rows already applied, `diff` from `rows.apply`).

    A paged-only step (`paged_rows`: decode, or verification of drafts with
    `max_paged_queries` = 1 + K) goes as vectors, q rows per request, padding rows at
    position -1 repeating the request's last token.

    `pending_tokens`: on the driver, where the values of the plan's PENDING_TOKEN entries
    are (samples of the step before, not yet seen by the host); the other ranks receive
    them by a broadcast over all ranks.
    """
    flat_ids = torch.tensor([t for r in plan.requests for t in r.token_ids], dtype=torch.long)
    seq_rows = torch.tensor([rows.row(r.request_id) for r in plan.requests], dtype=torch.long)
    pack = DevicePack()
    q = paged_rows(seqs, max_paged_queries)
    if q:
        starts = torch.tensor([s.start for s in seqs], dtype=torch.long)
        num_new = torch.tensor([s.num_new for s in seqs], dtype=torch.long)
        local_seq = torch.arange(len(seqs)).repeat_interleave(q)
        local_offset = torch.arange(q).repeat(len(seqs))
        first = torch.cat([torch.zeros(1, dtype=torch.long), num_new.cumsum(0)])
        flat_index = first[local_seq] + torch.minimum(local_offset, num_new[local_seq] - 1)
        local_ids, host_meta = flat_ids[flat_index], None
        local_pos = torch.where(local_offset < num_new[local_seq],
                                starts[local_seq] + local_offset, -1)
        vectors = pack.add(torch.stack([local_ids, local_pos, seq_rows[local_seq]]))
    else:
        tokens = step_token_layout(seqs, layout, groups)
        local_seq, local_offset, host_meta = tokens.seq, tokens.offset, tokens.metadata
        first = torch.tensor([0] + [s.num_new for s in seqs]).cumsum(0)
        flat_index = first[local_seq] + local_offset
        local_ids = flat_ids[flat_index]
        names = list(host_meta.index_tensors())
        handles = [pack.add(host_meta.index_tensors()[n]) for n in names]
        ids_at, positions_at, seq_rows_at = (pack.add(t) for t in
                                             (local_ids, tokens.positions, seq_rows))
    num_pending = int((flat_ids == PENDING_TOKEN).sum())
    if num_pending:
        # Where each pending token sits locally, and which of the plan's pending values it
        # takes (its rank among them in plan order).
        pending = torch.nonzero(local_ids == PENDING_TOKEN).squeeze(1)
        ordinal = (flat_ids == PENDING_TOKEN).long().cumsum(0) - 1
        order = ordinal[flat_index[pending]]
        pending_at, order_at = pack.add(pending), pack.add(order)
        if pending_tokens is not None:
            sample_rows_at = pack.add(torch.tensor(pending_tokens.rows, dtype=torch.long))
    diff_at = pack.add(diff) if diff is not None else None
    sent = pack.send(device)

    if diff_at is not None:
        rows.write_diff(sent[diff_at].view(3, -1))
    if host_meta is None:
        decode_vectors = sent[vectors].view(3, -1)
        metadata = decode_metadata(rows.table, decode_vectors[1], layout, groups.cp_rank,
                                   seq=decode_vectors[2], queries_per_seq=q)
        # Padding rows' rope at position 0 (their outputs are dropped).
        token_ids, positions = decode_vectors[0], metadata.rep_pos
    else:
        decode_vectors = None
        token_ids, positions = sent[ids_at], sent[positions_at]
        on_device = {n: sent[h] for n, h in zip(names, handles)}
        tables = rows.table[:, :max(rows.num_blocks(r.request_id) for r in plan.requests)]
        metadata = attach_block_tables(
            StepAttentionMetadata(**{**vars(host_meta), **on_device}),
            tables.index_select(0, sent[seq_rows_at]), layout, groups.cp_rank)
    if num_pending:
        values = None
        if pending_tokens is not None:
            if len(pending_tokens.rows) != num_pending:
                raise ValueError(f"the plan has {num_pending} pending tokens, the driver "
                                 f"gave {len(pending_tokens.rows)}")
            values = pending_tokens.samples.index_select(0, sent[sample_rows_at])
        if groups.world_size > 1:  # every rank embeds the tokens; the driver alone has them
            if values is None:
                values = torch.empty(num_pending, dtype=torch.long, device=device)
            values = broadcast(values, groups.world_group, src=0)
        if values is None:
            raise ValueError(f"the plan has {num_pending} pending tokens and no values")
        token_ids.index_copy_(0, sent[pending_at], values.index_select(0, sent[order_at]))
    return StepInputs(seqs, local_seq, local_offset, token_ids, positions, decode_vectors,
                      metadata, host_meta)


def wanted_rows(plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(request index, offset among its new tokens) of every logit row the plan asks for:
    request by request, its last `num_logits` new tokens."""
    num_new = torch.tensor([len(r.token_ids) for r in plan.requests], dtype=torch.long)
    num_logits = torch.tensor([r.num_logits for r in plan.requests], dtype=torch.long)
    return expand_ranges(torch.arange(len(num_new)), num_new - num_logits, num_new)
