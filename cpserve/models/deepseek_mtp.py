"""DeepSeek-V3's multi-token prediction (MTP) modules, the drafter of speculative decoding.

Module i sits in the checkpoint after the main layers, as `model.layers.{L + i}` (L =
num_hidden_layers, i < num_nextn_predict_layers), and reads the main model's embeddings:

    h_p   the main model's final hidden state at position p (after its norm)
    t     the token at position p + 1
    x   = eh_proj([enorm(embed(t)), hnorm(h_p)])        2 * hidden -> hidden, replicated
    h'  = one decoder layer (MLA attention + MLP or MoE) over x, at position p,
          attending to the module's own KV cache      (a cache laid out like the main ones)
    logits = shared_head.head(shared_head.norm(h'))   predicts the token at position p + 2

A further draft feeds h' back as h with the draft as t, one position on; with K drafts and
fewer modules the modules are used in turn (module (k - 1) % n for the k-th draft), as
vLLM does. Module i's attention is layer L + i, so its KV cache is kv_caches[L + i].
"""

from __future__ import annotations

import torch
from torch import nn

from cpserve.attention.context import AttentionContext
from cpserve.config import ModelConfig
from cpserve.distributed.groups import ParallelGroups
from cpserve.models.decoder import DecoderLayer
from cpserve.models.deepseek_v2 import ReplicatedLinear, deepseek_layer_parts, deepseek_rope
from cpserve.models.layers import ParallelLMHead, RMSNorm
from cpserve.models.rope import StepPositions
from cpserve.spec_decode.config import num_mtp_modules


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig, groups: ParallelGroups, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps, config.dtype)
        self.head = ParallelLMHead(config.vocab_size, config.hidden_size, groups.tp,
                                   groups.tp_rank, groups.tp_group, config.dtype)


class MTPLayer(DecoderLayer):
    """One MTP module: the decoder layer's parts under the checkpoint's names
    (`input_layernorm`, `self_attn`, `mlp`, ...) plus enorm, hnorm, eh_proj, shared_head."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups, layer: int, rope) -> None:
        super().__init__(config, *deepseek_layer_parts(config, groups, layer, rope))
        hidden, dtype = config.hidden_size, config.dtype
        eps = float(config.hf_config.get("rms_norm_eps", 1e-6))
        self.enorm = RMSNorm(hidden, eps, dtype)
        self.hnorm = RMSNorm(hidden, eps, dtype)
        self.eh_proj = ReplicatedLinear(2 * hidden, hidden, dtype)
        self.shared_head = SharedHead(config, groups, eps)

    def forward(self, positions: StepPositions, embeds: torch.Tensor,
                previous_hidden: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """h' before the shared head's norm (what a further draft reads as h)."""
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(previous_hidden)], dim=-1))
        out, residual = super().forward(positions, x, None, ctx)
        return out + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(self.shared_head.norm(hidden))


class DeepseekMTP(nn.Module):
    """The checkpoint's MTP modules, named as stored (`model.layers.{L + i}.*`)."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups) -> None:
        super().__init__()
        first, count = config.num_layers, num_mtp_modules(config.hf_config)
        rope = deepseek_rope(config)
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(first + i): MTPLayer(config, groups, first + i,
                                                                    rope)
                                           for i in range(count)})
        self.first_layer, self.num_modules = first, count

    def module_for(self, draft_index: int) -> MTPLayer:
        """The module that makes draft `draft_index` (0-based) of a step."""
        return self.model.layers[str(self.first_layer + draft_index % self.num_modules)]
