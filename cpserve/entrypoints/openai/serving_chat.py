"""POST /v1/chat/completions: the conversation rendered with the checkpoint's chat template.

The template is applied as transformers applies it, and the rendered text is tokenized without
adding special tokens again (the template writes BOS itself). Without `max_tokens` a reply may
fill the context: `max_model_len - prompt_len`, as in vLLM.
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
from cpserve.entrypoints.openai.protocol import ChatCompletionRequest
from cpserve.entrypoints.openai.serving import (
    SSE_DONE,
    ChoiceState,
    OpenAIServing,
    Prompt,
    SSEResponse,
    add_to_engine,
    collect_final,
    raise_if_failed,
    sse,
    sse_error,
    usage,
    vllm_prompt_logprobs,
)
from cpserve.outputs import CompletionOutput, RequestOutput


class ChatServing:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
        s = self.serving
        s.check_model(req.model)
        s.check_ready()
        s.check_supported(req)
        if req.tools:
            raise APIError(400, "tools are not supported", "tools")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        s.check_queue_room(req.n)
        prompt = await s.encode_chat(req.messages, req.add_generation_prompt)
        requested = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        params = s.sampling_params(
            req, max_tokens=s.max_tokens_for(len(prompt.token_ids), requested, param),
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            prompt_logprobs=req.prompt_logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await add_to_engine(s.engine, [(request_id, prompt.token_ids, params)],
                                     req.stream)
        run = _Run(s, req, request_id, prompt)
        if req.stream:
            return SSEResponse(run.stream(stream))
        finals = await collect_final(s.engine, stream, raw_request)
        return JSONResponse(run.response(finals[request_id]))


class _Run:
    """One chat call in flight: turns engine outputs into choices and chunks.

    A stream's outputs hold what each step added; a plain response's, everything."""

    def __init__(self, serving: OpenAIServing, req: ChatCompletionRequest, request_id: str,
                 prompt: Prompt) -> None:
        self.s = serving
        self.req = req
        self.id = request_id
        self.created = int(time.time())
        self.prompt = prompt
        self.states = [ChoiceState(k) for k in range(req.n)]
        self.cached_tokens = 0

    def _logprobs(self, c: CompletionOutput) -> dict | None:
        if not self.req.logprobs:
            return None
        return {"content": self.s.chat_logprobs(c.token_ids, c.logprobs or [],
                                                self.req.top_logprobs or 0)}

    def _usage(self) -> dict:
        return usage([self.prompt], sum(s.num_tokens for s in self.states), self.cached_tokens)

    def response(self, out: RequestOutput) -> dict:
        choices = []
        self.cached_tokens = out.num_cached_tokens
        for c in out.outputs:
            self.states[c.index].num_tokens = len(c.token_ids)
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            })
        response = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.s.model_name,
            "choices": choices,
            "usage": self._usage(),
        }
        if self.req.prompt_logprobs is not None:  # vLLM's extension, never streamed
            response["prompt_logprobs"] = vllm_prompt_logprobs(self.s, out.prompt_logprobs)
        return response

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.s.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return sse(body)

    def _delta(self, c: CompletionOutput) -> dict | None:
        """The next chunk of choice c. Its first one carries the role, and comes with the
        choice's first token (as in vLLM), not before the prefill: clients time the first
        chunk as the time to first token."""
        state = self.states[c.index]
        if not c.token_ids and not c.finished():
            return None
        logprobs = self._logprobs(c)
        state.num_tokens += len(c.token_ids)
        finished = c.finished()
        text = c.text
        delta = {"content": text} if text else {}
        if not state.prefix_sent:
            state.prefix_sent = True
            delta = {"role": "assistant", "content": text}
        elif not text and not (logprobs and logprobs["content"]) and not finished:
            return None
        return {
            "index": c.index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason if finished else None,
            "stop_reason": c.stop_reason if finished else None,
        }

    async def stream(self, stream: RequestStream) -> AsyncIterator[str]:
        try:
            while not stream.finished:
                for out in await stream.get():
                    raise_if_failed(out)
                    self.cached_tokens = out.num_cached_tokens
                    for c in out.outputs:
                        choice = self._delta(c)
                        if choice is not None:
                            yield self._chunk([choice])
            if self.req.include_usage:
                yield self._chunk([], self._usage())
        except Exception as exc:
            yield sse_error(exc)
        finally:
            self.s.engine.abort(stream.unfinished_ids)
        yield SSE_DONE
