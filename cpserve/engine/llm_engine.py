"""The engine core's loop: `schedule -> run -> postprocess`, one step at a time.

The engine core lives on the driver (rank 0): in the engine process behind the server
(`core_process.py`), in the user's process behind the offline `LLM`. It knows sequences of
token ids: it admits them, builds the step plan from the scheduler's decision, has the executor
run it on every rank, samples from the driver's logits and decides the stops that token ids
decide (eos, stop token ids, max_tokens, the context). Each step returns the news of every
sequence that progressed (`EngineCoreOutputs`).

Two features take part in the loop: speculative decoding (cpserve.spec_decode: the drafter
proposes after each step, the next step verifies, `_finish` accepts) and KV transfer between
instances (cpserve.kv_transfer: the scheduler's connector admits sequences whose prompt KV
comes from elsewhere and leases the KV of those another instance will decode); both run
with synchronous steps (config.py). Text, stop strings, logprob decoding and the `n`
completions of a request are a front end's (`input_processor.py`, `output_processor.py`).

With async scheduling (vLLM's; on by default on CUDA) the host works on step n+1 while the
GPU runs step n, so the GPU does not wait for the host between steps:

    step() call:     schedule n+1 ─ queue n+1 ─ finish n ─ queue sampling n+1 ─ return n's news
    GPU:             ...[ forward n ][ sample n ][ forward n+1 ........ ][ sample n+1 ]...
                                                  ^ its decodes read n's samples on the device

Finishing step n waits only for its own samples (an event after them), never for n+1.
Sampling of n+1 is queued after n is finished, so it sees every token before its own
(repetition penalty, min_tokens). What n+1 computed for a sequence that n's token stopped
(or that was aborted or failed meanwhile) is dropped; its KV blocks are freed at once all
the same. Without async scheduling each call schedules, runs and finishes one step.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cpserve.config import ConfigError, EngineConfig, check_kv_capacity
from cpserve.distributed.groups import layout_report
from cpserve.distributed.plan import PENDING_TOKEN, PlannedRequest, StepPlan
from cpserve.distributed.worker_pool import WorkerPool
from cpserve.engine.args import EngineArgs
from cpserve.engine.errors import QueueFullError
from cpserve.engine.executor import Executor
from cpserve.engine.input_processor import check_sequence
from cpserve.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
)
from cpserve.engine.sampler import (
    SampledBatch,
    Sampler,
    make_generator,
    prompt_logprobs,
)
from cpserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from cpserve.engine.step_inputs import PendingTokens
from cpserve.engine.step_logits import StepLogits, num_logit_rows, num_sample_rows
from cpserve.kv.layout import KVLayout
from cpserve.kv.manager import KVCacheManager
from cpserve.kv_transfer.params import for_request as kv_transfer_for
from cpserve.request import Request, RequestStatus
from cpserve.sampling_params import SamplingParams
from cpserve.spec_decode.drafter import build_drafter
from cpserve.spec_decode.metrics import SpecDecodeStats
from cpserve.spec_decode.rejection import accept, verification_rows

logger = logging.getLogger(__name__)


@dataclass
class QueuedStep:
    """A step on its way through the device: its outputs are not processed yet."""

    scheduled: SchedulerOutput
    logits: StepLogits
    samples: SampledBatch | None = None  # of logits.sampled_items, in that order


class LLMEngine:
    def __init__(self, config: EngineConfig, worker_pool: WorkerPool | None = None) -> None:
        self.config = config
        self.executor = Executor(config, worker_pool)
        try:
            check_kv_capacity(config, self.executor.num_blocks)
        except ConfigError:
            self.executor.shutdown()
            raise
        par = config.parallel
        layout = KVLayout(config.cache.block_size, par.num_kv_shards, par.interleave)
        self.kv = KVCacheManager(layout, self.executor.num_blocks,
                                 config.cache.enable_prefix_caching)
        self.kv_transfer = None  # prefill/decode disaggregation: leases and loads
        if config.kv_transfer is not None:
            from cpserve.kv_transfer.scheduler_side import KVTransferScheduler

            self.kv_transfer = KVTransferScheduler(config.kv_transfer, self.kv,
                                                   self.executor.runner.kv_transfer)
        spec = config.speculative
        self.scheduler = Scheduler(config.scheduler, self.kv,
                                   spec.lookahead_tokens if spec else 0,
                                   config.model.max_model_len, connector=self.kv_transfer)
        self.drafter = build_drafter(config, self.executor)
        self.spec_stats = SpecDecodeStats(spec.num_speculative_tokens) if spec else None
        print(layout_report(par, self.executor.num_blocks, config.cache.block_size),
              file=sys.stderr, flush=True)
        if self.executor.runner.kv_report:  # an FP8 cache: its scales and what it buys
            print(self.executor.runner.kv_report, file=sys.stderr, flush=True)
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Request] = {}
        self.async_scheduling = config.scheduler.async_scheduling
        self._in_flight: QueuedStep | None = None  # async scheduling: the step n above
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs, worker_pool: WorkerPool | None = None) -> LLMEngine:
        return cls(args.create_engine_config(), worker_pool)

    @property
    def device(self) -> torch.device:
        return self.executor.device

    # Requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Queue one sequence. Bad input raises ValueError and changes nothing."""
        self.add_requests([EngineCoreRequest(request_id, list(prompt_token_ids), params,
                                             arrival_time or time.time())])

    def add_requests(self, requests: list[EngineCoreRequest],
                     max_waiting: int | None = None) -> None:
        """Queue sequences, all or none: ValueError (bad input, a message for the user) or,
        past `max_waiting` waiting sequences, QueueFullError, and nothing is queued."""
        if max_waiting is not None:
            if len(requests) > max_waiting:  # could never be admitted: the caller's error
                raise ValueError(
                    f"the request asks for {len(requests)} sequences, more than the server "
                    f"queues at once (--max-waiting-requests {max_waiting})")
            num_waiting = len(self.scheduler.waiting)
            if num_waiting + len(requests) > max_waiting:
                raise QueueFullError(
                    f"the server is busy: {num_waiting} requests are waiting, the limit is "
                    f"{max_waiting}; retry later")
        ids = set()
        for r in requests:
            if r.request_id in self.requests or r.request_id in ids:
                raise ValueError(f"request id {r.request_id!r} is already in use")
            ids.add(r.request_id)
            if r.params.n != 1:
                raise ValueError("the engine core runs one sequence per request: the front "
                                 "end fans n completions out")
            check_sequence(self.config, r.prompt_token_ids, r.params)
        for r in requests:
            params = r.params
            params._eos_token_ids = self.config.model.eos_token_ids
            generator = (make_generator(params.seed, self.device) if params.seed is not None
                         else None)
            request = Request(r.request_id, r.prompt_token_ids, params, r.arrival_time,
                              generator=generator)
            transfer = kv_transfer_for(self.config, params)
            if transfer is not None:
                request.remote_decode, request.remote_prefill = (transfer.remote_decode,
                                                                 transfer.remote_prefill)
            self.requests[r.request_id] = request
            self.scheduler.add_request(request)
            if r.counts_prompt:
                self.prompt_tokens_total += len(r.prompt_token_ids)

    def abort_request(self, request_ids: Iterable[str]) -> None:
        """Stop sequences and free their KV blocks at once; unknown ids are ignored."""
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is not None:
                self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        """Sequences to run, or a queued step whose news is still to come."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # One step ------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """The news of the step this call runs, or with async scheduling of the one queued by
        the call before. A call that finds nothing queued queues a step first, so it too
        returns what a step did (no outputs and no tokens still mean nothing could run)."""
        if self.async_scheduling and self._in_flight is None:
            self._in_flight = self._schedule_and_run()
            if self._in_flight is not None:
                self._queue_sampling(self._in_flight)
        queued = self._schedule_and_run()
        finished, self._in_flight = self._in_flight, None
        news = self._finish(finished) if finished is not None else None
        if queued is not None:
            self._queue_sampling(queued)
            if self.async_scheduling:
                self._in_flight = queued
            else:
                news = self._finish(queued)
        return news or EngineCoreOutputs([], self.stats(), time.time())

    def _schedule_and_run(self) -> QueuedStep | None:
        scheduled = self.scheduler.schedule()
        return None if scheduled.is_empty else self._run(scheduled)

    def _run(self, out: SchedulerOutput) -> QueuedStep:
        """Plan the step and queue it on every rank (prompt logprobs are consumed as their
        logits come)."""
        logits = StepLogits(out.scheduled, self.config.model.vocab_size,
                            self._collect_prompt_logprobs)
        plan, pending = self._plan(out)
        self.executor.execute(plan, logits, pending)
        return QueuedStep(out, logits)

    def _plan(self, out: SchedulerOutput) -> tuple[StepPlan, PendingTokens | None]:
        """The plan, and where the values of its pending tokens are: a sequence's last token
        when the queued step is still sampling it."""
        requests, pending_rows = [], []
        for item in out.scheduled:
            r = item.request
            block_ids = self.kv.block_table(r.request_id) if item.is_new else item.new_block_ids
            known = item.num_known_tokens
            token_ids = r.all_token_ids[item.start_pos:item.start_pos + known]
            if len(token_ids) < known:  # only ever its one pending token
                pending_rows.append(self._pending_row(r))
                token_ids = token_ids + [PENDING_TOKEN]
            requests.append(PlannedRequest(
                r.request_id, token_ids + item.draft_token_ids, item.start_pos,
                list(block_ids), item.is_new, num_logit_rows(item), len(item.draft_token_ids)))
        plan = StepPlan(requests, list(out.freed_request_ids), kv=out.kv_ops)
        if not pending_rows:
            return plan, None
        return plan, PendingTokens(self._in_flight.samples.token_ids, pending_rows)

    def _pending_row(self, r: Request) -> int:
        queued = self._in_flight
        items = queued.logits.sampled_items if queued is not None else []
        for j, item in enumerate(items):
            if item.request is r:
                return j
        raise RuntimeError(f"request {r.request_id} has a pending token no queued step samples")

    def _queue_sampling(self, queued: QueuedStep) -> None:
        """Queue the sampling of every row that completes a sequence. Rows already known to
        fail are sampled too (their tokens are dropped): no host synchronisation."""
        items = queued.logits.sampled_items
        if not items:
            return
        # Parameters were validated when the request came: what the sampler could still
        # raise would be a bug of the engine's, not one request's.
        rows = [row for item in items
                for row in verification_rows(item.request, item.draft_token_ids)]
        queued.samples = self.sampler.sample(queued.logits.sample_logits, rows)

    def _finish(self, queued: QueuedStep) -> EngineCoreOutputs:
        """Append the step's tokens and check stops. What goes wrong for one sequence (logits
        that are not finite, its prompt logprobs failing) fails it alone. Sequences that
        ended since the step was queued (their news already sent) get none."""
        out = queued.scheduled
        self.scheduler.update_after_step(out)  # blocks the step filled, before any finish
        failures = dict(queued.logits.failures)
        news: dict[str, EngineCoreOutput] = {}
        tokens = queued.samples.resolve() if queued.samples is not None else []
        first = 0
        for item in queued.logits.sampled_items:
            r = item.request
            mine = tokens[first:first + num_sample_rows(item)]
            first += len(mine)
            if r.is_finished or r in failures:
                continue  # stopped, aborted or failed since the step was queued
            if not all(token.finite for token in mine):
                failures[r] = "the model's logits for the next token are not finite (NaN or infinity)"
                continue
            # One token, or for a request verifying drafts the accepted ones and the next.
            accepted = accept(item.draft_token_ids, mine)
            o = self._news(r, news)
            for token in accepted:
                r.append_token(token.token_id)
                self.generation_tokens_total += 1
                o.new_token_ids.append(token.token_id)
                o.new_logprobs.append(token.logprob)
                if r.params.logprobs is not None:
                    o.new_top_logprobs = (o.new_top_logprobs or []) + [token.top_logprobs]
                status = self._stop_status(r, token.token_id)
                if status is not None:  # the tokens after a stop are dropped
                    self.scheduler.finish(r, status)
                    break
            if item.draft_token_ids:
                o.new_draft_tokens = len(item.draft_token_ids)
                o.new_accepted_tokens = len(accepted) - 1
                self._record_verification(item, num_accepted=len(accepted) - 1)
        for r, message in failures.items():
            if not r.is_finished:
                self._fail(r, message)
                self._news(r, news)
        if self.drafter is not None:
            self.drafter.propose(out)
        for r in out.failed:
            if self._is_live(r):
                self._news(r, news)
        for item in out.scheduled:
            r = item.request
            if r.new_prompt_logprobs and self._is_live(r):
                self._news(r, news).new_prompt_logprobs = r.new_prompt_logprobs
                r.new_prompt_logprobs = []
        for o in news.values():
            r = self.requests[o.request_id]
            if r.is_finished:
                o.finish_reason, o.stop_reason, o.error = r.status.value, r.stop_reason, r.error
                o.kv_transfer_params = r.kv_transfer_output
                del self.requests[o.request_id]
        return EngineCoreOutputs(list(news.values()), self.stats(), time.time(), out.num_tokens)

    def _is_live(self, r: Request) -> bool:
        """Not yet reported ended nor aborted (its id may already be a new sequence's)."""
        return self.requests.get(r.request_id) is r

    @staticmethod
    def _news(r: Request, news: dict[str, EngineCoreOutput]) -> EngineCoreOutput:
        o = news.get(r.request_id)
        if o is None:
            o = news[r.request_id] = EngineCoreOutput(
                r.request_id, num_cached_tokens=r.num_cached_tokens,
                first_scheduled_time=r.first_scheduled_time)
        return o

    def _stop_status(self, r: Request, token_id: int) -> RequestStatus | None:
        """The stops token ids decide (stop strings are the front end's)."""
        params = r.params
        if len(r.output_token_ids) >= params.min_tokens:
            if not params.ignore_eos and token_id in params._eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                r.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if (params.max_tokens is not None and len(r.output_token_ids) >= params.max_tokens) \
                or r.num_tokens >= self.config.model.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _record_verification(self, item: ScheduledRequest, num_accepted: int) -> None:
        r, num_drafts = item.request, len(item.draft_token_ids)
        r.num_draft_tokens += num_drafts
        r.num_accepted_tokens += num_accepted
        self.spec_stats.observe(num_drafts, num_accepted)
        self.scheduler.commit_accepted(r)

    def _fail(self, r: Request, message: str) -> None:
        logger.warning("request %s failed: %s", r.request_id, message)
        r.error = message
        self.scheduler.finish(r, RequestStatus.FINISHED_ERROR)

    def _collect_prompt_logprobs(self, item: ScheduledRequest, offset: int,
                                 logits: torch.Tensor) -> str | None:
        """Row i of `logits` predicts the token at position item.start_pos + offset + i + 1.
        Returns why the request must fail, if it must."""
        r = item.request
        start = item.start_pos + offset
        targets = r.prompt_token_ids[start + 1:start + 1 + logits.shape[0]]
        first_missing = r.num_prompt_logprobs - (start + 1)  # rows already collected
        if not len(targets) > first_missing >= 0:
            return None
        rows = logits[first_missing:len(targets)]
        if not torch.isfinite(rows).all():
            return "the model's logits for the prompt tokens are not finite (NaN or infinity)"
        new = prompt_logprobs(rows, targets[first_missing:], r.params.prompt_logprobs)
        r.new_prompt_logprobs.extend(new)
        r.num_prompt_logprobs += len(new)
        return None

    # Introspection -------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prefix_cache_queries_total=self.kv.prefix_queries,
            prefix_cache_hits_total=self.kv.prefix_hits,
            spec_decode=self.spec_stats.snapshot() if self.spec_stats else None,
            kv_transfer=self.kv_transfer.snapshot() if self.kv_transfer is not None else None,
        )

    def check_integrity(self) -> None:
        self.kv.check_integrity()

    def kv_transfer_status(self) -> dict:
        """Leases, loads and counters of KV transfer, after checking the block pool."""
        self.check_integrity()
        return {**self.kv_transfer.status(), "integrity": "ok"}

    def shutdown(self) -> None:
        if self.kv_transfer is not None:
            self.kv_transfer.close()
        self.executor.shutdown()
