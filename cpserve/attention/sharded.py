"""Attention of queries over KV already spread over the C = pcp * dcp shards.

One primitive for every query that looks at cached KV: a decode token, a chunk that continues
a prompt, a prefix-cache hit, the prefix part of a PCP prefill. The queries must be the same on
every rank of the cp group (same tokens; each rank has its own heads).

    dcp group (same KV heads, different query heads)     e.g. dcp = 2, 4 query heads per rank
      rank a: q heads 0-3 ─┐  all-gather Q over heads   ┌─> heads 0-7 over shard a ─┐
      rank b: q heads 4-7 ─┘                            └─> heads 0-7 over shard b ─┤
                                                                                   │
    all-gather (out, lse) over the cp group, LSE merge of the C partial results   │
    (weights exp(lse_i - lse)), then each rank keeps its own heads  <─────────────┘

MLA (`forms`, forms.py): the queries come expanded. Without DCP each rank holds all of its
heads' up-projections, so the backend reads its shard of the prefix expanded
(`latent_prefix_attention`, output in value space, merged over the shards as above). Under
DCP the prefix stays absorbed: the queries are gathered over the DCP group's heads, whose
kv_b_proj rows live on the other ranks, and absorbing before the gather (each rank with its
own W_UK) keeps the collective at the latent width without moving weights.
"""

from __future__ import annotations

import torch

from cpserve.attention.backend import AttentionBackend
from cpserve.attention.forms import SAME_FORMS, SameForms
from cpserve.attention.merge import merge_attention_states
from cpserve.distributed.groups import ParallelGroups, all_gather


def sharded_kv_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    block_tables: torch.Tensor,
    query_seq: torch.Tensor,
    query_kv_len: torch.Tensor,
    scale: float,
    groups: ParallelGroups,
    backend: AttentionBackend,
    v_dim: int | None = None,
    kv_scale: tuple[float, float] = (1.0, 1.0),
    plan=None,
    queries_per_seq: int = 1,
    forms: SameForms = SAME_FORMS,
    latent_plan=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H_local, D]; `query_kv_len` counts the visible tokens on THIS rank's shard.

    Returns out [N, H_local, D_v] and lse [N, H_local] over all shards. `v_cache=None`:
    values are `k_cache[..., :v_dim]` (latent attention). `kv_scale`: (k_scale, v_scale) of
    an FP8 cache. `plan`: the backend's plan of this call (rows and lengths only, so the
    same after the gather over heads). `queries_per_seq > 1` promises that the queries come
    in runs of that many per sequence (a verification step's padded layout, step_inputs.py),
    which the backend may use to read each sequence's KV once, with no plan made on the host
    (CUDA graphs replay it).

    `forms`: q in the forms' expanded form (MLA); the output is in value space
    ([N, H_local, forms.output_dim(v_dim)]). `latent_plan`: the backend's plan of the expanded
    prefix call, used when `reads_prefix_expanded`.
    """
    num_heads = q.shape[1]
    expanded = reads_prefix_expanded(forms, groups)
    if expanded:
        out, lse = backend.latent_prefix_attention(q, k_cache, block_tables, query_seq,
                                                   query_kv_len, scale, forms, kv_scale[0],
                                                   plan=latent_plan)
    else:
        q = all_gather(forms.cached_query(q), groups.dcp_group, dim=1)
        out, lse = backend.paged_attention(q, k_cache, v_cache, block_tables, query_seq,
                                           query_kv_len, scale, v_dim, *kv_scale, plan=plan,
                                           queries_per_seq=queries_per_seq)
    if groups.num_kv_shards > 1:
        # One collective carries both: [N, H, D] outputs with their [N, H] LSE as column D.
        packed = torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1).unsqueeze(0)
        parts = all_gather(packed, groups.cp_group, dim=0)  # [C, N, H, D + 1]
        out, lse = merge_attention_states(parts[..., :-1], parts[..., -1])
        out = out.to(q.dtype)
    if groups.dcp > 1:
        mine = slice(groups.dcp_rank * num_heads, (groups.dcp_rank + 1) * num_heads)
        out, lse = out[:, mine], lse[:, mine]
    return (out if expanded else forms.cached_output(out)), lse


def reads_prefix_expanded(forms: SameForms, groups: ParallelGroups) -> bool:
    """Whether the prefix is read in the expanded form (see above): not under DCP."""
    return forms.expand_prefix and groups.dcp == 1
