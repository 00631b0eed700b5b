"""Who proposes the drafts, after each step, on the driver: the engine's one hook.

    LLMEngine._finish  ->  drafter.propose(scheduler_output)
        NgramDrafter: prompt lookup over each request's tokens, on the host (ngram.py)
        MTPDrafter:   every rank runs the checkpoint's MTP module over the step's tokens
                      (a second, small forward pass), the driver gets the drafts back
                      (mtp_proposer.py)

A request gets drafts only when the step completed it (it sampled a new token) and it goes
on; they become `Request.spec_token_ids`, which the scheduler adds to its next step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from cpserve.distributed.plan import StepPlan
from cpserve.engine.scheduler import ScheduledRequest, SchedulerOutput
from cpserve.request import Request
from cpserve.spec_decode.config import SpeculativeConfig
from cpserve.spec_decode.ngram import NgramProposer

if TYPE_CHECKING:
    from cpserve.config import EngineConfig
    from cpserve.engine.executor import Executor


class Drafter(Protocol):
    def propose(self, out: SchedulerOutput) -> None: ...


def build_drafter(config: EngineConfig, executor: Executor) -> Drafter | None:
    spec = config.speculative
    if spec is None:
        return None
    if spec.is_mtp:
        return MTPDrafter(spec, config.model.max_model_len, executor)
    return NgramDrafter(spec, config.model.max_model_len)


def draft_budget(request: Request, k: int, max_model_len: int) -> int:
    """Drafts worth verifying in the request's next step. That step computes positions
    num_tokens - 1 .. num_tokens - 1 + d, which must stay below max_model_len, and outputs
    at most d + 1 tokens, which need not go past max_tokens."""
    if request.is_finished:
        return 0
    left = max_model_len - request.num_tokens
    max_tokens = request.params.max_tokens
    if max_tokens is not None:
        left = min(left, max_tokens - len(request.output_token_ids) - 1)
    return max(0, min(k, left))


def _drafts_wanted(item: ScheduledRequest, spec: SpeculativeConfig, max_model_len: int) -> int:
    if not item.completes:
        return 0  # a prompt chunk with more to come: nothing new was sampled
    return draft_budget(item.request, spec.num_speculative_tokens, max_model_len)


class NgramDrafter:
    def __init__(self, spec: SpeculativeConfig, max_model_len: int) -> None:
        self.spec, self.max_model_len = spec, max_model_len
        self.proposer = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min,
                                      spec.prompt_lookup_max)

    def propose(self, out: SchedulerOutput) -> None:
        self.proposer.forget(out.freed_request_ids)
        for item in out.scheduled:
            r = item.request
            if r.is_finished:
                self.proposer.forget([r.request_id])
                continue
            wanted = _drafts_wanted(item, self.spec, self.max_model_len)
            r.spec_token_ids = self.proposer.propose(r, wanted) if wanted else []


class MTPDrafter:
    def __init__(self, spec: SpeculativeConfig, max_model_len: int, executor: Executor) -> None:
        self.spec, self.max_model_len, self.executor = spec, max_model_len, executor

    def propose(self, out: SchedulerOutput) -> None:
        """Every request of the step, in plan order: the token after each of its new ones
        (what the MTP module reads with the hidden state there), the row of its last token
        with KV (-1 if it drafts nothing) and how many drafts it wants."""
        if not out.scheduled:
            return
        entries, wanted = [], []
        for item in out.scheduled:
            r, start, n = item.request, item.start_pos, item.num_new_tokens
            following = r.all_token_ids[start + 1:start + 1 + n]
            following += [0] * (n - len(following))  # past the accepted tokens: unread
            want = _drafts_wanted(item, self.spec, self.max_model_len)
            entries.append([following, r.num_tokens - 2 - start if want else -1, want])
            wanted.append(want)
        drafts = self.executor.draft(StepPlan(draft=entries))
        for item, want, tokens in zip(out.scheduled, wanted, drafts):
            item.request.spec_token_ids = list(tokens[:want])
