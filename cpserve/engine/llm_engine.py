"""The engine loop: `schedule -> run -> postprocess`, one step at a time.

The engine lives on the driver (rank 0). It validates and admits requests, builds the step
plan from the scheduler's decision, has the executor run it on every rank, samples from the
driver's logits, and turns tokens into text and finished requests into outputs.

With async scheduling (vLLM's; on by default on CUDA) the host works on step n+1 while the
GPU runs step n, so the GPU does not wait for the host between steps:

    step() call:     schedule n+1 ─ queue n+1 ─ finish n ─ queue sampling n+1 ─ return n's outputs
    GPU:             ...[ forward n ][ sample n ][ forward n+1 ........ ][ sample n+1 ]...
                                                  ^ its decodes read n's samples on the device

Finishing step n waits only for its own samples (an event after them), never for n+1.
Sampling of n+1 is queued after n is finished, so it sees every token before its own
(repetition penalty, min_tokens). What n+1 computed for a request that n's token stopped
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
from cpserve.engine.executor import Executor
from cpserve.engine.output import OutputProcessor, ParentRequest
from cpserve.engine.sampler import (
    SampledBatch,
    Sampler,
    SamplingRow,
    make_generator,
    prompt_logprobs,
)
from cpserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from cpserve.engine.step_inputs import PendingTokens
from cpserve.engine.step_logits import StepLogits, num_logit_rows
from cpserve.kv.layout import KVLayout
from cpserve.kv.manager import KVCacheManager
from cpserve.outputs import RequestOutput
from cpserve.request import Request, RequestStatus
from cpserve.sampling_params import SamplingParams
from cpserve.tokenizer import PromptTooLongError, Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class QueuedStep:
    """A step on its way through the device: its outputs are not processed yet."""

    scheduled: SchedulerOutput
    logits: StepLogits
    samples: SampledBatch | None = None  # of logits.sampled_items, in that order


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_queries_total: int
    prefix_cache_hits_total: int


class LLMEngine:
    def __init__(self, config: EngineConfig, worker_pool: WorkerPool | None = None) -> None:
        self.config = config
        self.tokenizer = Tokenizer.from_pretrained(config.model.tokenizer or config.model.path)
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
        self.scheduler = Scheduler(config.scheduler, self.kv)
        print(layout_report(par, self.executor.num_blocks, config.cache.block_size),
              file=sys.stderr, flush=True)
        self.sampler = Sampler(config.seed)
        self.outputs = OutputProcessor(self.tokenizer, config.model.max_model_len)
        self.requests: dict[str, Request] = {}
        self.async_scheduling = config.scheduler.async_scheduling
        self._in_flight: QueuedStep | None = None  # async scheduling: the step n above
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.last_step_num_tokens = 0  # tokens computed by the last step (a metric)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, worker_pool: WorkerPool | None = None) -> LLMEngine:
        return cls(args.create_engine_config(), worker_pool)

    @property
    def device(self) -> torch.device:
        return self.executor.device

    # Requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | dict,
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        """Validate and queue a request. Bad input raises ValueError and changes nothing."""
        if request_id in self.outputs.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        params.validate()
        self._check_logprobs(params)
        text, token_ids = self._tokenize(prompt)
        self._check_prompt(token_ids)
        self._check_token_ids(params)
        params._eos_token_ids = self.config.model.eos_token_ids
        children = []
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            child_params = params
            if index > 0 and params.prompt_logprobs is not None:
                child_params = _copy_params(params, prompt_logprobs=None)
            generator = None
            if params.seed is not None:
                generator = make_generator(params.child_seed(index), self.device)
            children.append(Request(child_id, token_ids, child_params, arrival_time,
                                    parent_id=request_id, index=index, generator=generator))
        self.outputs.add(ParentRequest(request_id, text, token_ids, params, children))
        for child in children:
            self.requests[child.request_id] = child
            self.scheduler.add_request(child)
        self.prompt_tokens_total += len(token_ids)

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
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
                return prompt, self.tokenizer.encode_within(prompt, self._max_prompt_tokens)
            except PromptTooLongError as exc:
                raise ValueError(self._too_long(exc.count)) from None
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("a prompt must be a string, a list of token ids, or a dict with "
                         "'prompt' or 'prompt_token_ids'")

    def _check_logprobs(self, params: SamplingParams) -> None:
        limit = self.config.max_logprobs
        if limit == -1:
            limit = self.config.model.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and asked > limit:
                raise ValueError(f"{name}={asked} is more than this server returns per token: "
                                 f"at most {limit} (--max-logprobs)")

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: it must have at least one token")
        vocab = self.config.model.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        # Start-up made sure the KV cache holds max_model_len tokens (check_kv_capacity).
        if len(token_ids) > self._max_prompt_tokens:
            raise ValueError(self._too_long(str(len(token_ids))))

    @property
    def _max_prompt_tokens(self) -> int:
        return self.config.model.max_model_len - 1  # room for one generated token

    def _too_long(self, count: str) -> str:
        max_len = self.config.model.max_model_len
        return (f"the prompt has {count} tokens, but max_model_len is {max_len}: at most "
                f"{max_len - 1} prompt tokens leave room for one generated token")

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.config.model.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids),
                          ("logit_bias", params.logit_bias or ())):
            bad = sorted(t for t in ids if t >= vocab)
            if bad:
                raise ValueError(f"{name} has token id {bad[0]}, outside the vocabulary "
                                 f"[0, {vocab})")

    def abort_request(self, request_ids: Iterable[str]) -> None:
        """Stop requests (by the id given to add_request) and free their KV blocks at once."""
        for request_id in request_ids:
            parent = self.outputs.parents.pop(request_id, None)
            if parent is None:
                continue
            for child in parent.children:
                self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)
                self.requests.pop(child.request_id, None)

    def has_unfinished_requests(self) -> bool:
        """Requests to run, or a queued step whose outputs are still to come."""
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # One step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Outputs of the requests a step moved on: the step this call runs, or with async
        scheduling the one queued by the call before. A call that finds nothing queued
        queues a step first, so it too returns what a step did (an empty list still means
        nothing could run)."""
        self.last_step_num_tokens = 0
        if self.async_scheduling and self._in_flight is None:
            self._in_flight = self._schedule_and_run()
            if self._in_flight is not None:
                self._queue_sampling(self._in_flight)
        queued = self._schedule_and_run()
        outputs = self._finish(self._in_flight) if self._in_flight is not None else []
        self._in_flight = None
        if queued is not None:
            self._queue_sampling(queued)
            if self.async_scheduling:
                self._in_flight = queued
            else:
                outputs = self._finish(queued)
        return outputs

    def _schedule_and_run(self) -> QueuedStep | None:
        scheduled = self.scheduler.schedule()
        self.last_step_num_tokens += scheduled.num_tokens
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
        """The plan, and where the values of its pending tokens are: a request's last token
        when the queued step is still sampling it."""
        requests, pending_rows = [], []
        for item in out.scheduled:
            r = item.request
            block_ids = self.kv.block_table(r.request_id) if item.is_new else item.new_block_ids
            end = item.start_pos + item.num_new_tokens
            token_ids = r.all_token_ids[item.start_pos:end]
            if len(token_ids) < item.num_new_tokens:  # only ever its one pending token
                pending_rows.append(self._pending_row(r))
                token_ids = token_ids + [PENDING_TOKEN]
            requests.append(PlannedRequest(r.request_id, token_ids, item.start_pos,
                                           list(block_ids), item.is_new, num_logit_rows(item)))
        plan = StepPlan(requests, list(out.freed_request_ids))
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
        """Queue the sampling of every row that completes a request. Rows already known to
        fail are sampled too (their tokens are dropped): no host synchronisation."""
        items = queued.logits.sampled_items
        if not items:
            return
        # Parameters were validated when the request came: what the sampler could still
        # raise would be a bug of the engine's, not one request's.
        rows = [SamplingRow(item.request.params, item.request.generator,
                            item.request.output_token_ids, item.request.prompt_token_ids)
                for item in items]
        queued.samples = self.sampler.sample(queued.logits.sample_logits, rows)

    def _finish(self, queued: QueuedStep) -> list[RequestOutput]:
        """Append the step's tokens and check stops. What goes wrong for one request (logits
        that are not finite, its prompt logprobs failing) fails it alone."""
        out = queued.scheduled
        self.scheduler.update_after_step(out)  # blocks the step filled, before any finish
        failures = dict(queued.logits.failures)
        tokens = queued.samples.resolve() if queued.samples is not None else []
        now = time.time()
        for item, token in zip(queued.logits.sampled_items, tokens):
            r = item.request
            if r.is_finished or r in failures:
                continue  # stopped, aborted or failed since the step was queued
            if not token.finite:
                failures[r] = "the model's logits for the next token are not finite (NaN or infinity)"
                continue
            if r.first_token_time is None:
                r.first_token_time = now
            r.last_token_time = now
            r.append_token(token.token_id)
            self.generation_tokens_total += 1
            status = self.outputs.on_token(r, token)
            if status is not None:
                self.scheduler.finish(r, status)
        for r, message in failures.items():
            if not r.is_finished:
                self._fail(r, message)
        touched = {item.request.parent_id for item in out.scheduled}
        touched.update(r.parent_id for r in out.failed)
        return self.outputs.make_outputs(touched, self.requests)

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
        first_missing = len(r.prompt_logprobs) - (start + 1)  # rows already collected
        if not len(targets) > first_missing >= 0:
            return None
        rows = logits[first_missing:len(targets)]
        if not torch.isfinite(rows).all():
            return "the model's logits for the prompt tokens are not finite (NaN or infinity)"
        new = prompt_logprobs(rows, targets[first_missing:], r.params.prompt_logprobs)
        self.outputs.decode_logprobs(new)
        r.prompt_logprobs.extend(new)
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
        )

    def check_integrity(self) -> None:
        self.kv.check_integrity()

    def shutdown(self) -> None:
        self.executor.shutdown()


def _copy_params(params: SamplingParams, **changes) -> SamplingParams:
    from dataclasses import replace

    return replace(params, **changes)
