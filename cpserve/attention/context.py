"""The attention call of one layer in one step, for every parallel layout.

Model code calls `ctx.attention(layer, q, k, v, scale)` and knows nothing of shards, PCP or
DCP. For each query the context computes attention over its request's new tokens (local for
replicated tokens, exchanged across PCP for split ones) and over the cached prefix (the
sharded-KV primitive), merges the two by LSE, and writes this rank's shard of the new KV.

With an FP8 cache (`kv_scales`, one (k_scale, v_scale) per layer) the new K/V are first
rounded to what the cache will hold, so every query sees the same K/V values whether they
come from this step or from the cache (cpserve/quantization/kv_cache.py); each call that
reads the cache gets the layer's scales.

`plans` is what the backend prepared for this step's calls on the host before the layers
(`AttentionBackend.plan_step`); each call gets its own part.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from cpserve.attention.backend import AttentionBackend, StepPlans
from cpserve.attention.forms import SAME_FORMS, SameForms
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
    plans: StepPlans = field(default_factory=StepPlans)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
                  scale: float, v_dim: int | None = None,
                  forms: SameForms = SAME_FORMS) -> torch.Tensor:
        """q [T, H, D], k [T, H_kv, D], v [T, H_kv, D_v] for the local tokens; returns
        [T, H, D_v]. Latent attention passes `v=None` and `v_dim`: the values are the first
        `v_dim` channels of the keys, and the layer's cache holds them once. `forms` (see
        forms.py) may give the paged and the dense parts different forms of q, k and v (MLA
        expanded: q is expanded, the output [T, H, forms.output_dim(v_dim)])."""
        meta, backend = self.metadata, self.backend
        k_cache, v_cache = self.kv_caches[layer]
        v_dim = v.shape[-1] if v is not None else v_dim
        kv_scale = (1.0, 1.0)
        if self.kv_scales is not None:
            kv_scale = self.kv_scales[layer]
            k = fake_quantize(k, kv_scale[0])
            v = None if v is None else fake_quantize(v, kv_scale[1])
        if not meta.has_split:  # the common case: decodes and unsplit chunks only
            return self._replicated(q, k, v, k_cache, v_cache, scale, v_dim, forms, kv_scale)
        out = q.new_empty(*q.shape[:2], forms.output_dim(v_dim))
        if meta.has_replicated:
            rows = meta.rep_index
            out[rows] = self._replicated(q[rows], k[rows], _rows(v, rows), k_cache, v_cache,
                                         scale, v_dim, forms, kv_scale)
        rows = meta.split_index
        out[rows] = pcp_split_attention(q[rows], k[rows], _rows(v, rows), k_cache, v_cache,
                                        meta, scale, self.groups, backend, self.kv_exchange,
                                        v_dim, self.plans, forms, kv_scale)
        return out

    def _replicated(self, q, k, v, k_cache, v_cache, scale, v_dim, forms,
                    kv_scale) -> torch.Tensor:
        meta, backend, plans = self.metadata, self.backend, self.plans
        backend.write_kv(k, v, k_cache, v_cache, meta.rep_slots, *kv_scale)
        if meta.rep_decode_only:
            out, _ = sharded_kv_attention(q, k_cache, v_cache, meta.block_tables, meta.rep_seq,
                                          meta.rep_kv_len, scale, self.groups, backend, v_dim,
                                          kv_scale, forms=_absorbed(forms),
                                          queries_per_seq=meta.rep_queries_per_seq)
            return out
        # The new tokens' expanded K/V are freed before the prefix part, whose own expanded
        # pieces then fit where these were (the start-up profile measures a step of new
        # tokens: model_runner.py).
        out, lse = backend.dense_attention(q, *forms.new_kv(k, v, v_dim), meta.rep_pos,
                                           meta.rep_pos, meta.rep_seq, meta.rep_seq, scale,
                                           plan=plans.rep_dense)
        if meta.has_rep_prefix:
            prefix_out, prefix_lse = sharded_kv_attention(
                q, k_cache, v_cache, meta.block_tables, meta.rep_seq, meta.rep_prefix_len,
                scale, self.groups, backend, v_dim, kv_scale, plan=plans.rep_prefix,
                forms=forms, latent_plan=plans.rep_latent_prefix)
            out, _ = backend.merge_two(out, lse, prefix_out, prefix_lse)
        return out


def _absorbed(forms: SameForms) -> SameForms:
    """Decode rows read the cache absorbed: one query per sequence, nothing to expand for."""
    return dataclasses.replace(forms, expand_prefix=False) if forms.expand_prefix else forms


def _rows(x: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if x is None else x[rows]
