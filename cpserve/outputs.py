"""What `LLM.generate` and the engine return, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token; `rank` is 1 for the most likely token."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position's alternatives: token id -> Logprob (the chosen token always included).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    # "stop", "length", "abort", "error" (see `error`) or None while running
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    error: str | None = None  # why the engine failed this completion (finish_reason "error")
    # Speculative decoding: drafts verified for this completion, and how many were accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    extra: dict = field(default_factory=dict)
    # A prefill instance's answer to do_remote_decode: where a decode instance finds the KV.
    kv_transfer_params: dict | None = None

    @property
    def num_draft_tokens(self) -> int:
        """Speculative decoding: drafts verified over all completions."""
        return sum(c.num_draft_tokens for c in self.outputs)

    @property
    def num_accepted_tokens(self) -> int:
        """Speculative decoding: drafts accepted over all completions."""
        return sum(c.num_accepted_tokens for c in self.outputs)
