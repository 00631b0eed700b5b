"""Counters of speculative decoding, as vLLM keeps them (its `SpecDecodingStats`).

    num_drafts               verification steps of a request with at least one draft
    num_draft_tokens         drafts verified
    num_accepted_tokens      drafts accepted
    accepted_per_position    [j]: drafts accepted at position j (0-based) of their step

Mean accepted length per step = 1 + num_accepted_tokens / num_drafts.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_speculative_tokens: int
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.accepted_per_position:
            self.accepted_per_position = [0] * self.num_speculative_tokens

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        if num_draft_tokens == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_speculative_tokens, self.num_drafts,
                               self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.accepted_per_position))

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification step: the accepted drafts plus the one sampled after."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0
