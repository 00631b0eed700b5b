"""The built-in `tiny` checkpoint: deterministic, race-safe to build, loadable by transformers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpserve.models import demo

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return demo.ensure_tiny_model(tmp_path_factory.mktemp("cache"))


def test_build_is_byte_identical_across_builds_and_processes(tiny_path, tmp_path):
    """Parallel ranks and separate machines must build the very same checkpoint.

    The second build runs in a fresh interpreter: the BPE trainer's hash maps are seeded per
    process, so this is where nondeterminism would show.
    """
    other_cache = tmp_path / "other"
    code = ("import sys; from cpserve.models import demo; "
            "print(demo.ensure_tiny_model(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(other_cache)], check=True,
                         cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    first, second = demo.checkpoint_digest(tiny_path), demo.checkpoint_digest(out)
    assert set(first) == {"config.json", "generation_config.json", "model.safetensors",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert first == second


def test_second_call_reuses_the_cache(tiny_path, monkeypatch):
    def fail(_):
        raise AssertionError("rebuilt a cached checkpoint")

    monkeypatch.setattr(demo, "write_tiny_model", fail)
    assert demo.ensure_tiny_model(tiny_path.parent) == tiny_path


def test_losing_the_rename_race_uses_the_winner(tmp_path, monkeypatch):
    """Another process renames its build into place while ours is being written."""
    real_write = demo.write_tiny_model
    target = tmp_path / demo.TINY_VERSION

    def write_and_lose(out_dir):
        real_write(out_dir)
        target.mkdir()
        (target / "config.json").write_text("{}")  # the winner's files

    monkeypatch.setattr(demo, "write_tiny_model", write_and_lose)
    assert demo.ensure_tiny_model(tmp_path) == target
    assert (target / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == [demo.TINY_VERSION]  # our copy removed


def test_concurrent_builds_agree(tmp_path):
    """Four builders, like four ranks starting at once, share one cache directory.

    Threads stand in for processes: the race is on the file system (mkdtemp, rename), and
    the build releases the GIL in tokenizers and torch, so the builds overlap.
    """
    start = threading.Barrier(4)
    paths, errors = [], []

    def build():
        try:
            start.wait()
            paths.append(demo.ensure_tiny_model(tmp_path))
        except BaseException as e:  # reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert paths == [tmp_path / demo.TINY_VERSION] * 4
    assert [p.name for p in tmp_path.iterdir()] == [demo.TINY_VERSION]  # no temporary left
    assert len(demo.checkpoint_digest(tmp_path / demo.TINY_VERSION)) == 6


def test_config_has_the_documented_shape(tiny_path):
    cfg = json.loads((tiny_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    expected = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
                "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 16,
                "vocab_size": 1024, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}
    assert {k: cfg[k] for k in expected} == expected
    tok = json.loads((tiny_path / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert cfg["bos_token_id"] == specials[demo.BOS]
    assert cfg["eos_token_id"] == specials[demo.EOS]
    gen = json.loads((tiny_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [specials[demo.EOS], specials[demo.EOT]]


def test_weights_are_named_and_scaled_like_llama(tiny_path):
    weights = load_file(tiny_path / "model.safetensors")
    assert len(weights) == 2 + 9 * 4 + 1
    assert weights["model.embed_tokens.weight"].shape == (1024, 128)
    assert weights["model.layers.3.self_attn.k_proj.weight"].shape == (16, 128)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (128, 384)
    assert torch.equal(weights["model.norm.weight"], torch.ones(128))
    # 131k samples of N(0, 0.02): the sample std is within 1% of 0.02.
    std = weights["lm_head.weight"].std().item()
    assert abs(std - 0.02) < 2e-4
    # Distinct tensors, not one draw reused.
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj.weight"],
                           weights["model.layers.1.self_attn.q_proj.weight"])


def test_transformers_loads_it_without_missing_weights_and_generates(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(tiny_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(tiny_path)
    assert len(tok) == model.config.vocab_size == 1024
    prompt = tok("The river starts as a small stream", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 8
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(out[0, :prompt["input_ids"].shape[1]], prompt["input_ids"][0])


def test_tokenizer_is_byte_level_bpe_with_specials(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    ids = tok.encode("the train")
    assert ids[0] == tok.bos_token_id  # BOS added like Llama 3
    assert len(ids) < 1 + len("the train")  # merges learned, not one token per byte
    text = "Any text at all: 東京 🚀 \x00\x7f ok"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    ids = tok.encode("<|user|>hi<|eot|>", add_special_tokens=False)
    assert tok.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<|user|>", "<|eot|>"]
    assert tok.decode(ids[1:-1]) == "hi"


def test_chat_template_renders_roles_and_generation_prompt(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello."}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|begin_of_text|><|system|>\nBe brief.<|eot|>\n<|user|>\nHi<|eot|>\n"
                        "<|assistant|>\nHello.<|eot|>\n<|assistant|>\n")
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == rendered[:-len("<|assistant|>\n")]
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_resolve_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CPSERVE_CACHE_DIR", str(tmp_path))
    assert demo.resolve_model_path("some/dir") == Path("some/dir")
    assert demo.resolve_model_path("/no/such/checkpoint") == Path("/no/such/checkpoint")
    assert list(tmp_path.iterdir()) == []  # a path never triggers a build
    path = demo.resolve_model_path("tiny")
    assert path == tmp_path / demo.TINY_VERSION
    assert (path / "config.json").is_file()


def test_default_cache_dir_is_home_cache_without_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CPSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / ".cache" / "cpserve"
