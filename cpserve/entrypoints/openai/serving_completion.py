"""POST /v1/completions: text completion, streamed or not, with echo and legacy logprobs.

Each prompt of the request is one engine request carrying `n` completions; choice `k` of
prompt `i` has index `i * n + k`, as in OpenAI's API. `echo` puts the prompt in front of the
text and, with `logprobs`, the prompt tokens' logprobs in front of the generated ones (the first
prompt token has none), which is what lm-evaluation-harness reads. `max_tokens=0` with `echo`
scores the prompt without generating: one token is computed and not returned.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from cpserve.engine.async_engine import RequestStream
from cpserve.entrypoints.openai.errors import APIError
from cpserve.entrypoints.openai.protocol import CompletionRequest
from cpserve.entrypoints.openai.serving import (
    SSE_DONE,
    ChoiceState,
    OpenAIServing,
    Prompt,
    SSEResponse,
    add_to_engine,
    collect_final,
    new_completion_logprobs,
    raise_if_failed,
    sse,
    sse_error,
    usage,
    vllm_prompt_logprobs,
)
from cpserve.outputs import CompletionOutput, RequestOutput


class CompletionServing:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, req: CompletionRequest, raw_request: Request) -> Response:
        s = self.serving
        s.check_model(req.model)
        s.check_ready()
        s.check_supported(req)
        if req.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n (or be left out)", "best_of")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is allowed only with echo)",
                           "max_tokens")
        prompt_list = _prompt_list(req.prompt)
        s.check_queue_room(len(prompt_list) * req.n)
        prompts = await s.encode_prompts(prompt_list)
        echo_only = req.max_tokens == 0
        request_id = f"cmpl-{uuid.uuid4().hex}"
        # Echo with logprobs shows the prompt's; prompt_logprobs (vLLM) returns them apart.
        wanted = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None)
                  if k is not None]
        prompt_logprobs = max(wanted) if wanted else None
        engine_requests = []
        for i, prompt in enumerate(prompts):
            max_tokens = 1 if echo_only else req.max_tokens
            params = s.sampling_params(
                req, max_tokens=s.max_tokens_for(len(prompt.token_ids), max_tokens),
                logprobs=req.logprobs, prompt_logprobs=prompt_logprobs)
            engine_requests.append((f"{request_id}-{i}", prompt.token_ids, params))
        stream = await add_to_engine(s.engine, engine_requests, req.stream)
        run = _Run(s, req, request_id, prompts, echo_only)
        if req.stream:
            return SSEResponse(run.stream(stream))
        finals = await collect_final(s.engine, stream, raw_request)
        return JSONResponse(run.response(finals))


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


class _Run:
    """One completions call in flight: turns engine outputs into choices and chunks.

    A stream's outputs hold what each step added; a plain response's, everything."""

    def __init__(self, serving: OpenAIServing, req: CompletionRequest, request_id: str,
                 prompts: list[Prompt], echo_only: bool) -> None:
        self.s = serving
        self.req = req
        self.id = request_id
        self.created = int(time.time())
        self.prompts = prompts
        self.echo_only = echo_only
        self.states = {(i, k): ChoiceState(i * req.n + k)
                       for i in range(len(prompts)) for k in range(req.n)}
        self.cached_tokens: dict[int, int] = {}  # per prompt

    def _prompt_index(self, engine_request_id: str) -> int:
        return int(engine_request_id.rsplit("-", 1)[1])

    def _choice(self, i: int, out: RequestOutput, c: CompletionOutput) -> dict | None:
        """The piece of choice (i, c.index) that `c` holds (the whole choice for a plain
        response). None when there is nothing to send."""
        state = self.states[(i, c.index)]
        self.cached_tokens[i] = out.num_cached_tokens
        prompt = self.prompts[i]
        logprobs = new_completion_logprobs() if self.req.logprobs is not None else None
        text = ""
        if self.req.echo and not state.prefix_sent:
            state.prefix_sent = True
            text = prompt.text if prompt.text is not None else self.s.tokenizer.decode(
                prompt.token_ids)
            if logprobs is not None:
                positions = out.prompt_logprobs or [None] * len(prompt.token_ids)
                self.s.add_completion_logprobs(logprobs, state, prompt.token_ids, positions)
        finished = c.finished()
        if not self.echo_only:
            if logprobs is not None:
                self.s.add_completion_logprobs(logprobs, state, c.token_ids, c.logprobs or [])
            state.num_tokens += len(c.token_ids)
            text += c.text
        finish_reason = ("length" if self.echo_only else c.finish_reason) if finished else None
        if not text and not (logprobs and logprobs["tokens"]) and finish_reason is None:
            return None
        choice = {
            "index": state.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": None if self.echo_only else c.stop_reason,
        }
        if self.req.prompt_logprobs is not None:  # never streamed
            choice["prompt_logprobs"] = vllm_prompt_logprobs(self.s, out.prompt_logprobs)
        return choice

    def _usage(self) -> dict:
        generated = 0 if self.echo_only else sum(s.num_tokens for s in self.states.values())
        return usage(self.prompts, generated, sum(self.cached_tokens.values()))

    def response(self, finals: dict[str, RequestOutput]) -> dict:
        choices = []
        for rid, out in finals.items():
            i = self._prompt_index(rid)
            choices.extend(self._choice(i, out, c) for c in out.outputs)
        choices.sort(key=lambda choice: choice["index"])
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.s.model_name,
            "choices": choices,
            "usage": self._usage(),
        }

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.s.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return sse(body)

    async def stream(self, stream: RequestStream) -> AsyncIterator[str]:
        try:
            while not stream.finished:
                for out in await stream.get():
                    raise_if_failed(out)
                    i = self._prompt_index(out.request_id)
                    for c in out.outputs:
                        choice = self._choice(i, out, c)
                        if choice is not None:
                            yield self._chunk([choice])
            if self.req.include_usage:
                yield self._chunk([], self._usage())
        except Exception as exc:
            yield sse_error(exc)
        finally:
            self.s.engine.abort(stream.unfinished_ids)
        yield SSE_DONE
