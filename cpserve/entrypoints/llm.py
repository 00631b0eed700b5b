"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import fields

from tqdm.auto import tqdm

from cpserve.distributed.worker_pool import WorkerPool
from cpserve.engine.args import EngineArgs
from cpserve.engine.llm_engine import LLMEngine
from cpserve.outputs import RequestOutput
from cpserve.sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """Generate text for batches of prompts. Keyword arguments are `EngineArgs` fields
    (`tensor_parallel_size`, `block_size`, `max_num_batched_tokens`, ...)."""

    def __init__(self, model: str = "tiny", worker_pool: WorkerPool | None = None, **kwargs) -> None:
        known = {f.name for f in fields(EngineArgs)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown LLM argument(s): {', '.join(unknown)}")
        # A worker pool of the same layout can be passed to reuse running ranks.
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs), worker_pool)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` uses without sampling parameters: the model's generation config
        defaults (`generation_config="auto"`, as vLLM), else SamplingParams()."""
        return SamplingParams(**self.engine.config.sampling_defaults)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. Invalid prompts raise before anything runs."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")

        request_ids = []
        try:
            for prompt, p in zip(prompts, params):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, prompt, p)
                request_ids.append(request_id)
        except Exception:
            self.engine.abort_request(request_ids)  # nothing half-queued stays behind
            raise

        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            try:
                while len(finished) < len(request_ids):
                    for output in self.engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            bar.update(1)
            except BaseException:
                self.engine.abort_request(request_ids)
                raise
        return [finished[i] for i in request_ids]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
