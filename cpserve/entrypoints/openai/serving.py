"""What the completion and chat handlers share: prompts, sampling parameters, logprobs, SSE.

Tokenizing and chat-template rendering run off the event loop, in two lanes, each a thread
with a tokenizer of its own (a tokenizer is never used from two threads at once by us):

    texts up to LONG_TEXT_CHARS ──> the short lane (and /detokenize)
    longer texts ─────────────────> the long lane: a 10 MB prompt takes seconds to tokenize,
                                    and no short request waits behind it

The engine hands streamed requests one output per step that gives them news (new text, new
tokens); a stream sends one event for each. Non-streamed requests get one final output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cpserve.engine.async_engine import AsyncEngine, RequestOutputKind, RequestStream
from cpserve.engine.input_processor import load_tokenizer
from cpserve.entrypoints.openai.errors import APIError, error_body, to_api_error
from cpserve.entrypoints.openai.protocol import ChatMessage, SamplingFields
from cpserve.outputs import Logprob, PositionLogprobs, RequestOutput
from cpserve.sampling_params import SamplingParams
from cpserve.tokenizer import PromptTooLongError, Tokenizer

T = TypeVar("T")

# JSON has no -inf; OpenAI-compatible servers send this floor instead.
_MIN_LOGPROB = -9999.0
# Texts longer than this are tokenized in the long lane (about 30 ms of tokenizing).
LONG_TEXT_CHARS = 64 * 1024


@dataclass
class Prompt:
    text: str | None  # as the client sent it; None for token-id prompts
    token_ids: list[int]


@dataclass
class ChoiceState:
    """What one choice (one completion of one prompt) has been sent so far."""

    index: int
    prefix_sent: bool = False  # echoed prompt (completions) or role (chat)
    num_tokens: int = 0  # generated tokens sent (usage of a stream)
    text_offset: int = 0  # completions logprobs: offset of the next token in the text


class OpenAIServing:
    """Model-level state and helpers for the request handlers."""

    def __init__(self, engine: AsyncEngine, served_model_names: Sequence[str],
                 chat_template: str | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.chat_template = chat_template  # --chat-template; None: the tokenizer's own
        # Sampling fields a request leaves unset (--generation-config, as vLLM).
        self.defaults = engine.config.sampling_defaults
        self.model_names = list(served_model_names)
        self.model_name = self.model_names[0]
        self.max_model_len = engine.config.model.max_model_len
        self.vocab_size = engine.config.model.vocab_size
        self.max_num_seqs = engine.config.scheduler.max_num_seqs
        self._short_lane = ThreadPoolExecutor(1, thread_name_prefix="cpserve-tokenizer")
        self._long_lane = ThreadPoolExecutor(1, thread_name_prefix="cpserve-tokenizer-long")
        self._long_tokenizer: Tokenizer | None = None  # made in the long lane when first used

    def close(self) -> None:
        for lane in (self._short_lane, self._long_lane):
            lane.shutdown(wait=False, cancel_futures=True)

    # ---- checks ------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"{', '.join(self.model_names)}", "model")

    def check_ready(self) -> None:
        reason = self.engine.health()
        if reason is not None:
            raise APIError(503, reason)

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        # pydantic has already refused negative ids.
        if ids and max(ids) >= self.vocab_size:
            raise APIError(400, f"{param} contains token id {max(ids)}, but the vocabulary "
                                f"has {self.vocab_size} tokens", param)

    def check_supported(self, req: SamplingFields) -> None:
        """Refuse, naming the field, what cpserve cannot honour; check counts that do not
        depend on the prompt (before any tokenizing)."""
        for field, why in req.unsupported_fields():
            raise APIError(400, why, field)
        if req.n > self.max_num_seqs:
            raise APIError(400, f"n={req.n} is more than the server runs at once "
                                f"(--max-num-seqs {self.max_num_seqs})", "n")
        if req.prompt_logprobs is not None and req.stream:
            raise APIError(400, "prompt_logprobs cannot be streamed: ask without stream",
                           "prompt_logprobs")

    def check_queue_room(self, num_sequences: int) -> None:
        """A call of more sequences than the waiting queue holds can never be admitted: 400
        at once, before its prompts are tokenized (a busy queue is the engine's 503)."""
        limit = self.engine.max_waiting_requests
        if num_sequences > limit:
            raise APIError(400, f"the request asks for {num_sequences} sequences (prompts x n), "
                                f"more than the server queues at once "
                                f"(--max-waiting-requests {limit})", "prompt")

    def max_tokens_for(self, num_prompt_tokens: int, requested: int | None,
                       param: str = "max_tokens") -> int:
        """The requested budget; without one, whatever the context leaves (as in vLLM). A
        budget the context cannot hold is refused, as vLLM and OpenAI refuse it."""
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} "
                                f"tokens, but the prompt has {num_prompt_tokens} tokens, which "
                                "leaves no room to generate", "prompt")
        if requested is not None and requested > room:
            raise APIError(400, f"{param}={requested} is too large: this model's maximum "
                                f"context length is {self.max_model_len} tokens and the prompt "
                                f"has {num_prompt_tokens} tokens ({requested} > "
                                f"{self.max_model_len} - {num_prompt_tokens})", param)
        # The generation config's max_new_tokens caps every request, as in vLLM.
        limits = (room, requested, self.defaults.get("max_tokens"))
        return min(n for n in limits if n is not None)

    def sampling_params(self, req: SamplingFields, *, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None) -> SamplingParams:
        if req.stop_token_ids:
            self.check_token_ids(req.stop_token_ids, "stop_token_ids")
        logit_bias = None
        if req.logit_bias is not None:
            try:
                logit_bias = {int(token): bias for token, bias in req.logit_bias.items()}
            except ValueError:
                raise APIError(400, "logit_bias keys must be token ids (integers as strings)",
                               "logit_bias") from None
            self.check_token_ids([t for t in logit_bias if t >= 0], "logit_bias")
        try:
            return SamplingParams(
                n=req.n,
                temperature=self._field(req, "temperature", 1.0),
                top_p=self._field(req, "top_p", 1.0),
                top_k=self._field(req, "top_k", 0),
                min_p=self._field(req, "min_p", 0.0),
                repetition_penalty=self._field(req, "repetition_penalty", 1.0),
                seed=req.seed,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                logit_bias=logit_bias,
            )
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    def _field(self, req: SamplingFields, name: str, builtin: float) -> float:
        """The request's value, else the generation config's default, else vLLM's."""
        value = getattr(req, name)
        return value if value is not None else self.defaults.get(name, builtin)

    # ---- tokenizer -----------------------------------------------------------------------------

    async def in_tokenizer_thread(self, fn: Callable[[Tokenizer], T], size: int = 0) -> T:
        """`fn(tokenizer)` in the lane for an input of `size` characters."""
        loop = asyncio.get_running_loop()
        if size <= LONG_TEXT_CHARS:
            return await loop.run_in_executor(self._short_lane, fn, self.tokenizer)
        return await loop.run_in_executor(self._long_lane,
                                          lambda: fn(self._tokenizer_for_long_texts()))

    def _tokenizer_for_long_texts(self) -> Tokenizer:
        if self._long_tokenizer is None:  # in the long lane's thread, so loaded only there
            self._long_tokenizer = load_tokenizer(self.engine.config)
        return self._long_tokenizer

    def encode_text(self, tokenizer: Tokenizer, text: str, add_special_tokens: bool,
                    param: str, limit: int | None = None) -> list[int]:
        """Tokens of a prompt, refusing one that cannot fit the context without tokenizing
        all of a text far too long. In a tokenizer lane."""
        limit = self.max_model_len - 1 if limit is None else limit  # room for one token
        try:
            return tokenizer.encode_within(text, limit, add_special_tokens)
        except PromptTooLongError as exc:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} "
                                f"tokens, but the {param} has {exc.count} tokens (at most "
                                f"{limit} are allowed)", param) from None

    async def encode(self, text: str, add_special_tokens: bool, param: str,
                     limit: int | None = None) -> list[int]:
        return await self.in_tokenizer_thread(
            lambda tok: self.encode_text(tok, text, add_special_tokens, param, limit), len(text))

    async def encode_prompts(self, prompts: Sequence[str | list[int]]) -> list[Prompt]:
        def param(i: int) -> str:
            return "prompt" if len(prompts) == 1 else f"prompt.{i}"

        texts = [(i, p) for i, p in enumerate(prompts) if isinstance(p, str)]
        encoded = await asyncio.gather(*(self.encode(t, True, param(i)) for i, t in texts))
        by_index = dict(zip((i for i, _ in texts), encoded))
        result = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                result.append(Prompt(p, list(by_index[i])))
            else:
                self.check_token_ids(p, param(i))
                result.append(Prompt(None, list(p)))
        return result

    async def render_chat(self, messages: Sequence[ChatMessage],
                          add_generation_prompt: bool) -> str:
        """The conversation as the checkpoint's chat template writes it."""
        plain = [_message_dict(m) for m in messages]
        size = sum(len(str(m["content"])) for m in plain)

        def render(tokenizer: Tokenizer) -> str:
            return tokenizer.apply_chat_template(
                plain, add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template)

        try:
            return await self.in_tokenizer_thread(render, size)
        except Exception as exc:  # the template refused this conversation (a jinja raise)
            raise APIError(400, f"cannot apply the chat template: {exc}", "messages") from None

    async def encode_chat(self, messages: Sequence[ChatMessage],
                          add_generation_prompt: bool) -> Prompt:
        text = await self.render_chat(messages, add_generation_prompt)
        # The template already wrote BOS and the other special tokens.
        ids = await self.encode(text, False, "messages")
        return Prompt(text, list(ids))

    def token_str(self, token_id: int, logprob: Logprob | None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode_token(token_id)

    # ---- logprobs ------------------------------------------------------------------------------

    def _ranked(self, position: PositionLogprobs) -> list[tuple[int, Logprob]]:
        return sorted(position.items(), key=lambda kv: (kv[1].rank or 0, -kv[1].logprob))

    def add_completion_logprobs(self, out: dict[str, list], state: ChoiceState,
                                token_ids: Sequence[int],
                                positions: Sequence[PositionLogprobs | None]) -> None:
        """Append tokens to an OpenAI completions `logprobs` object (legacy format)."""
        for token_id, position in zip(token_ids, positions):
            chosen = position.get(token_id) if position else None
            text = self.token_str(token_id, chosen)
            out["tokens"].append(text)
            out["text_offset"].append(state.text_offset)
            state.text_offset += len(text)
            if position is None:  # the first prompt token has no logprob
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_finite(chosen.logprob) if chosen else None)
            out["top_logprobs"].append({self.token_str(tid, lp): _finite(lp.logprob)
                                        for tid, lp in self._ranked(position)})

    def chat_logprobs(self, token_ids: Sequence[int], positions: Sequence[PositionLogprobs],
                      top_n: int) -> list[dict]:
        """Entries of a chat `logprobs.content` list."""
        content = []
        for token_id, position in zip(token_ids, positions):
            chosen = position.get(token_id)
            text = self.token_str(token_id, chosen)
            top = [(tid, lp) for tid, lp in self._ranked(position)][:top_n]
            content.append({
                "token": text,
                "logprob": _finite(chosen.logprob) if chosen else _MIN_LOGPROB,
                "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := self.token_str(tid, lp)),
                                  "logprob": _finite(lp.logprob), "bytes": list(t.encode())}
                                 for tid, lp in top],
            })
        return content


