"""Token sampling: one call per step on the driver, over the rows that need a token.

Pipeline for one batch of fp32 logits ``[num_rows, vocab]`` (CPU or CUDA)::

    raw logits ───────────────────────────────────────► raw logprobs (log-softmax, vLLM's
        │                                                default "raw_logprobs"), only of
        │                                                rows asking for logprobs
        ├─ repetition_penalty on tokens of the prompt and the output so far
        ├─ + logit_bias
        ├─ min_tokens: eos / stop ids -> -inf  (rows still below min_tokens)
        │
        ├─ greedy rows (temperature < 1e-5): argmax, ties -> lowest id; nothing else
        │
        └─ sampled rows: / temperature -> min-p -> top-k -> top-p -> exponential race
                                          └──── support_mask() ────┘

`Sampler.sample` only queues work: its `SampledBatch` holds the tokens on the device (the
next step's inputs can be read from there) and copies them back to the host as it goes;
`resolve()` waits for those copies alone, never for work queued after them.

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

from cpserve.engine.logprobs import LogprobTensors, logprob_tensors, prompt_logprobs, top_ids
from cpserve.engine.transfer import take_rows, to_device
from cpserve.outputs import Logprob
from cpserve.sampling_params import SamplingParams

__all__ = ["SampledBatch", "SampledToken", "Sampler", "SamplingRow", "make_generator",
           "prompt_logprobs", "support_mask", "top_ids"]


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
    and the filters), and ``top_logprobs`` the chosen token plus the k most likely tokens by
    raw logprob (k = 0: the chosen token alone), ranked as `engine/logprobs.py` says: both
    only for a row with ``params.logprobs = k`` set, else None (nothing is computed for it).
    ``finite`` is False when the row's logits were not all finite: its token is meaningless
    (0) and the engine fails the request.
    """

    token_id: int
    logprob: float | None
    top_logprobs: dict[int, Logprob] | None
    finite: bool = True


