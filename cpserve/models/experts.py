"""The routed-expert computation of a MoE layer: one signature, three implementations.

    experts(x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights [T, k] fp32, ids [T, k] int)
        -> out [T, H] in x's dtype,   out[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t])

    expert_e(x) = w2[e] @ (silu(w13[e, :I] @ x) * (w13[e, I:] @ x))
    ids[t, j] = -1: that expert lives on another rank (expert parallelism); the pair adds 0.

    experts_reference  plain PyTorch, a loop over the experts that got tokens: the specification
    experts_grouped    pairs sorted by expert, two `torch._grouped_mm` calls
    fused_experts      Triton grouped GEMMs (kernels/fused_moe.py): gate/up with SiLU-and-multiply
                       in one kernel, down with the routing weight in its epilogue

`experts_auto` picks `CUDA_EXPERTS` on CUDA (fused_experts in fp32), the reference elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The implementation CUDA runs ("triton" or "grouped_mm"): benchmarks/bench_moe.py times both
# against the reference and prints which wins.
CUDA_EXPERTS = "triton"


def experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    inter = w2.shape[-1]
    for expert in torch.unique(ids).tolist():
        if expert < 0:
            continue
        token, slot = torch.nonzero(ids == expert, as_tuple=True)
        gate_up = F.linear(x[token], w13[expert])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, w2[expert]) * weights[token, slot].unsqueeze(1)
        out.index_add_(0, token, y.to(x.dtype))
    return out


def experts_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Same result as `experts_reference`, with no host synchronisation.

        (token, k) pairs sorted by expert:  e0 e0 e0 | e1 | e3 e3 ... | (-1: elsewhere)
        offsets = cumsum(counts of the experts held here); rows past the last are garbage
        h = grouped_mm(x_sorted, w13^T, offsets) -> silu(gate) * up -> grouped_mm(., w2^T)
    """
    tokens, top_k = ids.shape
    num_experts = w13.shape[0]
    flat_ids = ids.reshape(-1)
    held = flat_ids >= 0
    key = torch.where(held, flat_ids, num_experts)  # pairs of other ranks' experts sort last
    order = torch.argsort(key, stable=True)
    token_of = order // top_k
    # scatter_add, not bincount: no device-to-host sync, so decode steps can be graph-captured.
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offsets = torch.cumsum(counts[:num_experts], 0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x[token_of], w13.transpose(-2, -1), offs=offsets)
    inter = w2.shape[-1]
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offsets)
    y = y.float() * weights.reshape(-1)[order].unsqueeze(1).float()
    y = torch.where(held[order].unsqueeze(1), y, 0.0)  # and not the garbage rows
    out = torch.zeros(tokens, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, y)
    return out.to(x.dtype)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    from cpserve.models.kernels.fused_moe import fused_moe  # needs Triton

    return fused_moe(x, w13, w2, weights, ids)


def experts_auto(x, w13, w2, weights, ids) -> torch.Tensor:
    # fp32 on CUDA too (IEEE dot products): the reference reads routing back to the host,
    # which a CUDA graph cannot capture.
    if x.is_cuda:
        if CUDA_EXPERTS == "grouped_mm" and x.dtype == torch.bfloat16:
            return experts_grouped(x, w13, w2, weights, ids)
        return fused_experts(x, w13, w2, weights, ids)
    return experts_reference(x, w13, w2, weights, ids)
