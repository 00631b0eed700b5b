"""Llama-family decoder (Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE) with tensor-parallel layers.

Differences inside the family are switches, not subclasses:
  Qwen2: bias on q/k/v.   Qwen3: RMSNorm on each head of q and k, explicit head_dim.
  Llama, Qwen3: `attention_bias` adds bias on q/k/v/o.
  Qwen2-MoE (bias on q/k/v unless `qkv_bias` is false) and Qwen3-MoE (as Qwen3): the MLP of
  the sparse layers is a mixture of experts (moe.py); `mlp_only_layers` and
  `decoder_sparse_step` say which layers keep a dense MLP.

Parameter names are the checkpoint's, so loading is a lookup; the merged projections
(`qkv_proj`, `mlp.gate_up_proj`) name the checkpoint tensors they stack.
"""

from __future__ import annotations

import torch
from torch import nn

from cpserve.attention.context import AttentionContext
from cpserve.config import ModelConfig
from cpserve.distributed.groups import ParallelGroups
from cpserve.kv.spec import KVCacheSpec
from cpserve.models.decoder import CausalLM, DecoderLayer
from cpserve.models.layers import (
    GatedMLP,
    MergedColumnParallelLinear,
    RMSNorm,
    RowParallelLinear,
    sharded_parameter,
)
from cpserve.models.moe import MoE
from cpserve.models.rope import RotaryEmbedding, StepPositions

QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


def attention_biases(config: ModelConfig) -> tuple[bool, bool]:
    """(bias on q/k/v, bias on o) as the architecture's transformers module has them."""
    hf, arch = config.hf_config, config.architecture
    if arch == "Qwen2ForCausalLM":
        return True, False
    if arch == "Qwen2MoeForCausalLM":
        return bool(hf.get("qkv_bias", True)), False
    bias = bool(hf.get("attention_bias"))
    return bias, bias


def kv_heads_of_rank(num_kv_heads: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """(first KV head, count) held by a TP rank. With tp > num_kv_heads each head is
    replicated on tp // num_kv_heads consecutive ranks (these form the DCP groups)."""
    if tp <= num_kv_heads:
        per_rank = num_kv_heads // tp
        return tp_rank * per_rank, per_rank
    return tp_rank // (tp // num_kv_heads), 1


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, groups: ParallelGroups,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        hf, dtype = config.hf_config, config.dtype
        tp, tp_rank = groups.tp, groups.tp_rank
        self.layer = layer
        self.head_dim = d = config.head_dim
        self.num_heads = config.num_heads // tp
        first_kv, self.num_kv_heads = kv_heads_of_rank(config.num_kv_heads, tp, tp_rank)
        qkv_bias, o_bias = attention_biases(config)
        hidden = config.hidden_size
        q_rows, kv_rows = self.num_heads * d, self.num_kv_heads * d
        self.qkv_proj = MergedColumnParallelLinear(
            hidden, [("q_proj", q_rows, tp_rank * q_rows), ("k_proj", kv_rows, first_kv * d),
                     ("v_proj", kv_rows, first_kv * d)], dtype, qkv_bias)
        self.o_proj = RowParallelLinear(self.num_heads * d, hidden, tp_rank, groups.tp_group, dtype)
        if o_bias:  # added once, after the all-reduce
            self.o_proj.bias = sharded_parameter((hidden,), dtype)
        if config.architecture in QK_NORM_ARCHITECTURES:
            eps = float(hf.get("rms_norm_eps", 1e-6))
            self.q_norm = RMSNorm(d, eps, dtype)
            self.k_norm = RMSNorm(d, eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary  # one for all layers (see StepPositions)
        self.scale = d ** -0.5

    def forward(self, positions: StepPositions, x: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv_proj(x)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = ctx.attention(self.layer, q, k, v, self.scale)
        out = self.o_proj(out.reshape(tokens, -1))
        bias = getattr(self.o_proj, "bias", None)
        return out + bias if bias is not None else out


def llama_mlp(config: ModelConfig, groups: ParallelGroups) -> GatedMLP:
    return GatedMLP(config.hidden_size, int(config.hf_config["intermediate_size"]), groups,
                    config.dtype)


def is_sparse_layer(config: ModelConfig, layer: int) -> bool:
    """Qwen-MoE: a layer has experts unless listed in `mlp_only_layers`, every
    `decoder_sparse_step`-th layer counting from 1 (transformers' rule)."""
    hf = config.hf_config
    return (config.num_experts > 0 and layer not in (hf.get("mlp_only_layers") or [])
            and (layer + 1) % int(hf.get("decoder_sparse_step") or 1) == 0)


class LlamaForCausalLM(CausalLM):
    """Also serves Qwen2, Qwen3, Qwen2-MoE and Qwen3-MoE."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups) -> None:
        rotary = RotaryEmbedding(config.rope, config.head_dim,
                                 int(config.hf_config.get("max_position_embeddings", 2048)))

        def make_layer(layer: int) -> DecoderLayer:
            mlp = (MoE(config, groups) if is_sparse_layer(config, layer)
                   else llama_mlp(config, groups))
            return DecoderLayer(config, LlamaAttention(config, layer, groups, rotary), mlp)

        super().__init__(config, groups, make_layer)

    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.model.layers[0].self_attn
        return KVCacheSpec(attn.num_kv_heads, attn.head_dim, attn.head_dim, self.config.dtype)
