"""Softmax routing in one Triton kernel: scores, the k best, renormalised and scaled (PyTorch
spends about six small kernels a layer on it: softmax, top-k, gather, sum, divide, scale).

Reference: the greedy softmax branch of `cpserve.models.moe.select_experts` (same outputs up
to the order of a token's k choices, which nothing depends on):

    scores = softmax(logits[t])                     fp32
    ids    = the k experts with the best scores     (here in descending order)
    w      = scores[ids] / (sum(scores[ids]) + 1e-20) if normalize, times scaling_factor

One program per token, all experts in registers (E <= 1024); the k best by k passes of
argmax, each removing its winner.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _softmax_topk_kernel(logits, weights, ids, stride_l, scaling, E: tl.constexpr,
                         K: tl.constexpr, BLOCK_E: tl.constexpr, NORMALIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    x = tl.load(logits + t * stride_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(ok, p / tl.sum(p, axis=0), -1.0)  # padding lanes never win
    chosen = p
    total = 0.0
    for _ in tl.static_range(K):  # the sum of the k best, for the renormalisation
        best = tl.max(chosen, axis=0)
        winner = tl.min(tl.where(chosen == best, e, BLOCK_E), axis=0)
        total += best
        chosen = tl.where(e == winner, -1.0, chosen)
    if NORMALIZE:
        factor = scaling / (total + 1e-20)
    else:
        factor = scaling
    for j in tl.static_range(K):
        best = tl.max(p, axis=0)
        winner = tl.min(tl.where(p == best, e, BLOCK_E), axis=0)
        tl.store(weights + t * K + j, best * factor)
        tl.store(ids + t * K + j, winner)
        p = tl.where(e == winner, -1.0, p)


def softmax_topk_triton(logits: torch.Tensor, top_k: int, normalize: bool,
                        scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, k] fp32, ids [T, k] int64)."""
    tokens, experts = logits.shape
    assert logits.stride(-1) == 1 and experts <= 1024
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens:
        _softmax_topk_kernel[(tokens,)](
            logits, weights, ids, logits.stride(0), float(scaling), E=experts, K=top_k,
            BLOCK_E=triton.next_power_of_2(experts), NORMALIZE=normalize,
            num_warps=4 if experts >= 256 else 1)
    return weights, ids
