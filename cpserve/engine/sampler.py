"""Token sampling: one call per step on the driver, over the rows that need a token.

Pipeline for one batch of fp32 logits ``[num_rows, vocab]`` (CPU or CUDA)::

    raw logits ──────────────────────────────────────────► raw logprobs (log-softmax, vLLM's
        │                                                   default "raw_logprobs")
        ├─ repetition_penalty on tokens of the prompt and the output so far
        ├─ + logit_bias
        ├─ min_tokens: eos / stop ids -> -inf  (rows still below min_tokens)
        │
        ├─ greedy rows (temperature < 1e-5): argmax, ties -> lowest id
        │
        └─ sampled rows: / temperature -> min-p -> top-k -> top-p -> exponential race
                                          └──── support_mask() ────┘

The order of the filters is vLLM's: min-p first (its threshold is relative to the top
token, so it does not depend on what the others keep), then top-k, then top-p over what is
left, renormalised.

Support rules (all comparisons are on the row's temperature-scaled fp32 logits, so "tie"
means equal scaled logits; bf16 models produce many of them):

* min-p (``m > 0``): drop tokens whose probability is < ``m * max probability``.
* top-k (``k > 0``): keep every token whose logit is >= the k-th largest logit. Ties at the
  boundary are all kept, so more than k tokens can survive; the result never depends on the
  order a sort happens to put equal values in.
* top-p (``p < 1``), over the min-p and top-k survivors renormalised: walk the survivors from
  most to least likely; the cut token is the first at which the cumulative probability
  reaches p (``>= p``, in fp32). Keep every token whose logit is >= the cut token's, so the
  top token is always kept and ties with the cut token are kept too.

The draw is an exponential race: ``token = argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d. per
vocab entry, which picks token i with probability ``probs[i] / sum(probs)``. A seeded row
draws its ``E`` (exactly ``vocab`` numbers per step) from its own generator and nothing else
does, so its tokens do not depend on which rows share the batch or where it sits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cpserve.outputs import Logprob
from cpserve.sampling_params import SamplingParams

# Rows of logits handled at once by prompt_logprobs: bounds the scratch memory (log-softmax,
# int64 sort keys) to a few hundred MB whatever the prompt length.
_PROMPT_LOGPROBS_CHUNK_ELEMENTS = 1 << 24


@dataclass
class SamplingRow:
    """One row of logits to sample from.

    ``generator`` is the request's own generator when ``params.seed`` is set (make it with
    ``make_generator`` on the logits' device), else None and the sampler's global one is used.
    ``output_token_ids`` are the tokens generated so far; while there are fewer than
    ``params.min_tokens`` of them, the eos ids (unless ``ignore_eos``) and ``stop_token_ids``
    get probability 0.
    """

    params: SamplingParams
    generator: torch.Generator | None
    output_token_ids: list[int]
    prompt_token_ids: Sequence[int] = ()  # read only for a repetition penalty


@dataclass
class SampledToken:
    """The token picked for one row.

    ``logprob`` is the raw log-softmax of the model's logits (before min_tokens, temperature
    and the filters). ``top_logprobs`` is None unless ``params.logprobs = k`` is set; then it
    holds the chosen token plus the k most likely tokens by raw logprob (k = 0: the chosen
    token alone), ranked as ``_logprob_dicts`` says.
    """

    token_id: int
    logprob: float
    top_logprobs: dict[int, Logprob] | None


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for a seeded request; it must live on the device of the logits it samples."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Picks one token per row; unseeded rows share one generator seeded at start-up."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        # One global generator per device, created on first use: a torch.Generator is tied to
        # a device and the sampler does not know in advance where the logits will live.
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if not rows:
            return []
        logits = logits.float()
        device = logits.device
        for row in rows:
            if row.generator is not None and not _same_device(row.generator.device, device):
                raise ValueError(
                    f"generator on {row.generator.device} cannot sample logits on {device}"
                )

        params = [row.params for row in rows]
        # Greedy rows divide by 1 (exact), so one tensor serves both kinds of row.
        temperature = [1.0 if p.greedy else p.temperature for p in params]
        scaled = _with_logit_bias(_penalize_repetitions(logits, rows), params)
        scaled = scaled / torch.tensor(temperature, device=device).unsqueeze(1)
        _block_stop_tokens_below_min_tokens(scaled, rows)

        token_ids = scaled.argmax(dim=-1)  # first maximum: ties go to the lowest id
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            sub = [params[i] for i in sampled]
            _, probs = _filter(
                _take_rows(scaled, sampled),
                [p.top_k for p in sub],
                [p.top_p for p in sub],
                [p.min_p for p in sub],
            )
            drawn = self._draw(probs, [rows[i].generator for i in sampled])
            if len(sampled) == len(rows):
                token_ids = drawn
            else:
                token_ids[sampled] = drawn

        raw_logprobs = logits.log_softmax(dim=-1)
        token_logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)

        wants_top = [i for i, p in enumerate(params) if p.logprobs is not None]
        top: dict[int, dict[int, Logprob]] = {}
        if wants_top:
            dicts = _logprob_dicts(
                _take_rows(raw_logprobs, wants_top),
                _take_rows(token_ids, wants_top),
                [params[i].logprobs for i in wants_top],
            )
            top = dict(zip(wants_top, dicts))

        return [
            SampledToken(token_id=t, logprob=lp, top_logprobs=top.get(i))
            for i, (t, lp) in enumerate(zip(token_ids.tolist(), token_logprobs.tolist()))
        ]

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """Exponential race per row; seeded rows draw from their own generator only."""
        device = probs.device
        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            # One call for all unseeded rows: their draws may depend on the batch, that is fine.
            shared = torch.empty((len(unseeded), probs.shape[1]), device=device)
            shared.exponential_(generator=self._global_generator(device))
            if len(unseeded) == len(generators):
                noise = shared
            else:
                noise[unseeded] = shared
        for i, generator in enumerate(generators):
            if generator is not None:
                noise[i].exponential_(generator=generator)
        # Exp(1) draws of exactly 0 would give inf / nan; tiny keeps probs / noise finite
        # (probs <= 1, so the ratio stays below fp32 max).
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=-1)

    def _global_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = make_generator(self.seed, device)
        return self._generators[device]


def _penalize_repetitions(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Logits with each row's repetition penalty applied to the tokens it has seen (prompt and
    output); `logits` itself stays raw, for the logprobs. Rows without a penalty are untouched.
    """
    penalized = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not penalized:
        return logits
    out = logits.clone()
    for i in penalized:
        row = rows[i]
        seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)),
                            dtype=torch.long, device=logits.device)
        values = out[i, seen]
        penalty = row.params.repetition_penalty
        out[i, seen] = torch.where(values > 0, values / penalty, values * penalty)
    return out


