"""Logprobs of chosen tokens and of the most likely ones, computed on the device and turned
into `Logprob` dicts on the host later.

The device part (`logprob_tensors`) queues kernels and nothing else, so a sampler can return
before the GPU has run; the host part (`LogprobTensors.dicts`) reads what was copied back.

Ranks are competition ranks: 1 + the number of tokens with a strictly larger logprob, so
equal logprobs share a rank and the given token's rank agrees with its rank in the top list.
Among equal logprobs at the top-k boundary the lower ids are listed. The given token comes
first in each dict, as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from cpserve.outputs import Logprob

# Rows of logits handled at once by prompt_logprobs: bounds the scratch memory (log-softmax,
# int64 sort keys) to a few hundred MB whatever the prompt length.
PROMPT_LOGPROBS_CHUNK_ELEMENTS = 1 << 24


def top_ids(values: torch.Tensor, k: int) -> torch.Tensor:
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


@dataclass
class LogprobTensors:
    """Per row: the given token, its raw logprob and rank, and the `width` most likely ids
    with their logprobs (each row lists its own `num_top[i] <= width` of them)."""

    token_ids: torch.Tensor  # [rows]
    token_logprobs: torch.Tensor  # [rows] fp32
    token_ranks: torch.Tensor  # [rows]
    top_ids: torch.Tensor  # [rows, width]
    top_values: torch.Tensor  # [rows, width] fp32
    num_top: list[int]

    def to_host(self) -> LogprobTensors:
        """Copies on their way to host memory (pinned, asynchronous on CUDA): read them only
        after the stream has passed this point (`SampledBatch` waits on an event)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to("cpu", non_blocking=True)
        return LogprobTensors(**moved)

    def dicts(self) -> list[dict[int, Logprob]]:
        vocab_width = self.top_ids.shape[1]
        result = []
        for token_id, token_logprob, token_rank, ids, values, k in zip(
                self.token_ids.tolist(), self.token_logprobs.tolist(),
                self.token_ranks.tolist(), self.top_ids.tolist(), self.top_values.tolist(),
                self.num_top):
            entries = {token_id: Logprob(logprob=token_logprob, rank=token_rank)}
            rank = 0
            for position in range(min(k, vocab_width)):
                # Sorted descending: a value's rank is the 1-based position of its first copy.
                if position == 0 or values[position] != values[position - 1]:
                    rank = position + 1
                entries[ids[position]] = Logprob(logprob=values[position], rank=rank)
            result.append(entries)
        return result


def logprob_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor,
                    num_top: list[int]) -> LogprobTensors:
    """The device part: `logprobs` [rows, vocab] are raw log-softmax values, `token_ids`
    [rows] the given tokens, `num_top[i]` how many top entries row i lists."""
    vocab = logprobs.shape[1]
    token_logprobs = logprobs.gather(1, token_ids.unsqueeze(1))
    token_ranks = (logprobs > token_logprobs).sum(dim=-1) + 1
    width = min(max(num_top), vocab)
    ids = torch.empty((logprobs.shape[0], 0), dtype=torch.long, device=logprobs.device)
    values = torch.empty((logprobs.shape[0], 0), device=logprobs.device)
    if width > 0:
        ids = top_ids(logprobs, width)
        values = logprobs.gather(1, ids)
    return LogprobTensors(token_ids, token_logprobs.squeeze(1), token_ranks, ids, values,
                          list(num_top))


def logprob_dicts(logprobs: torch.Tensor, token_ids: torch.Tensor,
                  num_top: list[int]) -> list[dict[int, Logprob]]:
    """Per row of raw logprobs: the given token plus the ``num_top[i]`` most likely tokens."""
    return logprob_tensors(logprobs, token_ids, num_top).dicts()


def prompt_logprobs(
    logits: torch.Tensor, next_token_ids: list[int], k: int
) -> list[dict[int, Logprob]]:
    """Logprobs for prompt positions: ``logits[i]`` predicts ``next_token_ids[i]``.

    Returns per position the actual next token plus the top-k, ranked as the module says.
    Works through the rows in chunks to bound scratch memory on long prompts.
    """
    if logits.dim() != 2 or logits.shape[0] != len(next_token_ids):
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match {len(next_token_ids)} next tokens"
        )
    chunk = max(1, PROMPT_LOGPROBS_CHUNK_ELEMENTS // max(1, logits.shape[1]))
    targets = torch.tensor(next_token_ids, dtype=torch.long, device=logits.device)
    result: list[dict[int, Logprob]] = []
    for start in range(0, logits.shape[0], chunk):
        rows = logits[start : start + chunk].float().log_softmax(dim=-1)
        ids = targets[start : start + chunk]
        result += logprob_dicts(rows, ids, [k] * rows.shape[0])
    return result
