"""Architecture name (config.json's `architectures`) -> model class."""

from __future__ import annotations

from torch import nn


def model_class(architecture: str) -> type[nn.Module]:
    if architecture in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                        "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        from cpserve.models.llama import LlamaForCausalLM

        return LlamaForCausalLM
    if architecture in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"):
        from cpserve.models.deepseek_v2 import DeepseekV2ForCausalLM

        return DeepseekV2ForCausalLM
    raise ValueError(f"no model class for architecture {architecture!r}")
