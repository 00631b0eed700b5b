"""Request bodies of the OpenAI-compatible API, as pydantic models.

Field names and defaults follow OpenAI's API and vLLM's extensions (top_k, min_p, ignore_eos,
stop_token_ids, prompt_logprobs, ...). Bounds are checked here so that nothing a client sends
can reach the engine in a shape that would crash it or slow every step (NaN temperatures,
seeds past 64 bits, thousands of stop strings, ...).

A field cpserve does not know is refused (400 naming it), not ignored: ignoring, say,
`guided_json` or `response_format` would return an answer the client did not ask for. Fields
OpenAI defines that cpserve does not implement are accepted only with their neutral value
(`response_format: {"type": "text"}`, `tool_choice: "none"`, penalties of 0, ...); `user` is
accepted and unused (it names the end user for OpenAI's abuse monitoring).

Responses are built as plain dicts in the serving modules.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from cpserve.sampling_params import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SEED_RANGE,
)

# A sanity bound only: the engine refuses more than --max-logprobs (20 unless set).
MAX_LOGPROBS = 2**20
MAX_MESSAGES = 8192
MAX_CONTENT_PARTS = 1024

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]
StopString = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
Logprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]


class _Request(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: Annotated[int, Field(ge=1)] = 1
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    # Token id (a string, as JSON keys are) -> bias added to its logit.
    logit_bias: Annotated[dict[StrictStr, Annotated[float, Field(
        ge=-LOGIT_BIAS_RANGE, le=LOGIT_BIAS_RANGE)]],
        Field(max_length=MAX_LOGIT_BIAS_ENTRIES)] | None = None
    prompt_logprobs: Logprobs | None = None  # vLLM's extension
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Penalties: presence and frequency are accepted at their neutral 0 only (anything else
    # is refused by `unsupported_fields`); repetition_penalty is honoured (None: the
    # generation config's default).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """(field, why) for each field set to something cpserve cannot honour."""
        found = []
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
            if getattr(self, name) != neutral:
                found.append((name, f"{name} is not supported (only {neutral:g})"))
        if self.response_format is not None and self.response_format.type != "text":
            found.append(("response_format", f"response_format {self.response_format.type!r} "
                                             "is not supported: cpserve has no structured "
                                             "output (only {\"type\": \"text\"})"))
        return found

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    logprobs: Logprobs | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: StrictStr
    content: StrictStr | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: StrictStr | None = None
    # What the openai client puts in an assistant message it got back (`message.model_dump()`),
    # so a conversation can be sent on as it came; only empty values are accepted.
    refusal: None = None
    tool_calls: Annotated[list, Field(max_length=0)] | None = None
    function_call: None = None
    audio: None = None
    annotations: Annotated[list, Field(max_length=0)] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Logprobs | None = None
    add_generation_prompt: bool = True
    tools: list[dict] | None = None  # no tool calling: only an empty list is accepted
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_Request):
    """Either `prompt` (text) or `messages` (rendered with the chat template)."""

    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: TokenIds
