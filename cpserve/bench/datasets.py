"""The workload of `cpserve bench serve`: what is sent, and when.

- `sample_random_requests`: the `random` dataset of `vllm bench serve`, prompts of random
  lengths behind an optional shared prefix, as token ids, common words, or (with a tokenizer)
  text that encodes back to the planned number of tokens;
- `arrival_intervals`: the gaps between sends, Poisson or Gamma-shaped.

Both are seeded, so one seed gives one workload.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Ids below this are where tokenizers keep <unk>, <s>, </s> and padding.
MIN_RANDOM_TOKEN_ID = 10
# 32000 is the smallest base vocabulary of the common families (Llama-2, Mistral); ids under it
# are ordinary tokens in Llama-3, Qwen and GPT-2 vocabularies too.
DEFAULT_RANDOM_VOCAB_SIZE = 32000
# Common English words that BPE vocabularies hold as one token with their leading space, so a
# prompt of n words is close to n tokens whatever the server's tokenizer.
_WORDS = (
    "the of and to in is it that for you was on are as with be at this have from or one had by "
    "but not what all were we when your can said there use an each which she do how their if "
    "will up other about out many then them these so some her would make like him into time "
    "has look two more go see no way could people my than first water been call who its now "
    "find long down day did get come made may part over new sound take only little work know "
    "place year live me back give most very after thing our just name good man think say great "
    "where help through much before line right too mean old any same tell boy follow came want"
).split()


@dataclass(frozen=True)
class SampleRequest:
    """One request of the workload."""

    prompt: str | list[int]
    prompt_len: int  # planned tokens; the server's `usage.prompt_tokens` replaces it
    max_tokens: int


def random_lengths(rng: np.random.Generator, n: int, length: int, range_ratio: float,
                   minimum: int = 1) -> np.ndarray:
    """n lengths drawn uniformly from the integers in [length*(1-r), length*(1+r)]."""
    low = max(minimum, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def sample_random_requests(num_prompts: int, input_len: int, output_len: int,
                           range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0, *,
                           vocab_size: int = DEFAULT_RANDOM_VOCAB_SIZE, tokenizer: Any = None,
                           as_text: bool = False) -> list[SampleRequest]:
    """The `random` dataset: a shared prefix of `prefix_len` tokens, then a random part.

    With a tokenizer, random ids of its vocabulary are decoded to text that encodes back to
    the planned length (the text is what is sent, as vLLM does).
    Without one, completions get token-id prompts (`prompt: [ids]`, ids in
    [MIN_RANDOM_TOKEN_ID, vocab_size)), and `as_text` (chat) gets random common words.
    """
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if prefix_len < 0 or input_len < 0 or output_len < 1:
        raise ValueError("need --random-prefix-len >= 0, --random-input-len >= 0 and "
                         "--random-output-len >= 1")
    rng = np.random.default_rng(seed)
    input_lens = random_lengths(rng, num_prompts, input_len, range_ratio,
                                minimum=0 if prefix_len else 1)
    output_lens = random_lengths(rng, num_prompts, output_len, range_ratio)
    if tokenizer is not None:
        allowed = _plain_token_ids(tokenizer)
        prefix, prefix_len = _tokenizer_prompt(tokenizer, rng, allowed, "", prefix_len)
        prompts = [_tokenizer_prompt(tokenizer, rng, allowed, prefix, prefix_len + int(n))
                   for n in input_lens]
    elif as_text:
        prefix_words = rng.choice(_WORDS, size=prefix_len).tolist()
        prompts = [(" ".join(prefix_words + rng.choice(_WORDS, size=int(n)).tolist()),
                    prefix_len + int(n)) for n in input_lens]
    else:
        if vocab_size <= MIN_RANDOM_TOKEN_ID:
            raise ValueError(f"--random-vocab-size must exceed {MIN_RANDOM_TOKEN_ID}")
        prefix_ids = rng.integers(MIN_RANDOM_TOKEN_ID, vocab_size, size=prefix_len).tolist()
        id_prompts = [prefix_ids + rng.integers(MIN_RANDOM_TOKEN_ID, vocab_size,
                                                size=int(n)).tolist() for n in input_lens]
        prompts = [(ids, len(ids)) for ids in id_prompts]
    return [SampleRequest(prompt=p, prompt_len=n, max_tokens=int(m))
            for (p, n), m in zip(prompts, output_lens)]


def _plain_token_ids(tokenizer: Any) -> np.ndarray:
    """Ids that decode on their own to valid text: no special tokens, and no byte-level pieces
    of a multi-byte character, which decode to U+FFFD and re-encode as several tokens."""
    ids = np.setdiff1d(np.arange(tokenizer.vocab_size), tokenizer.all_special_ids)
    texts = tokenizer.batch_decode(ids[:, None].tolist())
    return ids[[bool(t) and "\ufffd" not in t for t in texts]]


def _tokenizer_prompt(tokenizer: Any, rng: np.random.Generator, allowed: np.ndarray,
                      prefix: str, target: int) -> tuple[str, int]:
    """`prefix` plus random text, aiming at `target` tokens in all; returns (text, tokens).

    Decoding random ids and encoding the text again merges or splits some of them, also across
    the seam with the prefix, so the random part is trimmed or topped up until the whole prompt
    encodes to `target`. The count returned is the true one even if that never happens.
    """
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    body = rng.choice(allowed, size=max(0, target - len(encode(prefix)))).tolist()
    for _ in range(10):
        excess = len(encode(prefix + tokenizer.decode(body))) - target
        if excess == 0:
            break
        body = encode(tokenizer.decode(body))
        body = (body[:max(0, len(body) - excess)] if excess > 0
                else body + rng.choice(allowed, size=-excess).tolist())
    text = prefix + tokenizer.decode(body)
    return text, len(encode(text))


def arrival_intervals(num_requests: int, request_rate: float, burstiness: float = 1.0,
                      seed: int = 0) -> np.ndarray:
    """Seconds to wait before sending each request; the first one leaves at once.

    Gaps are Gamma(shape=burstiness, mean=1/rate): burstiness 1 is a Poisson process, lower is
    burstier, higher is more regular. An infinite rate sends everything at once.
    """
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    # A stream of its own, so changing the rate does not change the prompts.
    rng = np.random.default_rng([seed, 1])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    if num_requests:
        gaps[0] = 0.0
    return gaps

