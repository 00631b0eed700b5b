"""The offline API, shaped like vLLM's: `LLM(model=...).generate(prompts, params)`.

The engine core runs in this process, stepped by `generate` (as vLLM's `LLM` can run it), with
the same front end as the server's: prompts through an `InputProcessor`, the core's per-step
news through an `OutputProcessor` that keeps each request's text until it finishes.

    LLM.generate ─ tokenize, fan out ─> LLMEngine.add_requests
                 <─ RequestOutput (final) ─ OutputProcessor <─ LLMEngine.step()
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import fields

from tqdm.auto import tqdm

from cpserve.distributed.worker_pool import WorkerPool
from cpserve.engine.args import EngineArgs
from cpserve.engine.input_processor import InputProcessor, load_tokenizer
from cpserve.engine.llm_engine import LLMEngine
from cpserve.engine.output_processor import OutputProcessor, RequestOutputKind
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
        self.tokenizer = load_tokenizer(self.engine.config)
        self._inputs = InputProcessor(self.engine.config, self.tokenizer)
        self._outputs = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

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

        request_ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                self._add(prompt, p, request_ids)
        except Exception:
            self._abort(request_ids)  # nothing half-queued stays behind
            raise

        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            try:
                while len(finished) < len(request_ids):
                    processed = self._outputs.process(self.engine.step())
                    self.engine.abort_request(processed.stopped)  # ended by a stop string
                    for output in processed.outputs:
                        finished[output.request_id] = output
                        bar.update(1)
            except BaseException:
                self._abort(request_ids)
                raise
        return [finished[i] for i in request_ids]

    def _add(self, prompt: PromptType, params: SamplingParams, request_ids: list[str]) -> None:
        text, token_ids = self._inputs.tokenize(prompt)
        request_id = str(next(self._ids))
        arrival = time.time()
        sequences = self._inputs.sequences(request_id, token_ids, params, arrival)
        self._outputs.add(request_id, text, token_ids, params, RequestOutputKind.FINAL, arrival)
        request_ids.append(request_id)
        self.engine.add_requests(sequences)

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort_request(self._outputs.abort(request_id))

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
