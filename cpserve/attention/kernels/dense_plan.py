"""Cutting a masked dense attention into calls that fast library kernels can make.

The backend interface gives dense attention as a mask: query i sees key j iff they are of the
same sequence and `k_pos[j] <= q_pos[i]`. Library kernels (cuDNN, FlashAttention) know only
"causal" and "full" over contiguous rows. Any layout the engine produces is a few of those:

    query run    maximal rows of one sequence at consecutive positions a .. b
    keys         sorted by (sequence, position); for the run's sequence:

        keys of the sequence:  [ pos < a .......... | a ... b | > b (hidden) ]
                                 `-- full piece --'   `- causal piece: square, so top-left
                                                        and bottom-right masks agree`

    replicated prefill (one run per request, its own keys):  causal pieces only, no gather
    PCP head-tail rank p (all-gather):  head run  = full over earlier chunks + causal square
                                        tail run  = full over everything before + causal square
    ring block from another rank:       full pieces only (or nothing visible)

A run whose keys in [a, b] are not exactly the positions a .. b (a layout nothing produces
today) makes the plan fail, and the backend falls back to the exact masked kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Piece:
    q_lo: int  # query rows [q_lo, q_hi)
    q_hi: int
    k_lo: int  # rows of the sorted keys [k_lo, k_hi)
    k_hi: int
    causal: bool


@dataclass(frozen=True)
class DensePlan:
    key_order: torch.Tensor | None  # sorted key rows (None: the keys are already in order)
    pieces: tuple[Piece, ...]
    runs: tuple[tuple[int, int], ...]  # query rows of each run, for merging its pieces

    @property
    def varlen_causal(self) -> bool:
        """One causal piece per run and none full, tiling queries and keys alike: the whole
        step is a single variable-length causal call."""
        return (len(self.pieces) == len(self.runs) and all(p.causal for p in self.pieces)
                and all(p.q_lo == p.k_lo and p.q_hi == p.k_hi for p in self.pieces))


def query_runs(q_pos: torch.Tensor, q_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first row, end row) of each maximal run of one sequence at consecutive positions."""
    n = q_pos.numel()
    breaks = (q_seq[1:] != q_seq[:-1]) | (q_pos[1:] != q_pos[:-1] + 1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(breaks).squeeze(1) + 1])
    ends = torch.cat([starts[1:], torch.tensor([n])])
    return starts, ends


def build_dense_plan(q_pos: torch.Tensor, k_pos: torch.Tensor, q_seq: torch.Tensor,
                     k_seq: torch.Tensor) -> DensePlan | None:
    """Host-side plan (CPU tensors in, plain ints out); None if the layout is irregular."""
    q_pos, k_pos, q_seq, k_seq = (t.cpu().long() for t in (q_pos, k_pos, q_seq, k_seq))
    if q_pos.numel() == 0 or k_pos.numel() == 0:
        return DensePlan(None, (), ())
    span = int(max(int(q_pos.max()), int(k_pos.max()))) + 2
    # Keys of padding rows (seq < 0) sort first and are left out of every piece.
    key = k_seq * span + k_pos
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    real = sorted_key[sorted_key >= 0]
    if bool((real[1:] == real[:-1]).any()):
        return None  # two keys at one position of one sequence: not a layout we cut
    identity = bool((order == torch.arange(order.numel())).all())
    starts, ends = query_runs(q_pos, q_seq)
    seq = q_seq[starts]
    first_pos, last_pos = q_pos[starts], q_pos[ends - 1]
    seq_lo = torch.searchsorted(sorted_key, seq * span)  # first key of the sequence
    diag_lo = torch.searchsorted(sorted_key, seq * span + first_pos)
    diag_hi = torch.searchsorted(sorted_key, seq * span + last_pos + 1)
    pieces = []
    for i in range(starts.numel()):
        r0, r1 = int(starts[i]), int(ends[i])
        s0, d0, d1 = int(seq_lo[i]), int(diag_lo[i]), int(diag_hi[i])
        if int(seq[i]) < 0:
            continue
        if d0 > s0:
            pieces.append(Piece(r0, r1, s0, d0, causal=False))
        if d1 > d0:
            if d1 - d0 != r1 - r0:
                return None  # only some of the run's own positions are among the keys
            pieces.append(Piece(r0, r1, d0, d1, causal=True))
    runs = tuple((int(a), int(b)) for a, b in zip(starts, ends))
    return DensePlan(None if identity else order, tuple(pieces), runs)
