"""From the engine core's per-step deltas to what users see: text, stop strings, decoded
logprobs, and the outputs of the `n` completions of a request.

One sequence, one step (the core sent new token ids):

    new ids ─> IncrementalDetokenizer ─> new text ─> StopStrings.feed ─> released text
                (a short window of ids)               │  search the new text and the few
                                                      │  characters before it; hold back a
                                                      │  tail that could start a stop string
                                                      └─ a hit ends the sequence: the core
                                                         is told to abort it

Work per step is proportional to the new tokens, never to what came before: no history is
decoded, searched or copied again. A request is followed in one of two kinds:

    DELTA   an output at every step that gives it news, holding only that news (new text,
            new token ids, their logprobs): what a stream sends
    FINAL   one output when it finishes, holding everything (the offline API, non-streamed
            HTTP responses); only these keep a request's whole text and token ids

Prompt logprobs come whole, with the first output (DELTA: a request scoring its prompt gets
no output before they are complete) or the final one (FINAL).
Everything a request holds in the front end is its `_Request` (and its `_Sequence`s): `abort`
drops it in one call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cpserve.engine.input_processor import sequence_id
from cpserve.engine.messages import EngineCoreOutput, EngineCoreOutputs
from cpserve.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from cpserve.sampling_params import SamplingParams
from cpserve.tokenizer import IncrementalDetokenizer, Tokenizer


class RequestOutputKind(enum.Enum):
    DELTA = "delta"
    FINAL = "final"


@dataclass
class FinishedRequest:
    """A summary of a request that just finished, whatever its kind (for metrics)."""

    request_id: str
    num_prompt_tokens: int
    num_generated_tokens: list[int]  # per completion
    finish_reasons: list[str]  # per completion
    metrics: RequestMetrics


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput]  # for the requests this step gave news to, by their kind
    stopped: list[str]  # sequences stop strings ended here: the core must abort them
    finished: list[FinishedRequest]
    # Tokens the step gave each request that got some (the most of any of its sequences),
    # whatever its kind: what token-latency metrics count.
    new_tokens: dict[str, int]


class StopStrings:
    """The stop strings of one sequence, matched as text arrives.

    A match must end in the new text (it may start in the `longest - 1` characters before).
    Unless the stop string is to be shown (`include`), the last `longest - 1` characters are
    held back: they could be the start of a stop string that the next token completes, and
    text a stream has sent is never taken back.
    """

    def __init__(self, stops: list[str], include: bool) -> None:
        self.stops = stops
        self.include = include
        self.keep = max(len(s) for s in stops) - 1  # characters a match may start before new
        self.tail = ""  # the last `keep` characters of the text so far
        self.held = ""  # text not released yet

    def feed(self, new: str, can_stop: bool) -> tuple[str, str | None]:
        """(text now safe to release, the stop string that ended the sequence or None)."""
        window = self.tail + new
        pending = self.held + new  # both end with `new`
        hit: tuple[str, int] | None = None
        if can_stop and new:
            for stop in self.stops:
                index = window.find(stop, max(0, len(self.tail) - len(stop) + 1))
                if index != -1 and (hit is None or index < hit[1]):
                    hit = (stop, index)
        if hit is not None:
            stop, index = hit
            end = index + len(stop) if self.include else index
            self.held = ""
            return pending[:max(0, end - (len(window) - len(pending)))], stop
        self.tail = window[max(0, len(window) - self.keep):]
        cut = len(pending) if self.include else max(0, len(pending) - self.keep)
        self.held = pending[cut:]
        return pending[:cut], None

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass
class _Sequence:
    """One completion of a request, as the front end follows it."""

    request: _Request
    index: int
    request_id: str  # the core's id
    detokenizer: IncrementalDetokenizer
    stops: StopStrings | None
    num_tokens: int = 0
    # As in vLLM: None without logprobs asked for (the sampler computes them only then).
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    # DELTA: what this step brought (cleared when handed out); FINAL: everything.
    token_ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    has_news: bool = False
    # Speculative decoding, running totals: drafts verified, drafts accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, stop_reason=None, error: str | None = None) -> None:
        self.finish_reason, self.stop_reason, self.error = reason, stop_reason, error
        self.has_news = True


@dataclass
class _Request:
    """A request as the user made it: one prompt, `n` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: RequestOutputKind
    arrival_time: float
    sequences: list[_Sequence] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_unfinished: int = 0
    kv_transfer_params: dict | None = None  # a prefill instance's answer (do_remote_decode)


