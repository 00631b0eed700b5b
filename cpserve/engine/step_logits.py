"""Where each logit row of a step goes: prompt logprobs at once, sampling rows kept.

The model runner hands the driver a step's logits a slice at a time (`LOGITS_SLICE_BYTES`),
so prompt logprobs over a long chunk never hold more than a slice. Rows are laid out request
by request in plan order (see `ModelRunner.execute`):

    rows:   | r0: 1 row | r1: every new token (prompt logprobs) ........ | r2: 1 row |
    slices: [ slice 0 ........................ )[ slice 1 ................. )
                 ^ sample                 r1's rows of slice 0 -> logprobs   ^ sample
                                                r1's last row -> logprobs and sample

A row whose logits are not finite fails its request, not the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cpserve.engine.scheduler import ScheduledRequest
from cpserve.engine.transfer import to_device
from cpserve.request import Request

# (request's scheduled item, offset of the first row among its rows, those rows' logits)
# -> None, or why the request must fail.
PromptRowsHandler = Callable[[ScheduledRequest, int, torch.Tensor], str | None]


def num_logit_rows(item: ScheduledRequest) -> int:
    """Logit rows a scheduled request needs: every new token while prompt logprobs are being
    collected, else those that sample if it completes the request (its last token and each
    draft after it), else none."""
    if item.request.wants_prompt_logprobs:
        return item.num_new_tokens
    return num_sample_rows(item) if item.completes else 0


def num_sample_rows(item: ScheduledRequest) -> int:
    """Rows sampled for a completing request: one, and one per draft it verifies."""
    return 1 + len(item.draft_token_ids)


class StepLogits:
    """Consumes the slices of one step's logits (`__call__` is a `LogitsConsumer`)."""

    def __init__(self, scheduled: list[ScheduledRequest], vocab_size: int,
                 on_prompt_rows: PromptRowsHandler) -> None:
        self.on_prompt_rows = on_prompt_rows
        self.vocab_size = vocab_size
        self.spans: list[tuple[ScheduledRequest, int, int]] = []  # item, first row, rows
        self.sampled_items: list[ScheduledRequest] = []
        self._sample_rows: list[int] = []
        row = 0
        for item in scheduled:
            n = num_logit_rows(item)
            if item.request.wants_prompt_logprobs:
                self.spans.append((item, row, n))
            if item.completes:
                self.sampled_items.append(item)
                self._sample_rows.extend(range(row + n - num_sample_rows(item), row + n))
            row += n
        self.num_rows = row
        # Every row is sampled, in order (decodes): the step's logits are the sample logits.
        self._samples_are_all_rows = self._sample_rows == list(range(row))
        # [sampled rows, vocab]: each sampled item's rows in turn (`num_sample_rows`).
        self.sample_logits: torch.Tensor | None = None
        self.failures: dict[Request, str] = {}  # requests to fail after the step, and why

    def __call__(self, first: int, logits: torch.Tensor) -> None:
        end = first + logits.shape[0]
        if self._samples_are_all_rows and first == 0 and end == self.num_rows:
            self.sample_logits = logits  # no copy of [rows, vocab]
            return
        for item, start, n in self.spans:
            lo, hi = max(start, first), min(start + n, end)
            if lo < hi and item.request not in self.failures:
                error = self.on_prompt_rows(item, lo - start, logits[lo - first:hi - first])
                if error is not None:
                    self.failures[item.request] = error
        wanted = [(j, row - first) for j, row in enumerate(self._sample_rows) if first <= row < end]
        if wanted:
            if self.sample_logits is None:
                self.sample_logits = logits.new_empty(len(self._sample_rows), self.vocab_size)
            device = logits.device
            self.sample_logits.index_copy_(
                0, to_device([j for j, _ in wanted], device),
                logits.index_select(0, to_device([r for _, r in wanted], device)))
