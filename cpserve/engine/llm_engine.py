"""The engine core's loop: `schedule -> run -> postprocess`, one step at a time.

The engine core lives on the driver (rank 0): in the engine process behind the server
(`core_process.py`), in the user's process behind the offline `LLM`. It knows sequences of
token ids: it admits them, builds the step plan from the scheduler's decision, has the executor
run it on every rank, samples from the driver's logits and decides the stops that token ids
decide (eos, stop token ids, max_tokens, the context). Each step returns the news of every
sequence that progressed (`EngineCoreOutputs`).

Two features take part in the loop: speculative decoding (cpserve.spec_decode: the drafter
proposes after each step, the next step verifies, `_sample` accepts) and KV transfer between
instances (cpserve.kv_transfer: the scheduler's connector admits sequences whose prompt KV
comes from elsewhere and leases the KV of those another instance will decode). Text, stop strings, logprob decoding and the
`n` completions of a request are a front end's (`input_processor.py`, `output_processor.py`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable

import torch

from cpserve.config import ConfigError, EngineConfig, check_kv_capacity
from cpserve.distributed.groups import layout_report
from cpserve.distributed.plan import PlannedRequest, StepPlan
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
    SampledToken,
    Sampler,
    make_generator,
    prompt_logprobs,
)
from cpserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
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
        return self.scheduler.has_unfinished()

    # One step ------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return EngineCoreOutputs([], self.stats(), time.time())
        logits = StepLogits(scheduled.scheduled, self.config.model.vocab_size,
                            self._collect_prompt_logprobs)
        self.executor.execute(self._plan(scheduled), logits)
        return self._postprocess(scheduled, logits)

    def _plan(self, out: SchedulerOutput) -> StepPlan:
        requests = []
        for item in out.scheduled:
            r = item.request
            block_ids = self.kv.block_table(r.request_id) if item.is_new else item.new_block_ids
            requests.append(PlannedRequest(
                r.request_id, item.token_ids, item.start_pos, list(block_ids), item.is_new,
                num_logit_rows(item), len(item.draft_token_ids)))
        return StepPlan(requests, list(out.freed_request_ids), kv=out.kv_ops)

    def _postprocess(self, out: SchedulerOutput, logits: StepLogits) -> EngineCoreOutputs:
        """Sample, append and check stops. What goes wrong for one request (logits that are
        not finite, its prompt logprobs failing) fails it alone."""
        self.scheduler.update_after_step(out)
        failures = dict(logits.failures)
        news: dict[str, EngineCoreOutput] = {}
        for item, tokens in self._sample(logits, failures):
            r = item.request
            o = self._news(r, news)
            for token in tokens:  # one, or the accepted drafts and the token after them
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
                o.new_accepted_tokens = len(tokens) - 1
                self._record_verification(item, num_accepted=len(tokens) - 1)
        for r, message in failures.items():
            self._fail(r, message)
        if self.drafter is not None:
            self.drafter.propose(out)
        for r in (*failures, *out.failed):
            self._news(r, news)
        for item in out.scheduled:
            r = item.request
            if r.new_prompt_logprobs:
                self._news(r, news).new_prompt_logprobs = r.new_prompt_logprobs
                r.new_prompt_logprobs = []
        for o in news.values():
            r = self.requests[o.request_id]
            if r.is_finished:
                o.finish_reason, o.stop_reason, o.error = r.status.value, r.stop_reason, r.error
                o.kv_transfer_params = r.kv_transfer_output
                del self.requests[o.request_id]
        return EngineCoreOutputs(list(news.values()), self.stats(), time.time(), out.num_tokens)

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

    def _sample(self, logits: StepLogits, failures: dict[Request, str]
                ) -> list[tuple[ScheduledRequest, list[SampledToken]]]:
        """The new tokens of each request that completed this step, except failed ones: one,
        or for a request verifying drafts the accepted ones and the token after them."""
        items = logits.sampled_items
        if not items:
            return []
        finite = torch.isfinite(logits.sample_logits).all(dim=1).tolist()
        kept, kept_rows, rows = [], [], []
        first = 0
        for item in items:
            span = range(first, first + num_sample_rows(item))
            first = span.stop
            if item.request in failures:
                continue
            if not all(finite[j] for j in span):
                failures[item.request] = ("the model's logits for the next token are not "
                                          "finite (NaN or infinity)")
                continue
            kept.append(item)
            kept_rows.extend(span)
            rows.extend(verification_rows(item.request, item.draft_token_ids))
        if not kept:
            return []
        # Parameters were validated when the request came, and the logits are finite: what
        # the sampler could still raise would be a bug of the engine's, not one request's.
        tokens = self.sampler(logits.sample_logits[kept_rows], rows)
        result, first = [], 0
        for item in kept:
            mine = tokens[first:first + num_sample_rows(item)]
            first += len(mine)
            result.append((item, accept(item.draft_token_ids, mine)))
        return result

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
