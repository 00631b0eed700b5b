"""Llama-family decoder (Llama, Qwen2, Qwen3) with tensor-parallel layers.

Differences inside the family are switches, not subclasses:
  Qwen2: bias on q/k/v.   Qwen3: RMSNorm on each head of q and k, explicit head_dim.
  Llama: `attention_bias` adds bias on q/k/v/o.

Parameter names are the checkpoint's, so loading is a lookup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cpserve.attention.context import AttentionContext
from cpserve.config import ModelConfig
from cpserve.distributed.groups import ParallelGroups
from cpserve.kv.spec import KVCacheSpec
from cpserve.models.decoder import CausalLM, DecoderLayer
from cpserve.models.layers import (
    ColumnParallelLinear,
    RMSNorm,
    RowParallelLinear,
    sharded_parameter,
)
from cpserve.models.rope import RotaryEmbedding


def kv_heads_of_rank(num_kv_heads: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """(first KV head, count) held by a TP rank. With tp > num_kv_heads each head is
    replicated on tp // num_kv_heads consecutive ranks (these form the DCP groups)."""
    if tp <= num_kv_heads:
        per_rank = num_kv_heads // tp
        return tp_rank * per_rank, per_rank
    return tp_rank // (tp // num_kv_heads), 1


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, groups: ParallelGroups) -> None:
        super().__init__()
        hf, dtype = config.hf_config, config.dtype
        tp, tp_rank = groups.tp, groups.tp_rank
        self.layer = layer
        self.head_dim = d = config.head_dim
        self.num_heads = config.num_heads // tp
        first_kv, self.num_kv_heads = kv_heads_of_rank(config.num_kv_heads, tp, tp_rank)
        qkv_bias = config.architecture == "Qwen2ForCausalLM" or bool(hf.get("attention_bias"))
        hidden = config.hidden_size
        self.q_proj = ColumnParallelLinear(hidden, self.num_heads * d, tp_rank * self.num_heads * d,
                                           dtype, qkv_bias)
        self.k_proj = ColumnParallelLinear(hidden, self.num_kv_heads * d, first_kv * d, dtype, qkv_bias)
        self.v_proj = ColumnParallelLinear(hidden, self.num_kv_heads * d, first_kv * d, dtype, qkv_bias)
        self.o_proj = RowParallelLinear(self.num_heads * d, hidden, tp_rank, groups.tp_group, dtype)
        if config.architecture == "LlamaForCausalLM" and hf.get("attention_bias"):
            self.o_proj.bias = sharded_parameter((hidden,), dtype)
        if config.architecture == "Qwen3ForCausalLM":
            eps = float(hf.get("rms_norm_eps", 1e-6))
            self.q_norm = RMSNorm(d, eps, dtype)
            self.k_norm = RMSNorm(d, eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = RotaryEmbedding(config.rope, d, int(hf.get("max_position_embeddings", 2048)))
        self.scale = d ** -0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = ctx.attention(self.layer, q, k, v, self.scale)
        out = self.o_proj(out.reshape(tokens, -1))
        bias = getattr(self.o_proj, "bias", None)
        return out + bias if bias is not None else out


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, groups: ParallelGroups) -> None:
        super().__init__()
        inter = int(config.hf_config["intermediate_size"]) // groups.tp
        start = groups.tp_rank * inter
        hidden, dtype = config.hidden_size, config.dtype
        self.gate_proj = ColumnParallelLinear(hidden, inter, start, dtype)
        self.up_proj = ColumnParallelLinear(hidden, inter, start, dtype)
        self.down_proj = RowParallelLinear(inter, hidden, groups.tp_rank, groups.tp_group, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaForCausalLM(CausalLM):
    """Also serves Qwen2ForCausalLM and Qwen3ForCausalLM."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups) -> None:
        super().__init__(config, groups, lambda layer: DecoderLayer(
            config, LlamaAttention(config, layer, groups), LlamaMLP(config, groups)))

    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.model.layers[0].self_attn
        return KVCacheSpec(attn.num_kv_heads, attn.head_dim, attn.head_dim, self.config.dtype)