class SampledBatch:
    """One call's tokens. `token_ids` stays on the device, so a next step can read its inputs
    from it before the host knows them; `resolve()` gives the host view, waiting for the
    copies back (queued at once, pinned and asynchronous on CUDA) and nothing later queued.
    """

    def __init__(self, token_ids: torch.Tensor, finite: torch.Tensor,
                 logprobs: LogprobTensors | None, logprob_rows: list[int]) -> None:
        self.token_ids = token_ids
        self._logprob_rows = logprob_rows
        self._host_ids = torch.stack([token_ids, finite.long()]).to("cpu", non_blocking=True)
        self._host_logprobs = logprobs.to_host() if logprobs is not None else None
        self._ready = None
        if token_ids.device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(token_ids.device))
        self._resolved: list[SampledToken] | None = None

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def resolve(self) -> list[SampledToken]:
        if self._resolved is None:
            if self._ready is not None:
                self._ready.synchronize()
            ids, finite = self._host_ids.tolist()
            tokens = [SampledToken(t, None, None, bool(f)) for t, f in zip(ids, finite)]
            if self._host_logprobs is not None:
                dicts = self._host_logprobs.dicts()
                for i, logprob, entries in zip(self._logprob_rows,
                                               self._host_logprobs.token_logprobs.tolist(),
                                               dicts):
                    tokens[i].logprob, tokens[i].top_logprobs = logprob, entries
            self._resolved = tokens
        return self._resolved


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for a seeded request; it must live on the device of the logits it samples."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Picks one token per row; unseeded rows share one generator seeded at start-up.

    Work is done only where a row asks for it: greedy rows take an argmax of their (biased,
    penalised) logits and nothing else; temperature, filters and the draw run on the sampled
    rows only; the full-vocabulary log-softmax only for rows that want logprobs. Top-k finds
    its threshold with a partial selection (`topk`), not a sort of the vocabulary; top-p
    without top-k still sorts its rows.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        # One global generator per device, created on first use: a torch.Generator is tied to
        # a device and the sampler does not know in advance where the logits will live.
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        """Sample and wait for the answer on the host."""
        return self.sample(logits, rows).resolve()

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampledBatch:
        """Queue the sampling of one token per row; nothing waits for the device."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        logits = logits.float()
        device = logits.device
        for row in rows:
            if row.generator is not None and not _same_device(row.generator.device, device):
                raise ValueError(
                    f"generator on {row.generator.device} cannot sample logits on {device}"
                )
        # Any NaN or infinity makes the row's sum non-finite: one reduction, no mask tensor.
        # (Finite logits cannot sum past fp32's range: that would take ~1e33 per entry.)
        finite = logits.sum(dim=1).isfinite()
        if not rows:
            return SampledBatch(logits.new_zeros(0, dtype=torch.long), finite, None, [])

        params = [row.params for row in rows]
        # Each of these copies the logits only when some row needs it: raw logits stay raw.
        scaled = _block_stop_tokens_below_min_tokens(
            _with_logit_bias(_penalize_repetitions(logits, rows), params), rows)

        greedy = [i for i, p in enumerate(params) if p.greedy]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:
            token_ids = scaled.argmax(dim=-1)  # first maximum: ties go to the lowest id
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=device)
            if greedy:
                token_ids.index_copy_(0, to_device(greedy, device),
                                      take_rows(scaled, greedy).argmax(dim=-1))
            sub = [params[i] for i in sampled]
            temperature = to_device([p.temperature for p in sub], device, torch.float32)
            _, probs = _filter(take_rows(scaled, sampled) / temperature.unsqueeze(1),
                               [p.top_k for p in sub], [p.top_p for p in sub],
                               [p.min_p for p in sub])
            drawn = self._draw(probs, [rows[i].generator for i in sampled])
            if len(sampled) == len(rows):
                token_ids = drawn
            else:
                token_ids.index_copy_(0, to_device(sampled, device), drawn)
        # A row with non-finite logits gets a valid id, so a step fed with it still runs.
        token_ids = torch.where(finite, token_ids, torch.zeros_like(token_ids))

        wants = [i for i, p in enumerate(params) if p.logprobs is not None]
        logprobs = None
        if wants:
            raw = take_rows(logits, wants).log_softmax(dim=-1)
            logprobs = logprob_tensors(raw, take_rows(token_ids, wants),
                                       [params[i].logprobs for i in wants])
        return SampledBatch(token_ids, finite, logprobs, wants)

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
                noise.index_copy_(0, to_device(unseeded, device), shared)
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
        seen = to_device(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)),
                         logits.device)
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
    temperature_t = to_device(list(temperature), logits.device, torch.float32)
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
        min_p_t = to_device(list(min_p), scaled.device, torch.float32).unsqueeze(1)
        keep &= probs >= min_p_t * probs.max(dim=-1, keepdim=True).values
        scaled = scaled.masked_fill(~keep, float("-inf"))
    device = scaled.device
    # Rows with a top-k find their threshold by partial selection; top-p alone needs a sort.
    by_selection = [i for i, k in enumerate(top_k) if 0 < k < vocab]
    by_sort = [i for i, (k, p) in enumerate(zip(top_k, top_p)) if not 0 < k < vocab and p < 1.0]
    for index, threshold_of in ((by_selection, _top_k_top_p_threshold_by_selection),
                                (by_sort, _top_k_top_p_threshold)):
        if not index:
            continue
        sub = take_rows(scaled, index)
        threshold = threshold_of(sub, [top_k[i] for i in index],
                                 to_device([top_p[i] for i in index], device, torch.float32))
        if len(index) == len(keep):
            keep &= sub >= threshold
        else:
            rows = to_device(index, device)
            keep.index_copy_(0, rows, keep.index_select(0, rows) & (sub >= threshold))

    probs = scaled.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    return keep, probs


def _top_k_top_p_threshold(
    scaled: torch.Tensor, top_k: list[int], top_p: torch.Tensor
) -> torch.Tensor:
    """Per row, the smallest scaled logit that survives top-k then top-p: shape [rows, 1].

    Both filters reduce to "keep logit >= threshold", which is why ties at either boundary
    are kept whole. A disabled filter (k outside (0, vocab), p == 1) gives -inf.
    """
    vocab = scaled.shape[1]
    top_k = to_device(top_k, scaled.device)
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


def _top_k_top_p_threshold_by_selection(
    scaled: torch.Tensor, top_k: list[int], top_p: torch.Tensor
) -> torch.Tensor:
    """`_top_k_top_p_threshold` for rows that all have a top-k in (0, vocab), without sorting
    the vocabulary: the largest K = max(top_k) logits are selected (sorted), and top-p walks
    them, normalised by the mass of every survivor of top-k.

    Survivors beyond the first k can only be ties with the k-th logit, so when the walk
    through the first k does not reach p the cut is one of those ties, whose logit is the
    k-th: the threshold is the same as the sort's.
    """
    largest = scaled.topk(max(top_k), dim=-1).values  # [rows, K], descending
    kth = largest.gather(1, to_device([k - 1 for k in top_k], scaled.device).unsqueeze(1))
    top = largest[:, :1]
    inside = largest >= kth
    mass = torch.exp(scaled - top).masked_fill(scaled < kth, 0.0).sum(dim=-1, keepdim=True)
    cumulative = (torch.exp(largest - top).masked_fill(~inside, 0.0) / mass).cumsum(dim=-1)
    cut = (cumulative < top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)
    cut = torch.minimum(cut, inside.sum(dim=-1, keepdim=True) - 1)  # see the sort's version
    neg_inf = torch.full_like(kth, float("-inf"))
    p_threshold = torch.where((top_p < 1.0).unsqueeze(1), largest.gather(1, cut), neg_inf)
    return torch.maximum(kth, p_threshold)


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
    device = biased.device
    biased.index_put_((to_device(rows, device), to_device(ids, device)),
                      to_device(biases, device, biased.dtype), accumulate=True)
    return biased


def _block_stop_tokens_below_min_tokens(logits: torch.Tensor,
                                        rows: list[SamplingRow]) -> torch.Tensor:
    """The logits with the stop tokens of rows short of min_tokens at -inf (a new tensor only
    when some row is short). As in vLLM, eos counts as a stop token unless ``ignore_eos``."""
    vocab = logits.shape[1]
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
    if not row_index:
        return logits
    blocked_logits = logits.clone()
    device = logits.device
    blocked_logits.index_put_((to_device(row_index, device), to_device(token_index, device)),
                              blocked_logits.new_full((), float("-inf")))
    return blocked_logits


def _same_device(generator_device: torch.device, device: torch.device) -> bool:
    # A generator made with device="cuda" reports no index; it serves the current device.
    if generator_device.type != device.type:
        return False
    return generator_device.index is None or generator_device.index == device.index
