"""The engine loop: `schedule -> run -> postprocess`, one step at a time.

The engine lives on the driver (rank 0). It validates and admits requests, builds the step
plan from the scheduler's decision, has the executor run it on every rank, samples from the
driver's logits, and turns tokens into text and finished requests into outputs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cpserve.config import EngineConfig
from cpserve.distributed.groups import layout_report
from cpserve.distributed.plan import PlannedRequest, StepPlan
from cpserve.distributed.worker_pool import WorkerPool
from cpserve.engine.args import EngineArgs
from cpserve.engine.executor import Executor
from cpserve.engine.output import OutputProcessor, ParentRequest
from cpserve.engine.sampler import Sampler, SamplingRow, make_generator, prompt_logprobs
from cpserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from cpserve.kv.layout import KVLayout
from cpserve.kv.manager import KVCacheManager
from cpserve.outputs import RequestOutput
from cpserve.request import Request, RequestStatus
from cpserve.sampling_params import SamplingParams
from cpserve.tokenizer import Tokenizer


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
        self.tokenizer = Tokenizer.from_pretrained(config.model.path)
        self.executor = Executor(config, worker_pool)
        par = config.parallel
        layout = KVLayout(config.cache.block_size, par.num_kv_shards, par.interleave)
        self.kv = KVCacheManager(layout, self.executor.num_blocks,
                                 config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        print(layout_report(par, self.executor.num_blocks, config.cache.block_size),
              file=sys.stderr, flush=True)
        if self.executor.runner.kv_report:  # an FP8 cache: its scales and what it buys
            print(self.executor.runner.kv_report, file=sys.stderr, flush=True)
        self.sampler = Sampler(config.seed)
        self.outputs = OutputProcessor(self.tokenizer, config.model.max_model_len)
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
    def add_request(self, request_id: str, prompt: str | list[int] | dict,
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        """Validate and queue a request. Bad input raises ValueError and changes nothing."""
        if request_id in self.outputs.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        params.validate()
        self._check_prompt(token_ids)
        params._eos_token_ids = self.config.model.eos_token_ids
        children = []
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            child_params = params
            if index > 0 and params.prompt_logprobs is not None:
                child_params = _copy_params(params, prompt_logprobs=None)
            generator = None
            if params.seed is not None:
                generator = make_generator(params.seed + index, self.device)
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
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("a prompt must be a string, a list of token ids, or a dict with "
                         "'prompt' or 'prompt_token_ids'")

    def _check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: it must have at least one token")
        vocab = self.config.model.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        max_len = self.config.model.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, but max_model_len is "
                             f"{max_len}: at most {max_len - 1} prompt tokens leave room for "
                             "one generated token")
        capacity = self.kv.capacity_tokens
        if len(token_ids) + 1 > capacity:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, more than the whole KV "
                             f"cache holds ({capacity} tokens)")

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
        return self.scheduler.has_unfinished()

    # One step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        logits = self.executor.execute(self._plan(scheduled))
        return self._postprocess(scheduled, logits)

    def _plan(self, out: SchedulerOutput) -> StepPlan:
        requests = []
        for item in out.scheduled:
            r = item.request
            num_logits = _num_logits(item)
            block_ids = self.kv.block_table(r.request_id) if item.is_new else item.new_block_ids
            requests.append(PlannedRequest(
                r.request_id, r.all_token_ids[item.start_pos:item.start_pos + item.num_new_tokens],
                item.start_pos, list(block_ids), item.is_new, num_logits))
        return StepPlan(requests, list(out.freed_request_ids))

    def _postprocess(self, out: SchedulerOutput, logits: torch.Tensor | None) -> list[RequestOutput]:
        self.scheduler.update_after_step(out)
        now = time.time()
        sample_items, sample_rows, rows = [], [], []
        row = 0
        for item in out.scheduled:
            r = item.request
            num_rows = _num_logits(item)
            if r.wants_prompt_logprobs:
                self._collect_prompt_logprobs(r, item.start_pos, logits[row:row + num_rows])
            if item.completes:
                sample_items.append(item)
                rows.append(row + num_rows - 1)
                sample_rows.append(SamplingRow(r.params, r.generator, r.output_token_ids))
            row += num_rows
        sampled = self.sampler(logits[rows], sample_rows) if sample_rows else []
        touched = {item.request.parent_id for item in out.scheduled}
        for item, token in zip(sample_items, sampled):
            r = item.request
            if r.first_token_time is None:
                r.first_token_time = now
            r.last_token_time = now
            r.append_token(token.token_id)
            self.generation_tokens_total += 1
            status = self.outputs.on_token(r, token)
            if status is not None:
                self.scheduler.finish(r, status)
        return self.outputs.make_outputs(touched, self.requests)

    def _collect_prompt_logprobs(self, r: Request, start: int, logits: torch.Tensor) -> None:
        """Row i of `logits` predicts the token at position start + i + 1."""
        targets = r.prompt_token_ids[start + 1:start + 1 + logits.shape[0]]
        first_missing = len(r.prompt_logprobs) - (start + 1)  # rows already collected
        if len(targets) > first_missing >= 0:
            new = prompt_logprobs(logits[first_missing:len(targets)], targets[first_missing:],
                                  r.params.prompt_logprobs)
            self.outputs.decode_logprobs(new)
            r.prompt_logprobs.extend(new)

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


def _num_logits(item: ScheduledRequest) -> int:
    """Logit rows a scheduled request needs: every new token while prompt logprobs are being
    collected, else the last one if it completes the request (to sample), else none."""
    return item.num_new_tokens if item.request.wants_prompt_logprobs else int(item.completes)


def _copy_params(params: SamplingParams, **changes) -> SamplingParams:
    from dataclasses import replace

    return replace(params, **changes)
