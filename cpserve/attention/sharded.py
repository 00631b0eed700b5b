"""Attention of queries over KV already spread over the C = pcp * dcp shards.

One primitive for every query that looks at cached KV: a decode token, a chunk that continues
a prompt, a prefix-cache hit, the prefix part of a PCP prefill. The queries must be the same on
every rank of the cp group (same tokens; each rank has its own heads).

    dcp group (same KV heads, different query heads)     e.g. dcp = 2, 4 query heads per rank
      rank a: q heads 0-3 ─┐  all-gather Q over heads   ┌─> heads 0-7 over shard a ─┐
      rank b: q heads 4-7 ─┘                            └─> heads 0-7 over shard b ─┤
                                                                                   │
    LSE merge across all C shards (weights exp(lse_i - lse)), summed over the cp   │
    group, then each rank keeps its own heads  <──────────────────────────────────┘
"""

from __future__ import annotations

import torch

from cpserve.attention.backend import AttentionBackend
from cpserve.attention.merge import scale_factors
from cpserve.distributed.groups import ParallelGroups, all_gather, all_reduce


def sharded_kv_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_kv_len: torch.Tensor,
    scale: float,
    groups: ParallelGroups,
    backend: AttentionBackend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H_local, D]; `query_kv_len` counts the visible tokens on THIS rank's shard.

    Returns out [N, H_local, D] and lse [N, H_local] over all shards.
    """
    num_heads = q.shape[1]
    q = all_gather(q, groups.dcp_group, dim=1)
    out, lse = backend.paged_attention(q, k_cache, v_cache, block_tables, query_seq,
                                       query_kv_len, scale)
    if groups.num_kv_shards > 1:
        total = torch.logsumexp(all_gather(lse.unsqueeze(0), groups.cp_group, dim=0), dim=0)
        weighted = out.float() * scale_factors(lse, total).unsqueeze(-1)
        out = all_reduce(weighted, groups.cp_group).to(q.dtype)
        lse = total
    if groups.dcp > 1:
        mine = slice(groups.dcp_rank * num_heads, (groups.dcp_rank + 1) * num_heads)
        out, lse = out[:, mine], lse[:, mine]
    return out, lse