def raise_if_failed(output: RequestOutput) -> None:
    """A completion the engine had to give up on fails the call (the other requests of the
    server go on): a 500 saying why, since nothing in the request was invalid."""
    for completion in output.outputs:
        if completion.finish_reason == "error":
            raise APIError(500, f"the engine could not complete this request: "
                                f"{completion.error}")


def vllm_prompt_logprobs(serving: OpenAIServing,
                         positions: Sequence[PositionLogprobs | None] | None) -> list | None:
    """`prompt_logprobs` as vLLM's API returns them: per prompt token None (the first) or
    {token id: {"logprob", "rank", "decoded_token"}}."""
    if positions is None:
        return None
    return [None if position is None else {
        str(token_id): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                        "decoded_token": serving.token_str(token_id, lp)}
        for token_id, lp in position.items()} for position in positions]


def new_completion_logprobs() -> dict[str, list]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def usage(prompts: Sequence[Prompt], completion_tokens: int, cached_tokens: int) -> dict:
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(exc: BaseException) -> str:
    error = to_api_error(exc)
    return sse(error_body(error.status, error.message, error.param))


def _finite(logprob: float) -> float:
    return logprob if logprob >= _MIN_LOGPROB else _MIN_LOGPROB  # also maps NaN to the floor


def _message_dict(message: ChatMessage) -> dict:
    content: Any = message.content
    if content is None:
        content = ""
    elif not isinstance(content, str):
        content = [part.model_dump() for part in content]
    plain = {"role": message.role, "content": content}
    if message.name is not None:
        plain["name"] = message.name
    return plain


