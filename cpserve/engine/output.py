"""From sampled tokens to what users see: text, stop conditions, outputs of n completions."""

from __future__ import annotations

from dataclasses import dataclass, field

from cpserve.engine.sampler import SampledToken
from cpserve.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from cpserve.request import Request, RequestStatus
from cpserve.sampling_params import SamplingParams
from cpserve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class ParentRequest:
    """A request as the user made it: one prompt, `n` children generating completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)  # final text once a child stopped

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.parents: dict[str, ParentRequest] = {}

    def add(self, parent: ParentRequest) -> None:
        skip = parent.params.skip_special_tokens
        parent.detokenizers = [IncrementalDetokenizer(self.tokenizer, parent.prompt_token_ids, skip)
                               for _ in parent.children]
        parent.texts = [None] * len(parent.children)
        self.parents[parent.request_id] = parent

    def decode_logprobs(self, positions: list[PositionLogprobs]) -> None:
        for entries in positions:
            for token_id, logprob in entries.items():
                logprob.decoded_token = self.tokenizer.decode_token(token_id)

    def on_token(self, r: Request, token: SampledToken) -> RequestStatus | None:
        """Record a new token of `r`; return the finish status if it ends the request."""
        parent = self.parents[r.parent_id]
        params = r.params
        if token.logprob is not None:  # computed only for requests asking for logprobs
            r.cumulative_logprob += token.logprob
        if r.logprobs is not None and token.top_logprobs is not None:
            self.decode_logprobs([token.top_logprobs])
            r.logprobs.append(token.top_logprobs)
        detok = parent.detokenizers[r.index]
        new_text = detok.add_tokens([token.token_id])
        num_out = len(r.output_token_ids)
        can_stop = num_out >= params.min_tokens

        if can_stop and not params.ignore_eos and token.token_id in params._eos_token_ids:
            return self._stop(parent, r, detok.text + detok.flush(), None)
        if can_stop and token.token_id in params.stop_token_ids:
            return self._stop(parent, r, detok.text + detok.flush(), token.token_id)
        if can_stop and params.stop and new_text:
            hit = _find_stop(detok.text, len(new_text), params.stop)
            if hit is not None:
                stop, index = hit
                end = index + len(stop) if params.include_stop_str_in_output else index
                return self._stop(parent, r, detok.text[:end], stop)
        if (params.max_tokens is not None and num_out >= params.max_tokens) \
                or r.num_tokens >= self.max_model_len:
            parent.texts[r.index] = detok.text + detok.flush()
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _stop(parent: ParentRequest, r: Request, text: str, reason) -> RequestStatus:
        parent.texts[r.index] = text
        r.stop_reason = reason
        return RequestStatus.FINISHED_STOPPED

    def make_outputs(self, parent_ids: set[str], requests: dict[str, Request]) -> list[RequestOutput]:
        """Cumulative outputs of the given parents; finished parents are forgotten."""
        outputs = []
        for parent_id in parent_ids:
            parent = self.parents.get(parent_id)
            if parent is None:
                continue
            outputs.append(self._output(parent))
            if parent.finished:
                del self.parents[parent_id]
                for child in parent.children:
                    requests.pop(child.request_id, None)
        return outputs

    def _output(self, parent: ParentRequest) -> RequestOutput:
        completions = []
        for child, detok, text in zip(parent.children, parent.detokenizers, parent.texts):
            status = child.status
            completions.append(CompletionOutput(
                index=child.index,
                text=text if text is not None else _visible_text(detok.text, child.params.stop),
                token_ids=list(child.output_token_ids),
                cumulative_logprob=child.cumulative_logprob,
                logprobs=list(child.logprobs) if child.logprobs is not None else None,
                finish_reason=status.value if status.finished else None,
                stop_reason=child.stop_reason,
                error=child.error,
            ))
        first = parent.children[0]
        finished_times = [c.finished_time for c in parent.children if c.finished_time]
        first_tokens = [c.first_token_time for c in parent.children if c.first_token_time]
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=min(first_tokens) if first_tokens else None,
            last_token_time=max((c.last_token_time or 0) for c in parent.children) or None,
            finished_time=max(finished_times) if parent.finished and finished_times else None,
        )
        prompt_logprobs = first.prompt_logprobs
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            prompt_logprobs=list(prompt_logprobs) if prompt_logprobs is not None else None,
            outputs=completions,
            finished=parent.finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics=metrics,
        )


def _visible_text(text: str, stops: list[str]) -> str:
    """Running text minus a tail that could still turn out to start a stop string: what a
    stream shows is never taken back when the stop string completes."""
    held = max((len(s) for s in stops), default=1) - 1
    return text[: len(text) - held] if held else text


def _find_stop(text: str, new_len: int, stops: list[str]) -> tuple[str, int] | None:
    """The earliest stop string that ends inside the newly added text, and where it starts."""
    best = None
    for stop in stops:
        start = max(0, len(text) - new_len - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop, index)
    return best
