"""Log-sum-exp merge of partial attention results: the one formula every CP path relies on.

Attention of a query over a key set K split into parts K_1 ... K_S can be computed part by
part. Part i returns its normalised output o_i and l_i = logsumexp of the scores over K_i.
Then, exactly,

    l = logsumexp_i(l_i)
    o = sum_i exp(l_i - l) * o_i

A part with no visible keys has l_i = -inf and contributes nothing; if every part is empty,
the result is o = 0, l = -inf (no NaN anywhere). Computed in fp32.
"""

from __future__ import annotations

import torch


def merge_attention_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial results.

    outs: [S, N, H, D] partial outputs, lses: [S, N, H] their log-sum-exps.
    Returns out [N, H, D] (dtype of `outs`) and lse [N, H] (fp32).
    """
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)
    weights = scale_factors(lses, lse)
    out = (weights.unsqueeze(-1) * outs.float()).sum(dim=0)
    return out.to(outs.dtype), lse


def scale_factors(part_lse: torch.Tensor, total_lse: torch.Tensor) -> torch.Tensor:
    """exp(part_lse - total_lse), with 0 wherever the total is -inf (nothing visible)."""
    finite = torch.isfinite(total_lse)
    safe_total = torch.where(finite, total_lse, torch.zeros_like(total_lse))
    return torch.where(finite, torch.exp(part_lse - safe_total), torch.zeros_like(part_lse))


def merge_two(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results of the same queries (the running update of a ring)."""
    return merge_attention_states(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))


def fold_into(running: tuple[torch.Tensor, torch.Tensor] | None, out: torch.Tensor,
              lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one more partial result into a running (out, lse) held in fp32: a ring's update.

    Keeping the running output in the inputs' dtype (bf16) would round it once per PCP rank;
    in fp32 the caller rounds once, at the end.
    """
    out, lse = out.float(), lse.float()
    if running is None:
        return out, lse
    return merge_two(running[0], running[1], out, lse)
