"""The decoder skeleton every supported model shares; models differ in attention and MLP.

    token ids -> vocab-parallel embedding
              -> layers: x + attn(norm(x)), then x + mlp(norm(x))   (pre-norm residual)
              -> final norm -> hidden states;  compute_logits: vocab-parallel LM head

Each residual add is done by the norm that follows it (`RMSNorm.add_and_norm`, one kernel on
CUDA): a layer returns its MLP output and the residual stream separately,

    layer i:  residual = residual + out_{i-1};  h = norm(residual)      (input_layernorm)
              residual = residual + attn(h);    h = norm(residual)      (post_attention_layernorm)
              out_i = mlp(h)
    final:    norm(residual + out_last)

which adds the same numbers in the same order as x + attn(...), x + mlp(...).

Module names are the checkpoints' (`model.layers.N.self_attn...`), so loading is a lookup
(merged projections name the checkpoint tensors they stack: layers.MergedColumnParallelLinear).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cpserve.attention.context import AttentionContext
from cpserve.config import ModelConfig
from cpserve.distributed.groups import ParallelGroups
from cpserve.models.layers import ParallelLMHead, RMSNorm, VocabParallelEmbedding
from cpserve.models.rope import StepPositions


def _eps(config: ModelConfig) -> float:
    return float(config.hf_config.get("rms_norm_eps", 1e-6))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, _eps(config), config.dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, _eps(config), config.dtype)
        self.mlp = mlp
        # MoE layers with expert parallelism need the step's token layout (moe.py).
        self.mlp_takes_context = getattr(mlp, "takes_step_context", False)

    def forward(self, positions: StepPositions, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream); `residual=None` for the first layer (x is it)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_and_norm(
            self.self_attn(positions, h, ctx), residual)
        return (self.mlp(h, ctx) if self.mlp_takes_context else self.mlp(h)), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, groups: ParallelGroups,
                 make_layer: Callable[[int], DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, groups.tp,
                                                   groups.tp_rank, groups.tp_group, config.dtype)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, _eps(config), config.dtype)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        x, residual = self.embed_tokens(token_ids), None
        step_positions = StepPositions(positions)
        for layer in self.layers:
            x, residual = layer(step_positions, x, residual, ctx)
        return self.norm.add_and_norm(x, residual)[0]


class CausalLM(nn.Module):
    """A decoder with its LM head (tied to the embedding when the config says so). Subclasses
    choose each layer's attention and MLP and say what one token's KV looks like."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups,
                 make_layer: Callable[[int], DecoderLayer]) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, groups, make_layer)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, groups.tp,
                                      groups.tp_rank, groups.tp_group, config.dtype)
        if config.hf_config.get("tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor,
                ctx: AttentionContext) -> torch.Tensor:
        """Final hidden states of the local tokens."""
        return self.model(token_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
