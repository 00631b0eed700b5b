"""Tokenizer wrapper and incremental detokenizer, on the tiny byte-level BPE checkpoint."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from transformers import AutoTokenizer

from cpserve.models import demo
from cpserve.tokenizer import IncrementalDetokenizer, Tokenizer

REPLACEMENT = "\ufffd"

# Multi-byte text: 2-byte accents, 3-byte CJK, 4-byte emoji, mixed with English.
TEXT_PIECES = ["The river ", "café ", "naïve ", "東京", "日本語", "😀", "🚀🚀", " and ", "résumé",
               "\n", "fish ", "x = f(a, b) ", "élan ", "中文字符", " 42 ", "jalapeño"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return demo.ensure_tiny_model(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tok(tiny_path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_path)


def _random_text(rng: random.Random, num_pieces: int) -> str:
    return "".join(rng.choice(TEXT_PIECES) for _ in range(num_pieces))


def _stream(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feed `ids` in random chunks of 1 to 4, as steps with speculative tokens would."""
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        deltas.append(detok.add_tokens(ids[i:i + n]))
        i += n
    deltas.append(detok.flush())
    return deltas


def test_basic_properties(tok):
    assert tok.vocab_size == 1024
    assert tok.convert_ids_to_tokens(tok.bos_token_id) == "<|begin_of_text|>"
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == "<|end_of_text|>"
    # Role and turn markers are special too: skip_special_tokens drops them all.
    assert tok.convert_ids_to_tokens(tok.all_special_ids) == demo.SPECIAL_TOKENS
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id
    assert tok.encode("hello", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "hello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>hello"


def test_decode_token_shows_single_tokens_like_logprobs(tok):
    space_the = tok.encode(" the", add_special_tokens=False)
    assert len(space_the) == 1 and tok.decode_token(space_the[0]) == " the"
    assert tok.decode_token(tok.eos_token_id) == "<|end_of_text|>"  # specials kept
    # The tokens of 東 (E6 9D B1): each alone is an incomplete character.
    first, *_ = tok.encode("東", add_special_tokens=False)
    assert tok.decode_token(first) == REPLACEMENT


def test_decode_token_restores_sentencepiece_space():
    """Decoding a lone '▁word' drops its space (Metaspace); logprobs must still show it."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(["hello world"] * 10,
                            BpeTrainer(vocab_size=60, special_tokens=["<unk>"], show_progress=False))
    sp = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw))
    (word,) = sp.encode("world", add_special_tokens=False)
    assert sp.convert_ids_to_tokens(word) == "\u2581world"
    assert sp.decode([word]) == "world"
    assert sp.decode_token(word) == " world"
    # In a stream, the prompt gives the context that keeps the space.
    prompt = sp.encode("hello", add_special_tokens=False)
    detok = IncrementalDetokenizer(sp, prompt)
    assert detok.add_tokens([word]) == " world"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_decode_on_random_ids(tok, skip_special_tokens):
    """Any ids at all, special tokens and stray bytes included, stream to the full decode."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip_special_tokens)
        deltas = _stream(detok, ids, rng)
        expected = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected
        assert detok.text == expected
        assert detok.output_token_ids == ids


def test_multibyte_text_streams_without_replacement_chars(tok):
    rng = random.Random(1)
    num_split_chars = 0
    for _ in range(100):
        text = _random_text(rng, rng.randint(1, 12))
        ids = tok.encode(text, add_special_tokens=False)
        num_split_chars += sum(tok.decode(ids[:i]).endswith(REPLACEMENT) for i in range(len(ids)))
        prompt = tok.encode(_random_text(rng, 3))
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = _stream(detok, ids, rng)
        assert "".join(deltas) == text
        assert not any(REPLACEMENT in d for d in deltas)
    assert num_split_chars > 50  # the texts really have tokens that end inside a character


def test_held_back_bytes_are_released_by_the_completing_token(tok):
    ids = tok.encode("東京", add_special_tokens=False)
    assert tok.decode(ids[:1]) == REPLACEMENT  # the first token holds only part of 東
    detok = IncrementalDetokenizer(tok, tok.encode("Hi "))
    assert detok.add_tokens(ids[:1]) == ""
    assert detok.text == ""
    assert detok.add_tokens(ids[1:]) == "東京"
    assert detok.text == "東京"


def test_flush_releases_an_incomplete_tail(tok):
    ids = tok.encode("a東", add_special_tokens=False)[:-1]  # cut inside 東
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add_tokens(ids) == "a"
    assert detok.flush() == tok.decode(ids)[1:]
    assert detok.text == tok.decode(ids)
    assert detok.text.endswith(REPLACEMENT)


def test_skipped_special_tokens_emit_nothing(tok):
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"), skip_special_tokens=True)
    assert detok.add_tokens(tok.encode("<|eot|>", add_special_tokens=False)) == ""
    detok_kept = IncrementalDetokenizer(tok, tok.encode("Hi"), skip_special_tokens=False)
    assert detok_kept.add_tokens(tok.encode("<|eot|>", add_special_tokens=False)) == "<|eot|>"


def test_prompt_ending_inside_a_character_does_not_leak_into_output(tok):
    ids = tok.encode("東京 ok", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith(REPLACEMENT))
    prompt, output = ids[:cut], ids[cut:]
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(_stream(detok, output, random.Random(2))) == tok.decode(output)


def test_work_per_step_is_bounded(tok, monkeypatch):
    """Each step decodes a short window, never the whole output: O(new tokens) per step."""
    ids = tok.encode(_random_text(random.Random(3), 400), add_special_tokens=False)
    assert len(ids) > 1000
    windows = []
    real_decode = Tokenizer.decode

    def recording_decode(self, token_ids, skip_special_tokens=True):
        windows.append(len(token_ids))
        return real_decode(self, token_ids, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "decode", recording_decode)
    detok = IncrementalDetokenizer(tok, tok.encode("prompt " * 1000))
    for i in ids:
        detok.add_tokens([i])
    monkeypatch.undo()
    assert detok.text == tok.decode(ids)
    # A 4-byte emoji can span up to 4 byte tokens, plus the prefix window.
    assert max(windows) <= 12


def test_chat_template_matches_transformers(tok, tiny_path):
    hf = AutoTokenizer.from_pretrained(tiny_path)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Where does the river 🚀 go?"}]
    for add_generation_prompt in (True, False):
        rendered = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert rendered == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    rendered = tok.apply_chat_template(messages)
    assert rendered.startswith("<|begin_of_text|><|system|>\nYou are terse.<|eot|>\n")
    assert rendered.endswith("<|assistant|>\n")
    # The rendered chat holds its BOS: encoded without adding one, it is what transformers feeds.
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                          return_dict=False)
    assert tok.encode(rendered, add_special_tokens=False) == list(expected_ids)


def test_missing_chat_template_is_a_clear_error(tiny_path, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_path / name, tmp_path / name)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["chat_template"]
    config_file.write_text(json.dumps(config))
    plain = Tokenizer.from_pretrained(tmp_path)
    assert not plain.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])


def test_special_ids_include_added_tokens_flagged_special(tiny_path, tmp_path):
    """Like Llama 3's reserved tokens: special in tokenizer.json, not named in the config."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_path / name, tmp_path / name)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["additional_special_tokens"]
    config_file.write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.convert_ids_to_tokens(tok.all_special_ids) == demo.SPECIAL_TOKENS
    user = tok.all_special_ids[3]
    assert tok.decode([user]) == ""  # what skip_special_tokens drops, all_special_ids lists


def test_decode_never_cleans_up_tokenization_spaces():
    """transformers' cleanup turns 'a .' into 'a.' depending on the next token: streamed
    text could not match it, so decode leaves spaces as the tokens have them."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel({"a": 0, ".": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.decoder = decoders.WordPiece(cleanup=False)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, clean_up_tokenization_spaces=True)
    assert hf.decode([0, 1]) == "a."  # the checkpoint asks for cleanup
    assert Tokenizer(hf).decode([0, 1]) == "a ."
