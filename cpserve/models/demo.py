"""The built-in demo model `tiny`: a small random-weight Llama checkpoint built on first use.

`--model tiny` must work on a machine with no network and no checkpoint, for tests, CI and a
first try of the server. So the checkpoint is generated locally, in Hugging Face format, and
is byte-identical on every build: parallel ranks, separate machines and tests that compare
us with transformers all see the same model.

    <cache>/tiny-v1/
      config.json               LlamaForCausalLM, 4 layers, hidden 128, GQA 8 query heads / 1 KV head
      generation_config.json    eos ids
      model.safetensors         fp32 weights from a fixed seed, transformers' parameter names
      tokenizer.json            byte-level BPE, 1024 tokens, trained on the corpus below
      tokenizer_config.json     special tokens and the chat template
      special_tokens_map.json

Bump `TINY_VERSION` whenever anything written here changes, so stale caches are not reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

TINY_NAME = "tiny"
TINY_VERSION = "tiny-v1"
_SEED = 20240611
_INIT_STD = 0.02

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot|>"
SPECIAL_TOKENS = [BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>", EOT]
TOKENIZER_VOCAB_SIZE = 1024

# Llama-3 style: the template writes the BOS itself, so a rendered chat is encoded with
# add_special_tokens=False. A turn is `<|role|>\n{content}<|eot|>\n`. Content may be a string
# or a list of OpenAI-style parts, of which the text parts are kept.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('tiny: unknown role ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|eot|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# Training text for the tokenizer. Plain English about everyday things and about serving
# language models, plus one line of accented, CJK and emoji text so that some learned tokens
# hold partial UTF-8 characters (what the incremental detokenizer must cope with).
_CORPUS_PARAGRAPHS = [
    "The morning train left the station a few minutes late. Most of the passengers were "
    "reading, some were asleep, and a small child by the window counted the cows in every "
    "field they passed. When the conductor walked through the carriage, she checked each "
    "ticket with a quick nod and a word about the weather.",
    "A language model reads a sequence of tokens and predicts the next one. To answer a long "
    "question it must first read the whole prompt, which is called prefill, and then write "
    "the answer one token at a time, which is called decode. Prefill is limited by compute; "
    "decode is limited by how fast the keys and values can be read from memory.",
    "When the prompt is very long, one device is not enough. The tokens of the prompt can be "
    "split across several devices, so that each of them computes attention for its own part "
    "of the sequence. The partial results are merged with the log of the sum of exponentials, "
    "which keeps the answer exact and the numbers stable.",
    "Bread is simple to make at home. Mix flour, water, salt and a little yeast, knead the "
    "dough until it is smooth, and leave it covered in a warm place until it has doubled in "
    "size. Shape the loaf, let it rise again, and bake it in a hot oven until the crust is "
    "brown and the bottom sounds hollow when you tap it.",
    "The old library had tall windows, wooden shelves and a quiet reading room on the second "
    "floor. Students came early to find a good seat. The librarian knew where every book was, "
    "even the ones that had been put back on the wrong shelf years ago.",
    "A server that answers many users at once keeps a queue of requests. A scheduler decides, "
    "at every step, which requests run and how many tokens each of them gets. Memory for the "
    "cache is handed out in fixed blocks, and a block that holds a common prefix can be shared "
    "by several requests instead of being computed again.",
    "In the autumn the leaves turn yellow, orange and red, and the wind carries them across "
    "the road. Farmers bring in the last of the harvest, and the evenings grow shorter and "
    "colder. Many people like to walk in the park, drink something warm and watch the light "
    "change over the hills.",
    "Numbers appear everywhere: 1, 2, 3, 10, 42, 100, 256, 1024, 4096 and 32768. A date such "
    "as 2024-06-11, a time such as 09:30, a price such as $19.99 and a ratio such as 3/4 are "
    "all written with digits and a few symbols. Code uses brackets, quotes and operators: "
    "x = f(a, b) + [1, 2] * 3; if x > 0: print('ok').",
    "The river starts as a small stream high in the mountains. It gathers water from rain and "
    "melting snow, grows wider as it flows through forests and towns, and finally reaches the "
    "sea. Along the way it turns mills, feeds fields and gives fish and birds a place to live.",
    "Good software is tested often. Each part has a small test that runs in a few seconds, "
    "and the whole system is compared with a trusted reference. When a test fails, the first "
    "question is not who broke it but what changed, and the answer is usually in the last few "
    "lines that were written.",
    "Café, naïve, façade, résumé and jalapeño keep their accents. 東京 and 日本語 are written "
    "in other scripts, and a smile 😀 or a rocket 🚀 is a single character of four bytes.",
]


def _corpus() -> list[str]:
    """The training lines: each paragraph, its sentences, and lower- and upper-case variants.

    The variants are deterministic and give the trainer enough distinct words to learn a
    1024-token vocabulary from a few paragraphs of text.
    """
    lines = []
    for paragraph in _CORPUS_PARAGRAPHS:
        lines.append(paragraph)
        lines.extend(sentence.strip() + "." for sentence in paragraph.split(". ") if sentence)
        lines.append(paragraph.lower())
        lines.append(paragraph.upper())
    return lines


def build_tokenizer() -> Tokenizer:
    """Train the tiny byte-level BPE tokenizer; special tokens get ids 0..5."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size(with_added_tokens=True) != TOKENIZER_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, "
                           f"expected {TOKENIZER_VOCAB_SIZE}: the corpus is too small")
    # Like Llama 3: encode(text) starts with BOS unless add_special_tokens=False.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def _tokenizer_files(tok: Tokenizer) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, as text."""
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "added_tokens_decoder": added,
        # The role and turn markers are special too, so skip_special_tokens drops them.
        "additional_special_tokens": SPECIAL_TOKENS[2:],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 4096,
    }
    special_map = {"bos_token": BOS, "eos_token": EOS,
                   "additional_special_tokens": SPECIAL_TOKENS[2:]}
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": _dump_json(config),
        "special_tokens_map.json": _dump_json(special_map),
    }


