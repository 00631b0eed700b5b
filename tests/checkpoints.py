"""Tiny random-weight Hugging Face checkpoints that tests build with transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from cpserve.models.demo import ensure_tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

BASE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            initializer_range=0.08, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
            tie_word_embeddings=False)

ARCHITECTURES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500000.0)),
    "llama-yarn": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        tie_word_embeddings=True)),
    "llama-linear": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}

# DeepSeek (MLA + MoE): layer 0 dense, layer 1 MoE; 16 experts in 4 groups, 3 per token.
_DEEPSEEK = dict(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16, moe_intermediate_size=32, n_routed_experts=16,
                 num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1)
# mscale != mscale_all_dim: both YaRN's cos/sin factor and the softmax scale differ from 1.
_DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                  "original_max_position_embeddings": 128, "mscale": 1.0, "mscale_all_dim": 0.707}
ARCHITECTURES.update({
    "deepseek-v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5)),
    # Without q_lora, a kv_a bias keeps q_proj and kv_a_proj_with_mqa apart (two GEMMs).
    "deepseek-v2-bias": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, q_lora_rank=None, attention_bias=True, topk_method="greedy")),
    "deepseek-v2-qlora": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        _DEEPSEEK, q_lora_rank=48, topk_method="greedy", rope_parameters=_DEEPSEEK_YARN)),
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _DEEPSEEK, q_lora_rank=48, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_parameters=_DEEPSEEK_YARN)),
    "deepseek-v3-halves": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _DEEPSEEK, q_lora_rank=48, rope_interleave=False, attention_bias=True, n_group=4,
        topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.0)),
})

# Qwen-MoE: 8 experts, 2 per token. Qwen2-MoE: a gated shared expert, layer 1 dense
# (mlp_only_layers). Qwen3-MoE: q/k norms, renormalised top-k weights, every layer sparse.
_QWEN_MOE = dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
ARCHITECTURES.update({
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        _QWEN_MOE, shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        _QWEN_MOE, head_dim=32, norm_topk_prob=True)),
})


def make_checkpoint(path: Path, kind: str, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random `kind` model (see ARCHITECTURES) with the demo tokenizer; return its path."""
    import transformers

    config_cls, model_cls, extra = ARCHITECTURES[kind]
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(dtype).eval()
    model.save_pretrained(path)
    tiny = ensure_tiny_model()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny / name, path / name)
    return Path(path)


def make_deepseek_checkpoint(path: Path, kind: str, seed: int = 0, dtype=torch.float32,
                             bias_std: float = 0.1, **overrides) -> Path:
    """A DeepSeek `kind` checkpoint; V3's expert-choice correction biases (zeros when
    transformers initialises them) are drawn from N(0, bias_std) so that they matter."""
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(path, kind, seed, dtype, **overrides)
    weights_file = path / "model.safetensors"
    tensors = load_file(weights_file)
    g = torch.Generator().manual_seed(seed + 1)
    for name, tensor in tensors.items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.randn(tensor.shape, generator=g).to(tensor.dtype) * bias_std
    save_file(tensors, weights_file, metadata={"format": "pt"})
    return path


def make_poisoned_checkpoint(path: Path, token_id: int) -> Path:
    """A Llama checkpoint whose embedding row of `token_id` is infinite: any prompt holding
    that token gives non-finite logits, as a model overflowing in half precision would."""
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(path, "llama3")
    weights = load_file(path / "model.safetensors")
    weights["model.embed_tokens.weight"][token_id] = float("inf")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def load_hf_model(path: Path, dtype=torch.float32):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs from transformers, one prompt at a time."""
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 min_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=None)
            tokens = out[0, len(prompt):].tolist()
            logits = model(out).logits[0, len(prompt) - 1:-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None])
        results.append((tokens, logprobs.squeeze(1).tolist()))
    return results


def random_prompts(lengths: list[int], vocab: int = 1024, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, vocab, (n,), generator=g).tolist() for n in lengths]
