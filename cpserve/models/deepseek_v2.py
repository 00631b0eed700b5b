"""DeepSeek-V2 / V3 decoder: multi-head latent attention (MLA) and mixture of experts.

MLA caches one vector per token and layer, shared by all heads:

    c  = RMSNorm(x W_DKV)            latent, kv_lora_rank channels          ─┐ the cache "head":
    kr = RoPE(x W_KR)                rope key, qk_rope_head_dim channels     ─┘ [c, kr]
    head h:  k_h = [c W_UK_h, kr]    v_h = c W_UV_h            (W_UK, W_UV: rows of kv_b_proj)

Decodes and short steps never expand the keys. The key up-projection is absorbed into the
query, the value up-projection applied after attention, so every score and every value is read
from the cache:

    q_h . k_h = (q_nope_h W_UK_h^T) . c + q_rope_h . kr      ->  query [q_nope_h W_UK_h^T, q_rope_h]
    out_h     = (sum_t p_t c_t) W_UV_h^T                      ->  attention over values = c

so the layer calls `ctx.attention(q [T, H_local, L + R], k [T, 1, L + R], v=None, v_dim=L)`,
where the values are the first L channels of the keys. The same path serves decode and short
steps. Steps of MLA_EXPANDED_MIN_TOKENS new tokens or more take the expanded form instead
(cpserve/attention/forms.py): fewer FLOPs per score, head dims the library ops take; their
cached prefix too is read expanded (MLA_EXPANDED_PREFIX), except under DCP.

Tensor parallel splits heads (q, kv_b_proj, o_proj) and experts' intermediate dims; the latent
projection is replicated, so every TP rank computes the same latent. Under DCP the ranks of a
DCP group store different tokens of it; the attention context does the rest.

RoPE: DeepSeek rotates channel pairs (2i, 2i+1) (transformers' V2, and V3 with
`rope_interleave`); V3 with `rope_interleave=false` rotates halves. Query and key get the same
permutation of their rope channels, so the scores do not depend on it.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from cpserve.attention.context import AttentionContext
from cpserve.attention.forms import LatentForms, absorb_query, latent_to_values
from cpserve.config import ModelConfig
from cpserve.distributed.groups import ParallelGroups
from cpserve.kv.spec import KVCacheSpec
from cpserve.models.decoder import CausalLM, DecoderLayer
from cpserve.models.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    sharded_parameter,
)
from cpserve.models.llama import llama_mlp
from cpserve.models.moe import MoE
from cpserve.models.rope import RotaryEmbedding, StepPositions, apply_rope

# transformers' and DeepSeek's q_a_layernorm / kv_a_layernorm keep the default eps.
LATENT_NORM_EPS = 1e-6
# Tuning constant: steps with at least this many new tokens attend to them in the expanded
# form (benchmarks/bench_moe.py measures the crossover and prints it). The environment
# variable overrides it (tests use it to put short prompts through the expanded path).
MLA_EXPANDED_MIN_TOKENS = 2048  # one H200, 2026-12-01 (RESULTS.md, run 6)


# Whether those steps also read their cached prefix expanded (gathered, up-projected, library
# attention: cpserve/attention/latent_prefix.py) rather than absorbed in the paged kernel.
# False, or CPSERVE_MLA_EXPANDED_PREFIX=0, selects the absorbed prefix (benchmarks/
# bench_mla_prefix.py runs both in one process). DCP always reads it absorbed (sharded.py).
MLA_EXPANDED_PREFIX = True


def expanded_min_tokens() -> int:
    return int(os.environ.get("CPSERVE_MLA_EXPANDED_MIN_TOKENS", MLA_EXPANDED_MIN_TOKENS))


def expanded_prefix() -> bool:
    value = os.environ.get("CPSERVE_MLA_EXPANDED_PREFIX")
    return MLA_EXPANDED_PREFIX if value is None else value not in ("0", "false", "")


def step_new_tokens(ctx: AttentionContext) -> int:
    """New tokens of the step, the same count on every rank (replicated rows plus every PCP
    rank's padded share of the split ones), so all ranks pick the same form."""
    meta = ctx.metadata
    return meta.rep_index.numel() + ctx.groups.pcp * meta.pad


def softmax_scale(qk_head_dim: int, rope: dict) -> float:
    """qk_head_dim^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 for scaled ropes."""
    scale = qk_head_dim ** -0.5
    mscale_all_dim = rope.get("mscale_all_dim")
    if rope.get("rope_type", "default") != "default" and mscale_all_dim:
        factor = float(rope["factor"])
        mscale = 1.0 if factor <= 1 else 0.1 * float(mscale_all_dim) * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


class DeepseekRope(nn.Module):
    """RoPE on the rope channels of q [T, H, R] and k [T, 1, R], computed in fp32."""

    def __init__(self, config: ModelConfig, rope_dim: int, interleaved: bool) -> None:
        super().__init__()
        max_pos = int(config.hf_config.get("max_position_embeddings", 2048))
        self.rotary = RotaryEmbedding(config.rope, rope_dim, max_pos)
        self.interleaved = interleaved

    def forward(self, positions: StepPositions, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.interleaved:
            return self.rotary(positions, q, k)
        # Pair i = channels (2i, 2i+1), rotated by angle i; output [all firsts, all seconds].
        cos, sin = positions.cos_sin(self.rotary, torch.float32)
        dim = self.rotary.rotary_dim
        return apply_rope(q, cos, sin, dim, True), apply_rope(k, cos, sin, dim, True)


class MLAAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, groups: ParallelGroups,
                 rope: DeepseekRope) -> None:
        super().__init__()
        hf, dtype, hidden = config.hf_config, config.dtype, config.hidden_size
        tp, tp_rank = groups.tp, groups.tp_rank
        self.layer = layer
        self.num_heads = h = config.num_heads // tp
        self.nope = int(hf["qk_nope_head_dim"])
        self.rope_dim = int(hf["qk_rope_head_dim"])
        self.v_head_dim = int(hf["v_head_dim"])
        self.kv_lora_rank = int(hf["kv_lora_rank"])
        qk = self.nope + self.rope_dim
        bias = bool(hf.get("attention_bias", False))
        first_head = tp_rank * h
        q_lora_rank = int(hf.get("q_lora_rank") or 0)
        latent_rows = self.kv_lora_rank + self.rope_dim
        if q_lora_rank:
            q_part = ("q_a_proj", q_lora_rank, 0)
            self.q_a_layernorm = RMSNorm(q_lora_rank, LATENT_NORM_EPS, dtype)
            self.q_b_proj = ColumnParallelLinear(q_lora_rank, h * qk, first_head * qk, dtype)
        else:
            q_part = ("q_proj", h * qk, first_head * qk)
        self.q_lora = bool(q_lora_rank)
        # The projections that read x run as one GEMM (decode pays per launch): q_a (or this
        # rank's rows of q) stacked on kv_a. Without q_lora, a kv_a bias (q_proj has none)
        # keeps them apart.
        self.fused_qkv_a_proj = self.q_proj = self.kv_a_proj_with_mqa = None
        if q_lora_rank or not bias:
            self.fused_qkv_a_proj = MergedColumnParallelLinear(
                hidden, [q_part, ("kv_a_proj_with_mqa", latent_rows, 0)], dtype, bias)
        else:
            self.q_proj = ColumnParallelLinear(hidden, h * qk, first_head * qk, dtype)
            self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, latent_rows, dtype, bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, dtype)
        per_head = self.nope + self.v_head_dim
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, h * per_head,
                                              first_head * per_head, dtype)
        self.kv_b_proj.quantizable = False  # its weight is read: absorbed, or LatentForms
        self.o_proj = RowParallelLinear(h * self.v_head_dim, hidden, tp_rank, groups.tp_group,
                                        dtype)
        if bias:  # added once, after the all-reduce
            self.o_proj.bias = sharded_parameter((hidden,), dtype)
        self.rope = rope  # one for all layers (see StepPositions)
        self.scale = softmax_scale(qk, config.rope)

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, L] and W_UV [H, v, L] of this rank's heads (views of kv_b_proj)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_head_dim,
                                       self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope:]

    def forward(self, positions: StepPositions, x: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        tokens, latent_dim = x.shape[0], self.kv_lora_rank
        if self.fused_qkv_a_proj is not None:
            q, latent_and_rope = self.fused_qkv_a_proj(x)
        else:
            q, latent_and_rope = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_rope = q.view(tokens, self.num_heads, -1).split([self.nope, self.rope_dim], -1)
        latent, k_rope = latent_and_rope.split([latent_dim, self.rope_dim], -1)
        latent = self.kv_a_layernorm(latent)
        q_rope, k_rope = self.rope(positions, q_rope, k_rope.unsqueeze(1))

        key = torch.cat([latent.unsqueeze(1), k_rope], -1)  # [T, 1, L + R]: what is cached
        if not ctx.metadata.rep_decode_only and step_new_tokens(ctx) >= expanded_min_tokens():
            forms = LatentForms(self.kv_b_proj.weight, self.num_heads, self.nope,
                                self.v_head_dim, latent_dim, expand_prefix=expanded_prefix())
            out = ctx.attention(self.layer, torch.cat([q_nope, q_rope], -1), key, None,
                                self.scale, v_dim=latent_dim, forms=forms)  # [T, H, v]
        else:
            w_uk, w_uv = self._up_projections()
            out = ctx.attention(self.layer, absorb_query(q_nope, q_rope, w_uk), key, None,
                                self.scale, v_dim=latent_dim)  # [T, H, L]
            out = latent_to_values(out, w_uv)  # [T, H, v]
        out = self.o_proj(out.reshape(tokens, -1))
        bias = getattr(self.o_proj, "bias", None)
        return out + bias if bias is not None else out


def is_moe_layer(hf: dict, layer: int) -> bool:
    return (bool(hf.get("n_routed_experts")) and layer >= int(hf.get("first_k_dense_replace") or 0)
            and layer % int(hf.get("moe_layer_freq") or 1) == 0)


def deepseek_rope(config: ModelConfig) -> DeepseekRope:
    hf = config.hf_config
    interleaved = (config.architecture == "DeepseekV2ForCausalLM"
                   or bool(hf.get("rope_interleave", True)))
    return DeepseekRope(config, int(hf["qk_rope_head_dim"]), interleaved)


def deepseek_layer_parts(config: ModelConfig, groups: ParallelGroups, layer: int,
                         rope: DeepseekRope) -> tuple[MLAAttention, nn.Module]:
    """(attention, MLP or MoE) of decoder layer `layer` (the MTP modules' too)."""
    mlp = (MoE(config, groups) if is_moe_layer(config.hf_config, layer)
           else llama_mlp(config, groups))
    return MLAAttention(config, layer, groups, rope), mlp


class DeepseekV2ForCausalLM(CausalLM):
    """Serves DeepseekV2ForCausalLM and DeepseekV3ForCausalLM checkpoints. V3's multi-token
    prediction modules, stored after the last layer, are loaded only as the drafter of
    speculative decoding (deepseek_mtp.py)."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups) -> None:
        rope = deepseek_rope(config)

        def make_layer(layer: int) -> DecoderLayer:
            return DecoderLayer(config, *deepseek_layer_parts(config, groups, layer, rope))

        super().__init__(config, groups, make_layer)

    def kv_cache_spec(self) -> KVCacheSpec:
        """One cache head per token: [latent, rope key]; the values are the latent channels."""
        attn = self.model.layers[0].self_attn
        return KVCacheSpec(1, attn.kv_lora_rank + attn.rope_dim, None, self.config.dtype)