class OutputProcessor:
    """The front end's state of every request in flight (one thread at a time)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _Request] = {}
        self._sequences: dict[str, _Sequence] = {}
        self._decoded: dict[int, str] = {}  # token id -> text as logprobs show it

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams, kind: RequestOutputKind, arrival_time: float) -> list[str]:
        """Follow a new request; returns its sequences' ids (as `sequence_id` names them)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = _Request(request_id, prompt, prompt_token_ids, params, kind, arrival_time,
                           num_unfinished=params.n)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = []
        stops = params.stop
        for k in range(params.n):
            seq = _Sequence(request, k, sequence_id(request_id, k, params.n),
                            IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                   params.skip_special_tokens),
                            StopStrings(stops, params.include_stop_str_in_output)
                            if stops else None)
            if params.logprobs is not None:
                seq.logprobs = []
                seq.cumulative_logprob = 0.0
            request.sequences.append(seq)
            self._sequences[seq.request_id] = seq
        self._requests[request_id] = request
        return [seq.request_id for seq in request.sequences]

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns the ids of its sequences the core may still run."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return []
        for seq in request.sequences:
            del self._sequences[seq.request_id]
        return [seq.request_id for seq in request.sequences if not seq.finished]

    def process(self, batch: EngineCoreOutputs) -> ProcessedOutputs:
        """What one step of the core means for the requests it gave news to."""
        touched: dict[str, _Request] = {}
        to_abort: list[str] = []
        finished_requests: list[FinishedRequest] = []
        new_tokens: dict[str, int] = {}
        for out in batch.outputs:
            seq = self._sequences.get(out.request_id)
            if seq is None or seq.finished:  # aborted, or ended here by a stop string
                continue
            request = seq.request
            if request.first_scheduled_time is None:
                request.first_scheduled_time = out.first_scheduled_time
                request.num_cached_tokens = out.num_cached_tokens
            if out.new_prompt_logprobs and request.prompt_logprobs is not None:
                self._decode_positions(out.new_prompt_logprobs)
                request.prompt_logprobs.extend(out.new_prompt_logprobs)
            if out.new_token_ids:
                request.first_token_time = request.first_token_time or batch.timestamp
                request.last_token_time = batch.timestamp
                new_tokens[request.request_id] = max(new_tokens.get(request.request_id, 0),
                                                     len(out.new_token_ids))
            seq.num_draft_tokens += out.new_draft_tokens
            seq.num_accepted_tokens += out.new_accepted_tokens
            if out.kv_transfer_params is not None:
                request.kv_transfer_params = out.kv_transfer_params
            self._add_tokens(seq, out)
            if seq.finished and out.finish_reason is None:
                to_abort.append(seq.request_id)
            if seq.finished:
                request.num_unfinished -= 1
                if not request.num_unfinished:
                    request.finished_time = batch.timestamp
            if seq.has_news:
                touched[request.request_id] = request
        outputs = []
        for request in touched.values():
            finished = request.num_unfinished == 0
            if finished:
                finished_requests.append(FinishedRequest(
                    request.request_id, len(request.prompt_token_ids),
                    [seq.num_tokens for seq in request.sequences],
                    [seq.finish_reason for seq in request.sequences], self._metrics(request)))
            if request.kind is RequestOutputKind.DELTA:
                if not finished and not self._prompt_logprobs_complete(request):
                    continue  # a sequence sampled before the one scoring the prompt did
                outputs.append(self._delta(request, finished))
            elif finished:
                outputs.append(self._final(request))
            if finished:
                self.abort(request.request_id)
        return ProcessedOutputs(outputs, to_abort, finished_requests, new_tokens)

    def _add_tokens(self, seq: _Sequence, out: EngineCoreOutput) -> None:
        params = seq.request.params
        last = len(out.new_token_ids) - 1
        for j, token_id in enumerate(out.new_token_ids):
            seq.num_tokens += 1
            seq.has_news = True
            if seq.cumulative_logprob is not None:
                seq.cumulative_logprob += out.new_logprobs[j]
            seq.token_ids.append(token_id)
            if seq.logprobs is not None and out.new_top_logprobs is not None:
                position = out.new_top_logprobs[j]
                self._decode_positions([position])
                seq.logprobs.append(position)
            text = seq.detokenizer.add_tokens([token_id])
            if j == last and out.finish_reason == "stop":
                break  # eos or a stop token id: checked before stop strings, as vLLM does
            if seq.stops is None:
                seq.texts.append(text)
                continue
            released, stop = seq.stops.feed(text, seq.num_tokens >= params.min_tokens)
            seq.texts.append(released)
            if stop is not None:
                seq.finish("stop", stop)
                return
        else:
            text = ""
        if out.finish_reason is not None:
            held = seq.stops.flush() if seq.stops is not None else ""
            seq.texts.append(held + text + seq.detokenizer.flush())
            seq.finish(out.finish_reason, out.stop_reason, out.error)

    def _decode_positions(self, positions: list[PositionLogprobs | None]) -> None:
        for position in positions:
            if position is None:
                continue
            for token_id, logprob in position.items():
                text = self._decoded.get(token_id)
                if text is None:
                    text = self._decoded[token_id] = self.tokenizer.decode_token(token_id)
                logprob.decoded_token = text

    @staticmethod
    def _prompt_logprobs_complete(request: _Request) -> bool:
        return (request.prompt_logprobs is None
                or len(request.prompt_logprobs) == len(request.prompt_token_ids))

    def _prompt_logprobs_once(self, request: _Request) -> list | None:
        if request.prompt_logprobs_sent:
            return None
        request.prompt_logprobs_sent = True
        return request.prompt_logprobs

    def _metrics(self, request: _Request) -> RequestMetrics:
        return RequestMetrics(request.arrival_time, request.first_scheduled_time,
                              request.first_token_time, request.last_token_time,
                              request.finished_time)

    def _delta(self, request: _Request, finished: bool) -> RequestOutput:
        completions = []
        for seq in request.sequences:
            if not seq.has_news:
                continue
            completions.append(self._completion(seq))
            seq.has_news = False
            seq.token_ids, seq.texts = [], []
            if seq.logprobs is not None:
                seq.logprobs = []
        return self._output(request, completions, finished)

    def _final(self, request: _Request) -> RequestOutput:
        return self._output(request, [self._completion(s) for s in request.sequences], True)

    @staticmethod
    def _completion(seq: _Sequence) -> CompletionOutput:
        return CompletionOutput(
            index=seq.index, text="".join(seq.texts), token_ids=seq.token_ids,
            cumulative_logprob=seq.cumulative_logprob, logprobs=seq.logprobs,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, error=seq.error,
            num_draft_tokens=seq.num_draft_tokens, num_accepted_tokens=seq.num_accepted_tokens)

    def _output(self, request: _Request, completions: list[CompletionOutput],
                finished: bool) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=self._prompt_logprobs_once(request), outputs=completions,
            finished=finished, num_cached_tokens=request.num_cached_tokens,
            metrics=self._metrics(request), kv_transfer_params=request.kv_transfer_params)
