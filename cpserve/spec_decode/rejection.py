"""Verification of drafts: which of them the target model accepts, and the token after.

A request with drafts d_1..d_K computes K + 1 logit rows in one step: row j is the target's
distribution p_j of the token after its last token and d_1..d_j. Every row is sampled by the
engine's own sampler, as if d_1..d_j had been generated (penalties and min_tokens see them):

    row       0      1      2      3  (= K, the bonus row)
    drafts    d_1    d_2    d_3
    sampled   x_0    x_1    x_2    x_3
    accepted  x_0 == d_1, x_1 == d_2 ... up to the first mismatch; output x_0 .. x_a

Why this is exact rejection sampling (Leviathan et al., 2023): our drafts are deterministic
(n-gram lookup; MTP drafts by argmax), so the draft distribution q is one-hot at d. The
rule "accept d with probability min(1, p(d) / q(d)) = p(d), else sample from
norm(max(0, p - q))", where max(0, p - q) is p with d removed, gives token d with
probability p(d) and any other x with (1 - p(d)) * p(x) / (1 - p(d)) = p(x). Drawing
x ~ p and accepting iff x == d gives exactly the same, and emits x on a mismatch. So each
output token follows the target's p_j given the tokens before it, and the whole sequence
follows the target distribution. Greedy rows take the argmax: accepted while draft ==
argmax. A seeded request draws each row's noise from its own generator, rows in order, so
its output is reproducible run to run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from cpserve.engine.sampler import SampledToken, SamplingRow
from cpserve.request import Request


class TokensWithDrafts(Sequence):
    """A request's output tokens followed by some drafts, without copying the output."""

    def __init__(self, output: list[int], drafts: list[int]) -> None:
        self.output, self.drafts = output, drafts

    def __len__(self) -> int:
        return len(self.output) + len(self.drafts)

    def __getitem__(self, index):
        return (list(self.output) + list(self.drafts))[index]

    def __iter__(self) -> Iterator[int]:
        yield from self.output
        yield from self.drafts


def verification_rows(request: Request, drafts: list[int]) -> list[SamplingRow]:
    """The sampling rows of a verification step: row j as if drafts[:j] were generated."""
    output = request.output_token_ids
    return [SamplingRow(request.params, request.generator,
                        TokensWithDrafts(output, drafts[:j]) if j else output,
                        request.prompt_token_ids)
            for j in range(len(drafts) + 1)]


def accept(drafts: list[int], sampled: list[SampledToken]) -> list[SampledToken]:
    """The tokens a verification step outputs: the accepted drafts (as sampled), then the
    sample of the first row that disagrees, or the bonus row's if all agree."""
    assert len(sampled) == len(drafts) + 1, (len(sampled), len(drafts))
    for j, draft in enumerate(drafts):
        if sampled[j].token_id != draft:
            return sampled[:j + 1]
    return sampled