def support_mask(
    logits: torch.Tensor,
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
    min_p: Sequence[float],
) -> torch.Tensor:
    """Bool ``[num_rows, vocab]``: the tokens each row may sample (rules in the module docstring).

    One value per row in each parameter; ``temperature`` must be > 0.
    """
    temperature_t = torch.tensor(temperature, dtype=torch.float32, device=logits.device)
    keep, _ = _filter(logits.float() / temperature_t.unsqueeze(1), top_k, top_p, min_p)
    return keep


def _filter(
    scaled: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply top-k, top-p and min-p to scaled logits; return (kept mask, unnormalised probs).

    Parameters are host lists so that which rows need which filter is known without a sync.
    Probabilities of dropped tokens are 0.
    """
    vocab = scaled.shape[1]
    keep = scaled > float("-inf")  # tokens blocked by min_tokens are never support
    if any(m > 0 for m in min_p):
        probs = scaled.softmax(dim=-1)
        min_p_t = torch.tensor(min_p, dtype=torch.float32, device=scaled.device).unsqueeze(1)
        keep &= probs >= min_p_t * probs.max(dim=-1, keepdim=True).values
        scaled = scaled.masked_fill(~keep, float("-inf"))
    needs_sort = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if 0 < k < vocab or p < 1.0]
    if needs_sort:
        device = scaled.device
        sub = _take_rows(scaled, needs_sort)
        threshold = _top_k_top_p_threshold(
            sub,
            torch.tensor([top_k[i] for i in needs_sort], device=device),
            torch.tensor([top_p[i] for i in needs_sort], dtype=torch.float32, device=device),
        )
        if len(needs_sort) == len(keep):
            keep &= sub >= threshold
        else:
            keep[needs_sort] &= sub >= threshold

    probs = scaled.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    return keep, probs


def _top_k_top_p_threshold(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Per row, the smallest scaled logit that survives top-k then top-p: shape [rows, 1].

    Both filters reduce to "keep logit >= threshold", which is why ties at either boundary
    are kept whole. A disabled filter (k outside (0, vocab), p == 1) gives -inf.
    """
    vocab = scaled.shape[1]
    neg_inf = torch.full((scaled.shape[0], 1), float("-inf"), device=scaled.device)
    sorted_logits = scaled.sort(dim=-1, descending=True).values

    use_top_k = ((top_k > 0) & (top_k < vocab)).unsqueeze(1)
    kth = (top_k.clamp(min=1, max=vocab) - 1).unsqueeze(1)
    k_threshold = torch.where(use_top_k, sorted_logits.gather(1, kth), neg_inf)

    # Top-p runs on the top-k survivors, renormalised; they are a prefix of the sort.
    survivors = sorted_logits >= k_threshold
    sorted_probs = sorted_logits.masked_fill(~survivors, float("-inf")).softmax(dim=-1)
    cumulative = sorted_probs.cumsum(dim=-1)
    # Index of the first token whose cumulative probability reaches top_p. fp32 rounding
    # can leave the total just under a top_p near 1: then the cut is the last survivor.
    cut = (cumulative < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)
    last_survivor = (survivors.sum(dim=-1, keepdim=True) - 1).clamp(min=0)
    cut = torch.minimum(cut, last_survivor)
    p_threshold = torch.where((top_p < 1.0).unsqueeze(1), sorted_logits.gather(1, cut), neg_inf)
    return torch.maximum(k_threshold, p_threshold)


def _with_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The logits plus each row's `logit_bias` (a new tensor only when some row has one)."""
    rows, ids, biases = [], [], []
    for i, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            rows.append(i)
            ids.append(token_id)
            biases.append(float(bias))
    if not rows:
        return logits
    biased = logits.clone()
    biased[rows, ids] += torch.tensor(biases, dtype=biased.dtype, device=biased.device)
    return biased


def _block_stop_tokens_below_min_tokens(scaled: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Set the logits of stop tokens to -inf, in place, for rows short of min_tokens.

    As in vLLM, eos counts as a stop token unless ``ignore_eos`` is set.
    """
    vocab = scaled.shape[1]
    row_index: list[int] = []
    token_index: list[int] = []
    for i, row in enumerate(rows):
        params = row.params
        if len(row.output_token_ids) >= params.min_tokens:
            continue
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(params._eos_token_ids)
        blocked = sorted(t for t in stop_ids if 0 <= t < vocab)
        row_index += [i] * len(blocked)
        token_index += blocked
    if row_index:
        scaled[row_index, token_index] = float("-inf")


def _top_ids(values: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest fp32 values per row, largest first, equal values lowest id first.

    ``torch.topk`` leaves the order of equal values open, and a full stable sort costs too
    much for long prompts, so the tie rule goes into the key that topk ranks::

        key (int64) = [ order-preserving int32 of the value | vocab - 1 - id ]
                        high 32 bits                          low 32 bits

    Keys are unique, so the answer is exact and the same on every device.
    """
    vocab = values.shape[1]
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    # Negative floats order backwards as signed ints; flipping their 31 low bits fixes that.
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    reversed_ids = vocab - 1 - torch.arange(vocab, device=values.device)
    keys = (ordered << 32) | reversed_ids
    return vocab - 1 - (keys.topk(k, dim=-1).values & 0xFFFFFFFF)


def _logprob_dicts(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]
) -> list[dict[int, Logprob]]:
    """Per row of raw logprobs: the given token plus the ``num_top[i]`` most likely tokens.

    Ranks are competition ranks: 1 + the number of tokens with a strictly larger logprob, so
    equal logprobs share a rank and the given token's rank agrees with its rank in the top
    list. Among equal logprobs at the top-k boundary the lower ids are listed. The given
    token comes first in each dict, as in vLLM.
    """
    vocab = logprobs.shape[1]
    token_logprobs = logprobs.gather(1, token_ids.unsqueeze(1))
    token_ranks = (logprobs > token_logprobs).sum(dim=-1) + 1
    width = min(max(num_top), vocab)
    top_ids = torch.empty((logprobs.shape[0], 0), dtype=torch.long)
    top_values = torch.empty((logprobs.shape[0], 0))
    if width > 0:
        top_ids = _top_ids(logprobs, width)
        top_values = logprobs.gather(1, top_ids)

    dicts = []
    for token_id, token_logprob, token_rank, ids, values, k in zip(
        token_ids.tolist(),
        token_logprobs.squeeze(1).tolist(),
        token_ranks.tolist(),
        top_ids.tolist(),
        top_values.tolist(),
        num_top,
    ):
        entries = {token_id: Logprob(logprob=token_logprob, rank=token_rank)}
        rank = 0
        for position in range(min(k, vocab)):
            # Sorted descending: a value's rank is the 1-based position of its first copy.
            if position == 0 or values[position] != values[position - 1]:
                rank = position + 1
            entries[ids[position]] = Logprob(logprob=values[position], rank=rank)
        dicts.append(entries)
    return dicts


def prompt_logprobs(
    logits: torch.Tensor, next_token_ids: list[int], k: int
) -> list[dict[int, Logprob]]:
    """Logprobs for prompt positions: ``logits[i]`` predicts ``next_token_ids[i]``.

    Returns per position the actual next token plus the top-k, ranked as ``_logprob_dicts``
    says. Works through the rows in chunks to bound scratch memory on long prompts.
    """
    if logits.dim() != 2 or logits.shape[0] != len(next_token_ids):
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match {len(next_token_ids)} next tokens"
        )
    chunk = max(1, _PROMPT_LOGPROBS_CHUNK_ELEMENTS // max(1, logits.shape[1]))
    targets = torch.tensor(next_token_ids, dtype=torch.long, device=logits.device)
    result: list[dict[int, Logprob]] = []
    for start in range(0, logits.shape[0], chunk):
        rows = logits[start : start + chunk].float().log_softmax(dim=-1)
        ids = targets[start : start + chunk]
        result += _logprob_dicts(rows, ids, [k] * rows.shape[0])
    return result


def _take_rows(tensor: torch.Tensor, index: list[int]) -> torch.Tensor:
    """``tensor[index]`` without the copy when the index is every row in order."""
    if index == list(range(tensor.shape[0])):
        return tensor
    return tensor[index]


def _same_device(generator_device: torch.device, device: torch.device) -> bool:
    # A generator made with device="cuda" reports no index; it serves the current device.
    if generator_device.type != device.type:
        return False
    return generator_device.index is None or generator_device.index == device.index