# ---- running requests ---------------------------------------------------------------------


async def add_to_engine(engine: AsyncEngine, requests: list, stream: bool) -> RequestStream:
    """Add the requests of one HTTP call; engine refusals become API errors. A stream gets
    an output per step with news, a plain response its final outputs only."""
    outputs = RequestStream()
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL
    try:
        await engine.add_requests(outputs, requests, kind)
    except Exception as exc:
        raise to_api_error(exc) from None
    return outputs


async def collect_final(engine: AsyncEngine, stream: RequestStream,
                        raw_request: Request) -> dict[str, RequestOutput]:
    """Wait for every request of `stream` to finish; a client hang-up aborts them."""
    finals: dict[str, RequestOutput] = {}

    async def consume() -> None:
        while not stream.finished:
            finals.update((output.request_id, output) for output in await stream.get())

    try:
        await run_unless_disconnected(consume(), raw_request)
    except APIError:
        raise
    except Exception as exc:
        raise to_api_error(exc) from None
    finally:
        engine.abort(stream.unfinished_ids)
    for output in finals.values():
        raise_if_failed(output)
    return finals


async def run_unless_disconnected(work: Awaitable[T], raw_request: Request) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise APIError(499, "the client closed the connection")
    return task.result()


async def _wait_for_disconnect(raw_request: Request) -> None:
    while (await raw_request.receive())["type"] != "http.disconnect":
        pass


class SSEResponse(StreamingResponse):
    """A server-sent-event stream that stops, and closes its generator, when the client leaves.

    Closing the generator runs its `finally`, where the handlers abort their requests. This
    does not rely on the ASGI server version: the disconnect is watched for while waiting.
    """

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-send
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()