def _model_config(tok: Tokenizer) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "hidden_act": "silu",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": _INIT_STD,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": tok.token_to_id(EOS),
        "use_cache": True,
    }


def _generation_config(tok: Tokenizer) -> dict:
    # Two stop ids, as Llama-3 instruct checkpoints have: end of text and end of turn.
    return {
        "bos_token_id": tok.token_to_id(BOS),
        "eos_token_id": [tok.token_to_id(EOS), tok.token_to_id(EOT)],
    }


def _weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes exactly as transformers' LlamaForCausalLM names them."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (cfg["vocab_size"], hidden)
    return shapes


def _random_weights(cfg: dict) -> dict[str, torch.Tensor]:
    """Normal(0, 0.02) matrices and all-ones norms, drawn in a fixed order from a fixed seed."""
    gen = torch.Generator(device="cpu").manual_seed(_SEED)
    weights = {}
    for name, shape in _weight_shapes(cfg).items():
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=torch.float32)
        else:
            weights[name] = torch.randn(shape, generator=gen, dtype=torch.float32) * _INIT_STD
    return weights


def _dump_json(obj: dict) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_tiny_model(out_dir: str | Path) -> None:
    """Write every file of the tiny checkpoint into `out_dir` (which must exist)."""
    out_dir = Path(out_dir)
    tok = build_tokenizer()
    cfg = _model_config(tok)
    texts = {
        "config.json": _dump_json(cfg),
        "generation_config.json": _dump_json(_generation_config(tok)),
        **_tokenizer_files(tok),
    }
    for name, text in texts.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    save_file(_random_weights(cfg), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def default_cache_dir() -> Path:
    return Path(os.environ.get("CPSERVE_CACHE_DIR") or Path.home() / ".cache" / "cpserve")


def ensure_tiny_model(cache_dir: str | Path | None = None) -> Path:
    """Path of the tiny checkpoint under `cache_dir`, building it on first use.

    Safe to call from several processes at once: each builds into its own temporary
    directory next to the target and renames it into place. A rename is atomic, so the
    target is either absent or complete; the loser of a race deletes its copy and uses the
    winner's, which is identical.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / TINY_VERSION
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}.tmp-", dir=root))
    try:
        write_tiny_model(tmp)
        os.rename(tmp, target)
    except OSError:
        # Another process renamed its build into place first (rename onto a non-empty
        # directory fails); anything else is a real error.
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | Path) -> Path:
    """`tiny` names the built-in demo model; anything else is a checkpoint path, as given.

    Existence is not checked here: the config loader reports a missing config.json.
    """
    if str(name_or_path) == TINY_NAME:
        return ensure_tiny_model()
    return Path(name_or_path)


def checkpoint_digest(path: str | Path) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint directory, by file name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).iterdir()) if p.is_file()}
