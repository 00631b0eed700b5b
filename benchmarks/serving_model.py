"""The model of the serving benchmark: a checkpoint directory with no weights (the engine makes
random ones, `--load-format dummy`) and a real tokenizer with exactly the model's vocabulary,
so every token id the random model samples decodes to text as it would with a real model.

    config.json             the Llama-3.1-8B shape (or a tiny one for --smoke), bf16
    tokenizer.json          byte-level BPE built here, no download:
                              ids 0..255      the 256 byte symbols
                              ids 256..       merges of two symbols, then of three, in a
                                              fixed order, until the vocabulary is full
                              bos / eos       the config's ids, as special tokens
    tokenizer_config.json   PreTrainedTokenizerFast, so transformers' AutoTokenizer loads it

The transformers prefill baseline uses the same shape with random bf16 weights on the GPU.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch

LLAMA_31_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False, torch_dtype="bfloat16")
# Seconds, not minutes, on two CPU cores: the whole pipeline, none of the speed.
TINY = dict(LLAMA_31_8B, vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096, bos_token_id=510, eos_token_id=511,
            rope_scaling=dict(LLAMA_31_8B["rope_scaling"], original_max_position_embeddings=512))


def build_tokenizer(vocab_size: int, bos_id: int, eos_id: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = {bos_id: "<|begin_of_text|>", eos_id: "<|end_of_text|>"}
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges = []
    pairs = itertools.chain(itertools.product(alphabet, alphabet),
                            ((a + b, c) for a, b in itertools.product(alphabet, alphabet)
                             for c in alphabet))
    next_id = len(vocab)
    while next_id < vocab_size:
        if next_id in specials:
            vocab[specials[next_id]] = next_id
        else:
            left, right = next(pairs)
            vocab[left + right] = next_id
            merges.append((left, right))
        next_id += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False)
                            for text in specials.values()])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def write_model_dir(path: Path, shape: dict, max_len: int) -> Path:
    """config.json and the tokenizer files for `shape` (LLAMA_31_8B or TINY), its positions
    extended to `max_len` (rope scaling reads the original length, so nothing else moves)."""
    path.mkdir(parents=True, exist_ok=True)
    shape = dict(shape, max_position_embeddings=max(max_len, shape["max_position_embeddings"]))
    (path / "config.json").write_text(json.dumps(shape))
    tok = build_tokenizer(shape["vocab_size"], shape["bos_token_id"], shape["eos_token_id"])
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False,
              "model_max_length": shape["max_position_embeddings"]}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def hf_prefill(shape: dict, token_counts: list[int], device: str) -> list[dict]:
    """Transformers' prefill time of one prompt per count (sdpa attention, logits of the last
    token only), after a warm-up; random bf16 weights made on the device."""
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in shape.items()
                                      if k not in ("architectures", "torch_dtype")})
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)

    def ttft(tokens: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1).logits.argmax(-1).tolist()
        return time.perf_counter() - start

    ttft(min(token_counts))  # warm-up: kernels, allocator
    results = []
    for tokens in token_counts:
        results.append(dict(tokens=tokens, ttft_s=ttft(tokens)))
        print(f"hf prefill {tokens}: {results[-1]['ttft_s']:.3f} s", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return results
