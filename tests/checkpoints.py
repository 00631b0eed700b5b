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


def greedy_with_logprobs(llm, lengths: list[int], new_tokens: int
                         ) -> list[tuple[list[int], list[float]]]:
    """The engine's greedy tokens and their logprobs for `random_prompts(lengths)`, after which
    the engine's KV bookkeeping must be intact (what the layout tests compare)."""
    from cpserve import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(lengths)]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_integrity()
    return [(o.outputs[0].token_ids,
             [o.outputs[0].logprobs[i][t].logprob for i, t in enumerate(o.outputs[0].token_ids)])
            for o in outputs]


def random_prompts(lengths: list[int], vocab: int = 1024, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, vocab, (n,), generator=g).tolist() for n in lengths]


def add_mtp_modules(path: Path, count: int = 1, seed: int = 0) -> Path:
    """Give a DeepSeek-V3 checkpoint `count` multi-token prediction modules, as DeepSeek
    stores them (transformers neither makes nor runs them): `model.layers.{L + i}.*` holds a
    decoder layer shaped like the last one (random weights drawn like it), enorm, hnorm,
    eh_proj [hidden, 2 * hidden], shared_head.norm, shared_head.head and a copy of the
    embedding; config.json gets num_nextn_predict_layers."""
    import json

    from safetensors.torch import load_file, save_file

    config = json.loads((path / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    weights = load_file(path / "model.safetensors")
    g = torch.Generator().manual_seed(seed + 2)
    last = f"model.layers.{layers - 1}."
    for i in range(count):
        prefix = f"model.layers.{layers + i}."
        for name, tensor in list(weights.items()):
            if name.startswith(last):
                fresh = torch.randn(tensor.shape, generator=g) * tensor.float().std().nan_to_num(0.02)
                if name.endswith("norm.weight"):
                    fresh = 1 + 0.1 * torch.randn(tensor.shape, generator=g)
                weights[prefix + name[len(last):]] = fresh.to(tensor.dtype)
        dtype = weights["model.embed_tokens.weight"].dtype
        for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
            weights[prefix + name] = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
        weights[prefix + "eh_proj.weight"] = (0.08 * torch.randn(hidden, 2 * hidden,
                                                                 generator=g)).to(dtype)
        weights[prefix + "shared_head.head.weight"] = weights["lm_head.weight"].clone()
        weights[prefix + "embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = count
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def make_successor_checkpoint(path: Path, mtp_checkpoint: Path) -> tuple[Path, torch.Tensor]:
    """A model whose greedy next token is succ(t) for the current token t (attention and MLP
    outputs zeroed, the LM head the embedding permuted), and an MTP module that, reading the
    next token's embedding, predicts the one after it: its drafts are always right."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(mtp_checkpoint, path)
    weights = load_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    vocab, hidden, layers = config["vocab_size"], config["hidden_size"], \
        config["num_hidden_layers"]
    embed = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(5))
    succ = (torch.arange(vocab) * 7 + 3) % vocab  # a permutation (7 is prime to 1024)
    head = torch.empty(vocab, hidden)
    head[succ] = embed
    for name in list(weights):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])
        elif name.endswith("norm.weight"):
            weights[name] = torch.ones_like(weights[name])
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = head
    weights[f"model.layers.{layers}.shared_head.head.weight"] = head.clone()
    # The module reads enorm(embed(next token)) only: h' = that, so logits peak at succ(next).
    weights[f"model.layers.{layers}.eh_proj.weight"] = torch.cat(
        [torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path, succ
