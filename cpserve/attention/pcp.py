"""Attention of a PCP rank's split tokens: over the new tokens of the step (exchanged across
the PCP group) and over the cached prefix (through the sharded-KV primitive), merged by LSE.

Two exchanges, both exact:

  all-gather  every rank gathers K/V of all split tokens, then attends once.
  ring        K/V blocks travel round the PCP ring; each rank attends to the block it holds
              while the next one is on its way, merging partial results as it goes:

                step 0: rank p holds its own block      -> attend, send to p+1, recv from p-1
                step 1: rank p holds block of p-1       -> attend, ...
                ...     after pcp steps every rank has seen every block once

Every block that passes by also writes its tokens that belong to this rank's shard into the
KV cache, so after the exchange the cache holds this rank's shard of all new tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cpserve.attention.backend import AttentionBackend, StepPlans
from cpserve.attention.forms import SAME_FORMS, SameForms
from cpserve.attention.merge import fold_into
from cpserve.attention.metadata import StepAttentionMetadata
from cpserve.attention.sharded import sharded_kv_attention
from cpserve.distributed.groups import ParallelGroups, all_gather


class RingComm:
    """Send a tensor to the next PCP rank while receiving one from the previous."""

    def __init__(self, groups: ParallelGroups) -> None:
        self.group = groups.pcp_group
        pcp, me, tp = groups.pcp, groups.pcp_rank, groups.tp
        self.next_rank = ((me + 1) % pcp) * tp + groups.tp_rank
        self.prev_rank = ((me - 1) % pcp) * tp + groups.tp_rank
        self._requests: list = []

    def send_recv(self, tensor: torch.Tensor) -> torch.Tensor:
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next_rank, self.group),
               dist.P2POp(dist.irecv, received, self.prev_rank, self.group)]
        self._requests = dist.batch_isend_irecv(ops)
        return received

    def wait(self) -> None:
        for request in self._requests:
            request.wait()
        self._requests = []


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))


def pcp_split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                        k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                        meta: StepAttentionMetadata, scale: float, groups: ParallelGroups,
                        backend: AttentionBackend, exchange: str,
                        v_dim: int | None = None,
                        plans: StepPlans | None = None,
                        forms: SameForms = SAME_FORMS,
                        kv_scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """q/k/v: this rank's split tokens [n, H, D]. Returns their attention output.

    With `v=None` (latent attention) only the keys travel; values are their first v_dim
    channels, or what `forms.new_kv` makes of the keys once they have arrived (MLA expanded).
    Otherwise keys and values travel together as one [2, rows, H_kv, D] tensor.
    `plans`: the backend's plans of the step (StepPlans.split_*); `kv_scale`: the layer's
    (k_scale, v_scale) for an FP8 cache (k and v arrive already rounded to what it holds).
    """
    plans = plans if plans is not None else StepPlans()
    pcp, me, pad = groups.pcp, groups.pcp_rank, meta.pad
    kv = (_pad_rows(k, pad).unsqueeze(0) if v is None
          else torch.stack([_pad_rows(k, pad), _pad_rows(v, pad)]))

    def split(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keys, values to store or None)."""
        return (block[0], None) if v is None else (block[0], block[1])

    def attend_block(block: torch.Tensor, src: int):
        rows = slice(src * pad, (src + 1) * pad)
        keys, stored = split(block)
        backend.write_kv(keys, stored, k_cache, v_cache, meta.gathered_slots[rows], *kv_scale)
        return backend.dense_attention(q, *forms.new_kv(keys, stored, v_dim), meta.split_pos,
                                       meta.gathered_pos[rows], meta.split_seq,
                                       meta.gathered_seq[rows], scale,
                                       plan=plans.split_dense_for(src))

    if exchange == "ring" and pcp > 1:
        ring = RingComm(groups)
        running = None  # fp32 until the end
        for step in range(pcp):
            incoming = ring.send_recv(kv) if step < pcp - 1 else None
            running = fold_into(running, *attend_block(kv, (me - step) % pcp))
            if incoming is not None:
                ring.wait()
                kv = incoming
        out, lse = running
    else:
        keys, stored = split(all_gather(kv, groups.pcp_group, dim=1))
        backend.write_kv(keys, stored, k_cache, v_cache, meta.gathered_slots, *kv_scale)
        out, lse = backend.dense_attention(q, *forms.new_kv(keys, stored, v_dim), meta.split_pos,
                                           meta.gathered_pos, meta.split_seq, meta.gathered_seq,
                                           scale, plan=plans.split_dense_for(0))

    if meta.has_prefix:
        # The cached prefix: every PCP rank must ask the same queries, so gather them.
        all_q = all_gather(_pad_rows(q, pad), groups.pcp_group, dim=0)
        seq = meta.gathered_seq.clamp(min=0)
        o_all, l_all = sharded_kv_attention(all_q, k_cache, v_cache, meta.block_tables, seq,
                                            meta.gathered_prefix_len, scale, groups, backend,
                                            v_dim, kv_scale, plan=plans.split_prefix,
                                            forms=forms, latent_plan=plans.split_latent_prefix)
        mine = slice(me * pad, me * pad + q.shape[0])
        out, lse = fold_into((out.float(), lse), o_all[mine], l_all[mine])
    return out.to(q.dtype)
