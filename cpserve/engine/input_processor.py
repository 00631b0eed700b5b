"""From what a user sends to what the engine core runs: prompts tokenized and checked, the `n`
completions of a request fanned out into sequences.

    prompt (text | token ids | {"prompt" | "prompt_token_ids"}), SamplingParams(n=3)
        │ tokenize (text only: a text far over max_model_len is refused from its head)
        │ check_sequence: every rule on token ids and parameters
        └─> EngineCoreRequest "r#0", "r#1", "r#2"   (n=1 each, seed + k, prompt logprobs on #0)

Every rule a request must meet is in `check_sequence`. The front end calls it before sending
a request (a refusal costs no round trip) and the core calls it again when it adds one, so a
request can never reach the model in a shape that would crash it.
"""

from __future__ import annotations

from dataclasses import replace

from cpserve.config import EngineConfig
from cpserve.engine.messages import EngineCoreRequest
from cpserve.sampling_params import SamplingParams
from cpserve.tokenizer import PromptTooLongError, Tokenizer


def load_tokenizer(config: EngineConfig) -> Tokenizer:
    """The tokenizer of a front end of `config` (--tokenizer, else the model's own)."""
    return Tokenizer.from_pretrained(config.model.tokenizer or config.model.path)


def sequence_id(request_id: str, index: int, n: int) -> str:
    """The core's id of completion `index` of a request of `n`."""
    return request_id if n == 1 else f"{request_id}#{index}"


def too_long_message(count: str, max_model_len: int) -> str:
    return (f"the prompt has {count} tokens, but max_model_len is {max_model_len}: at most "
            f"{max_model_len - 1} prompt tokens leave room for one generated token")


def check_sequence(config: EngineConfig, token_ids: list[int], params: SamplingParams) -> None:
    """Raise ValueError, with a message for the user, if the core cannot run this."""
    params.validate()
    limit = config.max_logprobs
    if limit == -1:
        limit = config.model.vocab_size
    for name in ("logprobs", "prompt_logprobs"):
        asked = getattr(params, name)
        if asked is not None and asked > limit:
            raise ValueError(f"{name}={asked} is more than this server returns per token: "
                             f"at most {limit} (--max-logprobs)")
    if not token_ids:
        raise ValueError("the prompt is empty: it must have at least one token")
    vocab = config.model.vocab_size
    low, high = min(token_ids), max(token_ids)
    if low < 0 or high >= vocab:
        bad = next(t for t in token_ids if not 0 <= t < vocab)
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
    # Start-up made sure the KV cache holds max_model_len tokens (check_kv_capacity).
    max_len = config.model.max_model_len
    if len(token_ids) > max_len - 1:  # room for one generated token
        raise ValueError(too_long_message(str(len(token_ids)), max_len))
    for name, ids in (("stop_token_ids", params.stop_token_ids),
                      ("logit_bias", params.logit_bias or ())):
        bad_ids = sorted(t for t in ids if t >= vocab)
        if bad_ids:
            raise ValueError(f"{name} has token id {bad_ids[0]}, outside the vocabulary "
                             f"[0, {vocab})")


class InputProcessor:
    """Tokenizes and checks prompts for one engine config (read-only, any thread)."""

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer

    @property
    def max_prompt_tokens(self) -> int:
        return self.config.model.max_model_len - 1

    def tokenize(self, prompt) -> tuple[str | None, list[int]]:
        """(the prompt's text if it had one, its token ids); ValueError for the user."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:  # would still tokenize to a lone BOS; refuse it like no tokens
                raise ValueError("the prompt is empty: it must have at least one token")
            try:
                return prompt, self.tokenizer.encode_within(prompt, self.max_prompt_tokens)
            except PromptTooLongError as exc:
                raise ValueError(too_long_message(exc.count, self.config.model.max_model_len)
                                 ) from None
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("a prompt must be a string, a list of token ids, or a dict with "
                         "'prompt' or 'prompt_token_ids'")

    def sequences(self, request_id: str, token_ids: list[int], params: SamplingParams,
                  arrival_time: float) -> list[EngineCoreRequest]:
        """The request's `n` sequences, checked; ValueError names what is wrong."""
        check_sequence(self.config, token_ids, params)
        n = params.n
        return [EngineCoreRequest(
            sequence_id(request_id, k, n), token_ids,
            params if n == 1 else replace(
                params, n=1, seed=params.child_seed(k),
                prompt_logprobs=params.prompt_logprobs if k == 0 else None),
            arrival_time, counts_prompt=k == 0) for k in range(n)]
