"""Tokenizer of a checkpoint, and the incremental detokenizer that streams generated text.

`Tokenizer` is a thin wrapper over transformers' `AutoTokenizer`, so chat templates render
exactly as transformers renders them. It fixes the few conventions the engine depends on:

- `decode` never applies `clean_up_tokenization_spaces`: that rewrite depends on the text
  after a token, so streamed text could not equal the final text with it.
- `decode_token(id)` is the text of one token as logprobs show it (vLLM's `decoded_token`).
- `all_special_ids` lists every token that `skip_special_tokens=True` drops.

A rendered chat already holds the template's special tokens (often BOS): encode it with
`add_special_tokens=False`, as transformers' own `apply_chat_template(tokenize=True)` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer

# A text longer than this many characters per allowed token is first counted on its head.
_HEAD_CHARS_PER_TOKEN = 16
# How far back from the head's end to look for the end of a word.
_WORD_END_SEARCH_CHARS = 4096


class PromptTooLongError(ValueError):
    """A prompt with more tokens than allowed; `at_least` when only its head was counted."""

    def __init__(self, num_tokens: int, limit: int, at_least: bool = False) -> None:
        self.limit = limit
        self.count = f"at least {num_tokens}" if at_least else str(num_tokens)  # for messages
        super().__init__(f"the prompt has {self.count} tokens, more than the {limit} allowed")


def _word_end_before(text: str, end: int) -> int | None:
    """A cut <= end after which the text starts with whitespace and before which it does not
    end with whitespace: where pre-tokenizers end a word, so the head's tokens are also tokens
    of the whole text. None if no such cut is near."""
    for i in range(end, max(end - _WORD_END_SEARCH_CHARS, 1), -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return None


# SentencePiece marks a word start with U+2581; decoding a lone "▁word" token drops the
# space, which logprobs should still show.
_SPIECE_SPACE = "\u2581"
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """The checkpoint's tokenizer, with the calls the engine and the API use."""

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self._all_special_ids = _special_ids(hf_tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        return cls(AutoTokenizer.from_pretrained(str(path), trust_remote_code=False))

    # Encoding and decoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_within(self, text: str, limit: int, add_special_tokens: bool = True) -> list[int]:
        """`encode(text)`, or PromptTooLongError if that has more than `limit` tokens; a text
        far too long is refused after tokenizing its head only (a 10 MB text costs seconds).

        The head ends where a word ends, so the pre-tokenizers of byte-level BPE (GPT-2,
        Llama 3, Qwen) and SentencePiece split it as they split the whole text: the whole
        has at least as many tokens as the head.
        """
        head_chars = _HEAD_CHARS_PER_TOKEN * (limit + 1)
        if len(text) > head_chars:
            cut = _word_end_before(text, head_chars)
            if cut is not None:
                num_head = len(self.hf.encode(text[:cut], add_special_tokens=add_special_tokens))
                if num_head > limit:
                    raise PromptTooLongError(num_head, limit, at_least=True)
        ids = self.encode(text, add_special_tokens)
        if len(ids) > limit:
            raise PromptTooLongError(len(ids), limit)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Vocabulary strings of ids (byte-level tokens look like 'Ġthe')."""
        if isinstance(ids, int):
            return self.hf.convert_ids_to_tokens(ids)
        return self.hf.convert_ids_to_tokens(list(ids))

    def decode_token(self, token_id: int) -> str:
        """Text of a single token as logprobs show it, the convention of vLLM's `decoded_token`.

        The token is decoded alone with special tokens kept, so a token holding part of a
        multi-byte character shows U+FFFD. A SentencePiece word-start marker that decoding
        strips is put back as a space.
        """
        text = self.decode([token_id], skip_special_tokens=False)
        piece = self.hf.convert_ids_to_tokens(token_id) or ""
        num_markers = len(piece) - len(piece.lstrip(_SPIECE_SPACE))
        missing = num_markers - (len(text) - len(text.lstrip(" ")))
        return " " * missing + text if missing > 0 else text

    # Chat

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **template_kwargs) -> str:
        """The chat rendered as text, by `chat_template` if given (the server's
        --chat-template) else the tokenizer's own; `template_kwargs` reach the template."""
        if chat_template is None and not self.has_chat_template:
            name = getattr(self.hf, "name_or_path", "") or "this checkpoint"
            raise ValueError(f"the tokenizer of {name} has no chat template (neither "
                             "tokenizer_config.json nor chat_template.jinja has one); "
                             "start the server with --chat-template, or use the completions "
                             "API with a plain prompt")
        return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False, chat_template=chat_template,
                                           **template_kwargs)

    # Vocabulary

    @property
    def vocab_size(self) -> int:
        """Size of the full vocabulary, added tokens included."""
        return len(self.hf)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._all_special_ids)


def _special_ids(hf_tokenizer) -> list[int]:
    """Named special tokens plus every added token flagged special.

    transformers lists only the named ones (bos, eos, extra_special_tokens), but decoding
    with skip_special_tokens=True also drops added tokens flagged special in tokenizer.json.
    """
    ids = set(hf_tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(hf_tokenizer, "added_tokens_decoder", {}).items()
               if tok.special)
    return sorted(ids)


class IncrementalDetokenizer:
    """Turns the token ids of one request's output into text deltas as they arrive.

    Each call decodes only a short window of ids: a few already-emitted ids (the prefix) and
    the ids not yet emitted. The delta is the decoded window minus the decoded prefix:

        ids:   ... | emitted earlier | prefix_offset ... read_offset | not yet emitted |
        text:  decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

    Decoding with a little context keeps tokenizers right whose text for a token depends on
    its neighbours (SentencePiece drops the space of a sequence's first word). While the
    window's text ends in U+FFFD, the last bytes are an incomplete UTF-8 character: nothing
    is emitted until more tokens complete it (or `flush` is called at the end).

    The last few prompt ids are the first context, so the output continues the prompt's
    text. Unless that context matters to the tokenizer (SentencePiece), the deltas, plus
    `flush()` when the request ends, concatenate to `tokenizer.decode(output_ids)`.
    """

    # Prompt ids kept as the first context: enough for any merge across the boundary to
    # show; a few more than needed in case some are special tokens that decode to nothing.
    NUM_CONTEXT_IDS = 6

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = self._context(prompt_token_ids)
        self._num_context_ids = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pieces: list[str] = []

    def _context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        context = list(prompt_token_ids[-self.NUM_CONTEXT_IDS:])
        # A prompt cut inside a character would let the first output bytes complete the
        # prompt's character instead of showing as U+FFFD on their own: decode the output
        # alone then.
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            return []
        return context

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Append output ids; return the text they complete (may be empty)."""
        # One id at a time, so text before an incomplete character at the end of a chunk
        # (several ids in one step: speculative decoding) is not held back with it.
        deltas = []
        for token_id in new_ids:
            self._ids.append(token_id)
            deltas.append(self._emit(final=False))
        return "".join(deltas)

    def flush(self) -> str:
        """Text still held back at the end of the request (an incomplete trailing character)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset:])
        if len(window_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: nothing new yet
        if window_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        delta = window_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._pieces.append(delta)
        return delta

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context_ids:]

    @property
    def text(self) -> str:
        """All output text emitted so far (the concatenation of the deltas)."""
        if len(self._pieces) > 1:
            # Joined lazily: repeated `str +=` on an attribute copies the whole text each step.
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""
