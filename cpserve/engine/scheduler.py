"""Continuous batching without prefill or decode phases.

Each step hands tokens to requests under two budgets: `max_num_batched_tokens` tokens and
`max_num_seqs` running requests. Running requests come first, in arrival order, each asking
for all its uncomputed tokens (one for a decode, the rest of a prompt for a prefill) capped by
what is left of the budget, so a long prompt is prefilled in chunks beside the decodes of
others. When KV blocks run out, the most recently admitted running request is preempted: its
blocks are freed and its tokens recomputed later. Waiting requests are admitted in order while
budget and blocks last, after taking any cached prefix.

Speculative decoding needs no phase either: a request's drafts (`Request.spec_token_ids`)
are tokens past `num_tokens` that a step computes with its last one, so a decode asks for
1 + K tokens; the budget may cut the drafts short. They count as computed only once accepted
(`commit_accepted`, after the step).

With async scheduling a step is scheduled while the one before still runs: a request whose
last token is still being sampled (`Request.num_pending_tokens`) is given that token to
compute, as if known; the step is fed the sample on the device. Counts move when a step is
scheduled (`num_computed_tokens`, pending tokens), not when it ends, so the next schedule
sees them at once. A request whose pending tokens will end it by max_tokens is not given
more; one that stops on its pending token (eos, a stop string) has computed one step for
nothing, whose output the engine drops. Speculative decoding and KV transfer run with
synchronous steps (config.py: the next schedule needs the accepted drafts, and the KV
connector's admissions and leases are decided on a finished step).

A request that cannot get its blocks while it is the only one holding any will never get
them: it ends with an error at once (`SchedulerOutput.failed`) instead of preempting itself
for ever. Start-up refuses a `max_model_len` the cache cannot hold, so this is a last guard.

With vLLM's flags: `long_prefill_token_threshold` caps the tokens one request computes in a
step, so while a long prompt prefills the rest of the budget serves decodes and new
arrivals; without `enable_chunked_prefill` a waiting prompt is admitted only when all its
uncomputed tokens fit the step's remaining budget.

With `--kv-transfer-config` (cpserve.kv_transfer) a `connector` takes part: a request whose
prompt KV another instance computed is admitted by allocating its blocks and waits aside
until they are filled, then comes back with its prompt counted as computed; a finished
request may leave its blocks under a lease for another instance to read.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cpserve.config import SchedulerConfig
from cpserve.kv.manager import KVCacheManager
from cpserve.request import Request, RequestStatus

if TYPE_CHECKING:
    from cpserve.kv_transfer.scheduler_side import KVTransferScheduler


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    new_block_ids: list[int]
    is_new: bool  # first step since admission (or re-admission): workers get the whole table
    # Drafts computed after the request's last token (the tail of the new tokens), to verify.
    draft_token_ids: list[int] = field(default_factory=list)
    start_pos: int = field(init=False)  # position of the first token computed this step
    # This step computes the request's last known token, so its logits give a new token.
    completes: bool = field(init=False)

    def __post_init__(self) -> None:
        self.start_pos = self.request.num_computed_tokens
        known = self.num_new_tokens - len(self.draft_token_ids)
        self.completes = self.start_pos + known == self.request.num_tokens_with_pending

    @property
    def num_known_tokens(self) -> int:
        """The new tokens that are not drafts (known, or pending under async scheduling)."""
        return self.num_new_tokens - len(self.draft_token_ids)

    @property
    def token_ids(self) -> list[int]:
        """The tokens this step computes, known ones then the drafts (a pending token, not
        known yet, is missing: `LLMEngine._plan` puts PENDING_TOKEN in its place)."""
        r, known = self.request, self.num_known_tokens
        return r.all_token_ids[self.start_pos:self.start_pos + known] + self.draft_token_ids


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests whose KV the workers can forget: finished, aborted or preempted since last step.
    freed_request_ids: list[str] = field(default_factory=list)
    num_preempted: int = 0
    # Finished with an error this step (`Request.error` says why); they need an output.
    failed: list[Request] = field(default_factory=list)
    kv_ops: dict | None = None  # for the ranks: KV transfer between instances

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return (not self.scheduled and not self.freed_request_ids and not self.failed
                and not self.kv_ops)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, lookahead_tokens: int = 0,
                 max_model_len: int | None = None,
                 connector: KVTransferScheduler | None = None) -> None:
        self.config = config
        self.kv = kv
        # Slots past a completing step that its request will write before the next one
        # (an MTP module drafting), allocated with the step's, never past max_model_len.
        self.lookahead_tokens = lookahead_tokens
        self.max_model_len = max_model_len
        self.connector = connector  # KV transfer between instances, if configured
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._freed: list[str] = []
        self.num_preemptions_total = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running
                    or (self.connector is not None and self.connector.has_work()))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(freed_request_ids=self._freed)
        self._freed = []
        budget = self.config.max_num_batched_tokens
        now = time.time()
        if self.connector is not None:
            ready, failed = self.connector.begin_step()
            self.waiting.extendleft(reversed(ready))
            for request in failed:
                self.finish(request, RequestStatus.FINISHED_ERROR)
                out.failed.append(request)

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            known = self._capped(request.num_tokens_with_pending - request.num_computed_tokens)
            if known <= 0 or request.length_reached_with_pending:
                i += 1  # nothing to compute until its pending token is known, or ever
                continue
            num_new = min(known + len(request.spec_token_ids), budget)
            drafts = request.spec_token_ids[:max(0, num_new - known)]
            new_blocks = self._allocate(request, num_new)
            while new_blocks is None:
                if len(self.running) == 1:  # alone and still short of blocks: never fits
                    self._fail_for_capacity(request, num_new, out)
                    break
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is request:
                    break
                new_blocks = self._allocate(request, num_new)
            if new_blocks is None:
                break
            out.scheduled.append(ScheduledRequest(request, num_new, new_blocks, is_new=False,
                                                  draft_token_ids=drafts))
            budget -= num_new
            i += 1

        loading = len(self.connector.loads) if self.connector is not None else 0
        while (self.waiting and budget > 0 and not out.num_preempted
               and len(self.running) + loading < self.config.max_num_seqs):
            request = self.waiting[0]
            if request.num_pending_tokens:
                break  # preempted while its last token was sampled: back once it is known
            if request.remote_prefill is not None:  # its prompt's KV comes from elsewhere
                if not self.connector.start_load(request):
                    break  # it waits for blocks
                self.waiting.popleft()
                loading += 1
                continue
            # KV computed already: only for a request whose KV came from another instance.
            computed = request.num_computed_tokens
            cached = (self.kv.find_cached_prefix(request)
                      if computed == 0 and request.may_read_prefix_cache else [])
            num_cached = len(cached) * self.kv.layout.virtual_block_size
            start = max(computed, num_cached)
            num_new = self._capped(request.num_tokens - start)
            if not self.config.enable_chunked_prefill and num_new > budget:
                break  # the whole prompt in one step, or not yet
            num_new = min(num_new, budget)
            new_blocks = self._allocate(request, num_new, cached, num_cached)
            if new_blocks is None:
                if self.running:
                    break  # it waits for running requests to free blocks
                self._fail_for_capacity(request, num_new, out)
                continue
            self.waiting.popleft()
            if computed == 0:
                self.kv.record_prefix_lookup(request.num_tokens, num_cached)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = start
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, new_blocks, is_new=True))
            budget -= num_new
        if self.connector is not None:
            out.kv_ops = self.connector.take_ops()
        for item in out.scheduled:
            # Drafts count once accepted (`commit_accepted`).
            item.request.num_computed_tokens += item.num_known_tokens
            item.request.num_pending_tokens += item.completes
        return out

    def _allocate(self, request: Request, num_new: int, cached: list[int] = (),
                  num_cached: int = 0) -> list[int] | None:
        end = max(request.num_computed_tokens, num_cached) + num_new
        lookahead = 0
        if self.lookahead_tokens and end >= request.num_tokens_with_pending:
            lookahead = max(0, min(self.lookahead_tokens, self.max_model_len - end))
        return self.kv.allocate(request, num_new + lookahead, cached)

    def _fail_for_capacity(self, request: Request, num_new: int, out: SchedulerOutput) -> None:
        needed = max(request.num_computed_tokens, 0) + num_new
        request.error = (f"the request needs KV for {needed} tokens, more than the whole KV "
                         f"cache holds ({self.kv.capacity_tokens} tokens)")
        self.finish(request, RequestStatus.FINISHED_ERROR)
        out.failed.append(request)

    def _capped(self, num_new: int) -> int:
        """At most `long_prefill_token_threshold` tokens for one request in one step."""
        threshold = self.config.long_prefill_token_threshold
        return threshold if 0 < threshold < num_new else num_new

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request)
        request.preempt()
        self.waiting.appendleft(request)
        out.freed_request_ids.append(request.request_id)
        out.num_preempted += 1
        self.num_preemptions_total += 1

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Register the blocks the step filled for prefix caching (requests still running:
        a preempted one holds no blocks, a finished one is gone)."""
        for item in out.scheduled:
            if item.request.status == RequestStatus.RUNNING:
                self.kv.cache_full_blocks(item.request)

    def commit_accepted(self, request: Request) -> None:
        """After a verification step appended the accepted drafts and one more token: every
        token but that last one has its KV, whatever was accepted. The length comes from the
        global count, so rejected drafts' slots are simply written again by the next step."""
        if request.is_finished:
            return
        request.num_computed_tokens = request.num_tokens - 1
        self.kv.cache_full_blocks(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request (stop, length or abort) and free its KV blocks at once."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        request.finished_time = time.time()
        if self.connector is None or not self.connector.on_finish(request, status):
            self.kv.free(request)
        self._freed.append(request.request_id)
