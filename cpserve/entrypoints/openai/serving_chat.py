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
    sse,
    sse_error,
    usage,
)
from cpserve.outputs import CompletionOutput, RequestOutput


class ChatServing:
    def __init__(self, serving: OpenAIServing) -> None:
        self.serving = serving

    async def create(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
        s = self.serving
        s.check_model(req.model)
        s.check_ready()
        if req.tools:
            raise APIError(400, "tools are not supported", "tools")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        prompt = await s.encode_chat(req.messages, req.add_generation_prompt)
        requested = req.max_completion_tokens or req.max_tokens
        params = s.sampling_params(
            req, max_tokens=s.max_tokens_for(len(prompt.token_ids), requested),
            logprobs=(req.top_logprobs or 0) if req.logprobs else None, prompt_logprobs=None)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await add_to_engine(s.engine, [(request_id, prompt.token_ids, params)])
        run = _Run(s, req, request_id, prompt, s.holdback(params))
        if req.stream:
            return SSEResponse(run.stream(stream))
        finals = await collect_final(s.engine, stream, raw_request)
        return JSONResponse(run.response(finals[request_id]))


class _Run:
    """One chat call in flight: turns engine outputs into choices and chunks."""

    def __init__(self, serving: OpenAIServing, req: ChatCompletionRequest, request_id: str,
                 prompt: Prompt, holdback: int) -> None:
        self.s = serving
        self.req = req
        self.id = request_id
        self.created = int(time.time())
        self.prompt = prompt
        self.states = [ChoiceState(k, holdback) for k in range(req.n)]

    def _logprobs(self, state: ChoiceState, c: CompletionOutput) -> dict | None:
        if not self.req.logprobs:
            return None
        new_ids = c.token_ids[state.tokens_sent:]
        positions = (c.logprobs or [])[state.tokens_sent:]
        return {"content": self.s.chat_logprobs(new_ids, positions, self.req.top_logprobs or 0)}

    def response(self, out: RequestOutput) -> dict:
        choices = []
        for c in out.outputs:
            state = self.states[c.index]
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(state, c),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            })
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.s.model_name,
            "choices": choices,
            "usage": usage([self.prompt], [out]),
        }

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.s.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return sse(body)

    def _delta(self, c: CompletionOutput) -> dict | None:
        state = self.states[c.index]
        logprobs = self._logprobs(state, c)
        state.tokens_sent = len(c.token_ids)
        finished = c.finished()
        text = state.next_text(c.text, finished)
        if not text and not (logprobs and logprobs["content"]) and not finished:
            return None
        return {
            "index": c.index,
            "delta": {"content": text} if text else {},
            "logprobs": logprobs,
            "finish_reason": c.finish_reason if finished else None,
            "stop_reason": c.stop_reason if finished else None,
        }

    async def stream(self, stream: RequestStream) -> AsyncIterator[str]:
        latest: RequestOutput | None = None
        try:
            # The role first, as OpenAI does, before any token is ready.
            yield self._chunk([{"index": k, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}
                               for k in range(self.req.n)])
            while not stream.finished:
                for out in (await stream.get()).values():
                    latest = out
                    for c in out.outputs:
                        choice = self._delta(c)
                        if choice is not None:
                            yield self._chunk([choice])
            if self.req.include_usage and latest is not None:
                yield self._chunk([], usage([self.prompt], [latest]))
        except Exception as exc:
            yield sse_error(exc)
        finally:
            self.s.engine.abort(stream.unfinished_ids)
        yield SSE_DONE
