"""One sequence being generated, as the engine core knows it: token ids, KV progress, status.

A request of `n` completions is `n` of these (the front end fans them out); text, stop
strings and decoded logprobs live in the front end (`engine/output_processor.py`).
"""

from __future__ import annotations

import enum
import time

import torch

from cpserve.outputs import PositionLogprobs
from cpserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Admitted with blocks for its prompt, whose KV other instance's ranks are sending.
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    # The engine could not finish it (it can never get enough KV, its logits were not
    # finite, ...): `Request.error` says why; other requests go on.
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


class Request:
    """A sequence with `num_tokens` tokens, of which `num_computed_tokens` have KV in cache.

    A scheduler step gives it some of the rest. Prefill, chunked prefill, decode and
    recompute after preemption are all the same thing: computing tokens not yet computed.
    Whenever a step computes up to `num_tokens`, the logits of the last one give a new token.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.generator = generator
        self.arrival_time = arrival_time if arrival_time is not None else time.time()
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Tokens being sampled by steps already queued (async scheduling: at most one), not
        # yet in `all_token_ids`: a step may compute them before the host knows them.
        self.num_pending_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit at first admission
        self.num_preemptions = 0
        self.stop_reason: int | None = None  # the stop token id that ended it
        self.error: str | None = None  # why it ended with FINISHED_ERROR
        # Prompt logprobs: positions scored so far (the first prompt token's is None, so 1
        # from the start), and those scored since the last output, to hand out next.
        wants = params.prompt_logprobs is not None
        self.num_prompt_logprobs = 1 if wants else 0
        self.new_prompt_logprobs: list[PositionLogprobs | None] = [None] if wants else []
        # Speculative decoding: drafts to verify next step, and what became of drafts so far.
        self.spec_token_ids: list[int] = []
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.first_scheduled_time: float | None = None
        self.finished_time: float | None = None
        # Prefill-decode disaggregation (cpserve.kv_transfer), from kv_transfer_params:
        self.remote_decode = False  # keep the KV for a decode instance when finished
        self.remote_prefill = None  # a RemotePrefill: pull the prompt's KV before computing
        self.kv_transfer_output: dict | None = None  # what to tell the decode instance

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.all_token_ids) + self.num_pending_tokens

    @property
    def length_reached_with_pending(self) -> bool:
        """The pending tokens will end it by max_tokens: no step should compute past them."""
        max_tokens = self.params.max_tokens
        return (self.num_pending_tokens > 0 and max_tokens is not None
                and len(self.output_token_ids) + self.num_pending_tokens >= max_tokens)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def may_read_prefix_cache(self) -> bool:
        """Prompt logprobs need the logits of every prompt token, which cached KV cannot give
        (vLLM skips the cache for them too); a finished collection needs no more."""
        return not self.wants_prompt_logprobs

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs are still to be collected (not again after a preemption)."""
        return (self.params.prompt_logprobs is not None
                and self.num_prompt_logprobs < self.num_prompt_tokens)

    def append_token(self, token_id: int) -> None:
        """A sampled token; it was pending since the step that computes it was scheduled."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self.num_pending_tokens = max(0, self.num_pending_tokens - 1)

    def preempt(self) -> None:
        """Drop all KV; the tokens so far (prompt and output) are recomputed on resume."""
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions += 1
        self.spec_token_ids = []
