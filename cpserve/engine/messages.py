"""What crosses between a front end and the engine core: plain dataclasses, msgpack on the wire.

    front end (API process, or LLM in-process)           engine core (LLMEngine)
    EngineCoreRequest (token ids, params) ─────────────> add_requests: all or none
    abort [sequence ids] ──────────────────────────────> frees their KV at once
                       <─────────────────────────────── EngineCoreOutputs, one per step

The core knows sequences of token ids, nothing of text: tokenizing, detokenizing, stop
strings, logprob decoding and the `n` completions of one request are the front end's. Outputs
carry diffs: for each sequence that progressed in a step, the new token ids, their logprobs and
the prompt logprobs collected in that step, never a request's history, so a step costs the
same at token 10 and at token 10,000. Speculative decoding adds each step's drafted and
accepted counts per sequence, KV transfer the prefill instance's kv_transfer_params on a
finishing sequence; the stats carry both features' counters (None when off) for /metrics.

Wire format: msgpack of lists and plain values (never pickle); `encode_*` / `decode_*` here are
the only code that knows the layout, and both ends run the same version of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import msgpack

from cpserve.kv_transfer.stats import KVTransferStats
from cpserve.outputs import Logprob, PositionLogprobs
from cpserve.sampling_params import SamplingParams
from cpserve.spec_decode.metrics import SpecDecodeStats


@dataclass
class EngineCoreRequest:
    """One sequence for the core: a completion of `n` is `n` of these, fanned out in front."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # n == 1; the completion's own seed; prompt_logprobs on one only
    arrival_time: float  # time.time()
    # False for the 2nd to nth completions: the prompt_tokens counter counts a prompt once.
    counts_prompt: bool = True


@dataclass
class EngineCoreOutput:
    """What one step did for one sequence (only sequences with news get one)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    # Raw logprob of each new token; None unless `params.logprobs` is set (the sampler's
    # fast paths compute none).
    new_logprobs: list[float | None] = field(default_factory=list)
    # Per new token the top alternatives and the token itself, when `params.logprobs` is set.
    new_top_logprobs: list[PositionLogprobs] | None = None
    # Prompt positions scored this step (the first prompt token's None comes first).
    new_prompt_logprobs: list[PositionLogprobs | None] | None = None
    finish_reason: str | None = None  # "stop" (eos or a stop token id), "length", "error"
    stop_reason: int | None = None  # the stop token id that ended it
    error: str | None = None  # why it ended with "error"
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    # Speculative decoding: drafts this step verified for the sequence, and those accepted
    # (the front end sums them into CompletionOutput.num_draft_tokens / num_accepted_tokens).
    new_draft_tokens: int = 0
    new_accepted_tokens: int = 0
    # A prefill instance's answer to do_remote_decode (on the finishing output only).
    kv_transfer_params: dict | None = None


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    spec_decode: SpecDecodeStats | None = None  # with --speculative-config
    kv_transfer: KVTransferStats | None = None  # with --kv-transfer-config


@dataclass
class EngineCoreOutputs:
    """One step of the core: its outputs, and its stats at the end of the step."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    timestamp: float  # time.time() at the end of the step
    num_scheduled_tokens: int = 0  # tokens the step computed; 0 if it could run nothing


# ---- the wire --------------------------------------------------------------------------------

_PARAM_FIELDS = [f.name for f in fields(SamplingParams) if not f.name.startswith("_")]
_STATS_FIELDS = [f.name for f in fields(EngineStats)]
# Stats that are counters of their own, sent as plain dicts of their fields.
_NESTED_STATS = {"spec_decode": SpecDecodeStats, "kv_transfer": KVTransferStats}


def pack(message: list) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, strict_map_key=True)


def encode_params(params: SamplingParams) -> dict:
    values = {name: getattr(params, name) for name in _PARAM_FIELDS}
    if params.logit_bias is not None:  # msgpack map keys are kept to strings
        values["logit_bias"] = [[token, bias] for token, bias in params.logit_bias.items()]
    return values


def decode_params(values: dict) -> SamplingParams:
    values = dict(values)
    if values.get("logit_bias") is not None:
        values["logit_bias"] = {int(token): bias for token, bias in values["logit_bias"]}
    return SamplingParams(**values)


def encode_request(r: EngineCoreRequest) -> list:
    return [r.request_id, r.prompt_token_ids, encode_params(r.params), r.arrival_time,
            r.counts_prompt]


def decode_request(raw: list) -> EngineCoreRequest:
    request_id, token_ids, params, arrival, counts_prompt = raw
    return EngineCoreRequest(request_id, token_ids, decode_params(params), arrival,
                             counts_prompt)


def _encode_position(position: PositionLogprobs | None) -> list | None:
    if position is None:
        return None
    return [[token_id, lp.logprob, lp.rank] for token_id, lp in position.items()]


def _decode_position(raw: list | None) -> PositionLogprobs | None:
    if raw is None:
        return None
    return {token_id: Logprob(logprob, rank) for token_id, logprob, rank in raw}


def _encode_positions(positions: list | None) -> list | None:
    return None if positions is None else [_encode_position(p) for p in positions]


def _decode_positions(raw: list | None) -> list | None:
    return None if raw is None else [_decode_position(p) for p in raw]


def encode_outputs(batch: EngineCoreOutputs) -> list:
    return [
        [[o.request_id, o.new_token_ids, o.new_logprobs, _encode_positions(o.new_top_logprobs),
          _encode_positions(o.new_prompt_logprobs), o.finish_reason, o.stop_reason, o.error,
          o.num_cached_tokens, o.first_scheduled_time, o.new_draft_tokens,
          o.new_accepted_tokens, o.kv_transfer_params] for o in batch.outputs],
        [_encode_stat(name, getattr(batch.stats, name)) for name in _STATS_FIELDS],
        batch.timestamp,
        batch.num_scheduled_tokens,
    ]


def decode_outputs(raw: list) -> EngineCoreOutputs:
    outputs, stats, timestamp, num_tokens = raw
    return EngineCoreOutputs(
        outputs=[EngineCoreOutput(rid, ids, lps, _decode_positions(top),
                                  _decode_positions(prompt), finish, stop, error, cached,
                                  scheduled, drafts, accepted, kv_params)
                 for rid, ids, lps, top, prompt, finish, stop, error, cached, scheduled,
                 drafts, accepted, kv_params in outputs],
        stats=EngineStats(**{name: _decode_stat(name, value)
                             for name, value in zip(_STATS_FIELDS, stats)}),
        timestamp=timestamp,
        num_scheduled_tokens=num_tokens,
    )


def _encode_stat(name: str, value):
    return asdict(value) if name in _NESTED_STATS and value is not None else value


def _decode_stat(name: str, value):
    return _NESTED_STATS[name](**value) if name in _NESTED_STATS and value is not None else value
