"""The attention call of one layer in one step, for every parallel layout.

Model code calls `ctx.attention(layer, q, k, v, scale)` and knows nothing of shards, PCP or
DCP. For each query the context computes attention over its request's new tokens (local for
replicated tokens, exchanged across PCP for split ones) and over the cached prefix (the
sharded-KV primitive), merges the two by LSE, and writes this rank's shard of the new KV.

With an FP8 cache (`kv_scales`, one (k_scale, v_scale) per layer) the new K/V are first
rounded to what the cache will hold, so every query sees the same K/V values whether they
come from this step or from the cache (cpserve/quantization/kv_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpserve.attention.backend import AttentionBackend
from cpserve.attention.merge import merge_two
from cpserve.attention.metadata import StepAttentionMetadata
from cpserve.attention.pcp import pcp_split_attention
from cpserve.attention.sharded import sharded_kv_attention
from cpserve.distributed.groups import ParallelGroups
from cpserve.quantization.kv_cache import fake_quantize


@dataclass
class AttentionContext:
    metadata: StepAttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache)
    groups: ParallelGroups
    backend: AttentionBackend
    kv_exchange: str = "allgather"
    kv_scales: list[tuple[float, float]] | None = None  # per layer, for an FP8 cache

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                  scale: float, v_dim: int | None = None) -> torch.Tensor:
        """q [T, H, D], k [T, H_kv, D], v [T, H_kv, D_v] for the local tokens; returns
        [T, H, D_v]. Latent attention passes `v=None` and `v_dim`: the values are the first
        `v_dim` channels of the keys, and the layer's cache holds them once."""
        meta, backend = self.metadata, self.backend
        k_cache, v_cache = self.kv_caches[layer]
        v_dim = v.shape[-1] if v is not None else v_dim
        kv_scale = (1.0, 1.0)
        if self.kv_scales is not None:
            kv_scale = self.kv_scales[layer]
            k = fake_quantize(k, kv_scale[0])
            v = None if v is None else fake_quantize(v, kv_scale[1])
        if not meta.has_split:  # the common case: decodes and unsplit chunks only
            return self._replicated(q, k, v, k_cache, v_cache, scale, v_dim, kv_scale)
        out = q.new_empty(*q.shape[:2], v_dim)
        if meta.has_replicated:
            rows = meta.rep_index
            out[rows] = self._replicated(q[rows], k[rows], _rows(v, rows), k_cache, v_cache,
                                         scale, v_dim, kv_scale)
        rows = meta.split_index
        out[rows] = pcp_split_attention(q[rows], k[rows], _rows(v, rows), k_cache, v_cache,
                                        meta, scale, self.groups, backend, self.kv_exchange,
                                        v_dim, kv_scale)
        return out

    def _replicated(self, q, k, v, k_cache, v_cache, scale, v_dim, kv_scale) -> torch.Tensor:
        meta, backend = self.metadata, self.backend
        backend.write_kv(k, v, k_cache, v_cache, meta.rep_slots, *kv_scale)
        if meta.rep_decode_only:
            out, _ = sharded_kv_attention(q, k_cache, v_cache, meta.block_tables, meta.rep_seq,
                                          meta.rep_kv_len, scale, self.groups, backend, v_dim,
                                          kv_scale)
            return out
        values = v if v is not None else k[..., :v_dim]
        out, lse = backend.dense_attention(q, k, values, meta.rep_pos, meta.rep_pos,
                                           meta.rep_seq, meta.rep_seq, scale)
        if meta.has_rep_prefix:
            prefix_out, prefix_lse = sharded_kv_attention(q, k_cache, v_cache, meta.block_tables, meta.rep_seq,
                                        meta.rep_prefix_len, scale, self.groups, backend, v_dim,
                                        kv_scale)
            out, _ = merge_two(out, lse, prefix_out, prefix_lse)
        return out


def _rows(x: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x[rows]
