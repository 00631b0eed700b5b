"""Fused mixture-of-experts GEMMs in Triton: pairs grouped by expert, two kernels a layer.

Reference: `cpserve.models.experts.experts_reference` (same signature as `fused_moe`).

    pair p = t * top_k + j: token t's j-th choice, routed to expert e = ids[t, j]
    gate/up   h[p]   = silu(x[t] @ w13[e, :I].T) * (x[t] @ w13[e, I:].T)          [P, I]
    down      y[p]   = weights[t, j] * (h[p] @ w2[e].T)                            [P, H]
    combine   out[t] = sum_j y[t * top_k + j]                                      [T, H]

A program computes one [BLOCK_M, BLOCK_N] tile for one expert: BLOCK_M pairs of that expert
against BLOCK_N output columns, so a weight tile is read once for BLOCK_M pairs. Which pairs
a program takes, two ways:

  sorted     (prefill, many pairs) pairs sorted by expert, each expert's run padded to a
             multiple of BLOCK_M (`align_pairs`); a program row is one BLOCK_M-block:

                 sorted_pairs  p7 p2 p9 -- | p0 p4 p5 p8 | p11 -- -- -- | p3 p6 -- --   (-- pad)
                 block_expert       0      |      2      |      2       |   E (elsewhere)

             The grid has room for the most blocks any routing can need, so nothing is read
             back to the host (CUDA graphs); blocks past the end have expert -1 and exit. The
             last group, "E", holds the pairs of experts on other ranks (expert parallelism,
             id -1): the down kernel writes zeros there, the gate/up kernel skips them.

  by expert  (decode, pairs <= BLOCK_M) a program row per expert, and row E for pairs held
             elsewhere; its tile holds every pair and masks those routed elsewhere, and an
             expert nobody chose exits before reading a weight. Nothing is sorted: at batch 1
             the small kernels of `align_pairs` would cost more than the GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class MoEKernelConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Tuning constants, measured by benchmarks/bench_moe.py (which prints the best candidates);
# these are its decisions on one H200 on 2026-12-01 (benchmarks/RESULTS.md, run 6).
SORTED_CONFIG = MoEKernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
# Sorted with few pairs per expert (decode batches): each expert's run is padded to block_m.
SORTED_SMALL_CONFIG = MoEKernelConfig(block_m=32, block_n=64, block_k=128, num_warps=4,
                                      num_stages=3)
SORTED_SMALL_MAX_PAIRS_PER_EXPERT = 8
# By expert: block_m is the pair count rounded up to a power of two (at least 16).
BY_EXPERT_CONFIG = MoEKernelConfig(block_m=16, block_n=64, block_k=128, num_warps=4,
                                   num_stages=3)
BY_EXPERT_MAX_PAIRS = 128  # more pairs than this: sorted
ONE_HOT_MAX_PAIRS = 2048  # align_pairs places at most this many pairs without a sort


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        result = tl.dot(a, b, input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def _moe_gemm_kernel(a, w, out, pair_weights, sorted_pairs, block_expert, ids,
                     num_pairs, num_experts, stride_am, stride_we, stride_wn, stride_om,
                     N: tl.constexpr, K: tl.constexpr, ROWS_PER_A: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr,
                     SORTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """out[p, cols] for the pairs p of one expert's tile. A row of `a` serves ROWS_PER_A
    consecutive pairs (top_k for x, 1 for h). GATED: w holds 2N rows, gate then up, and the
    tile is silu(gate) * up. WEIGHTED: times pair_weights[p] (the routing weight). N and K
    (the weight's shape) are compile-time: one model has two of each."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if SORTED:
        expert = tl.load(block_expert + pid_m)
        pairs = tl.load(sorted_pairs + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = pairs < num_pairs
    else:  # program row E takes the pairs held elsewhere (id -1), as the last sorted group
        expert = pid_m
        pairs = tl.arange(0, BLOCK_M)
        real = pairs < num_pairs
        chosen = tl.load(ids + pairs, mask=real, other=-1)
        row_ok = real & ((chosen == expert) | ((chosen < 0) & (expert == num_experts)))
        if tl.max(row_ok.to(tl.int32), axis=0) == 0:
            expert = -1
    pairs = pairs.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    out_tile = out + pairs[:, None] * stride_om + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if (expert >= 0) & (expert < num_experts):
        rows = pairs // ROWS_PER_A
        w_expert = w + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            a_tile = tl.load(a + rows[:, None] * stride_am + kk[None, :],
                             mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_ok = col_ok[None, :] & k_ok[:, None]
            w_tile = tl.load(w_expert + cols[None, :] * stride_wn + kk[:, None], mask=w_ok,
                             other=0.0)
            acc += _dot(a_tile, w_tile, IEEE)
            if GATED:
                up_tile = tl.load(w_expert + (cols[None, :] + N) * stride_wn + kk[:, None],
                                  mask=w_ok, other=0.0)
                acc_up += _dot(a_tile, up_tile, IEEE)
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if WEIGHTED:
            acc = acc * tl.load(pair_weights + pairs, mask=row_ok, other=0.0)[:, None]
        tl.store(out_tile, acc.to(out.dtype.element_ty), mask=out_ok)
    if WEIGHTED:
        if expert == num_experts:  # pairs of experts held elsewhere add nothing
            tl.store(out_tile, tl.zeros((BLOCK_M, BLOCK_N), dtype=out.dtype.element_ty),
                     mask=out_ok)


def align_pairs(flat_ids: torch.Tensor, num_experts: int,
                block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_pairs [num_blocks * block_m], block_expert [num_blocks]), int32, for the sorted
    mode (see the module docstring). Padding entries are `P` (past the last pair); pairs with
    id -1 form the last group, numbered `num_experts`. All on the device, no host sync."""
    num_pairs = flat_ids.numel()
    device = flat_ids.device
    groups = num_experts + 1
    key = torch.where(flat_ids < 0, num_experts, flat_ids).long()
    counts = torch.zeros(groups, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    first_padded = padded_end - padded
    # Each pair's place in its group, in pair order. Few pairs (a decode or verification
    # batch): a running count per group over [groups, P] flags, a few small kernels; many
    # (prefill): a stable sort, whose fixed cost (about 25 us on an H200) is then small.
    if num_pairs <= ONE_HOT_MAX_PAIRS:
        one_hot = key[None, :] == torch.arange(groups, device=device)[:, None]
        # Along the inner dimension: the same count over [P, groups] took 44 us a layer.
        running = one_hot.cumsum(1, dtype=torch.int32)
        rank_in_group = running.gather(0, key[None, :]).squeeze(0) - 1
        pairs, pair_key = torch.arange(num_pairs, device=device), key
    else:
        pairs = torch.argsort(key, stable=True)
        pair_key = key[pairs]
        first = counts.cumsum(0) - counts
        rank_in_group = torch.arange(num_pairs, device=device) - first[pair_key]
    # Every non-empty group pads less than one block: this many blocks always suffice.
    num_blocks = triton.cdiv(num_pairs, block_m) + min(groups, num_pairs)
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32,
                              device=device)
    sorted_pairs.scatter_(0, first_padded[pair_key] + rank_in_group, pairs.to(torch.int32))
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True, out_int32=True)
    block_expert = torch.where(block_expert >= groups, -1, block_expert)
    return sorted_pairs, block_expert


def _launch(a, w, out, pair_weights, rows, flat_ids, num_experts, rows_per_a, gated, weighted,
            config: MoEKernelConfig, block_m: int) -> None:
    sorted_pairs, block_expert = rows
    n = out.shape[1]
    k = a.shape[1]
    grid_m = block_expert.numel() if block_expert is not None else num_experts + 1
    grid = (grid_m, triton.cdiv(n, config.block_n))
    _moe_gemm_kernel[grid](
        a, w, out, pair_weights,
        sorted_pairs if sorted_pairs is not None else flat_ids,
        block_expert if block_expert is not None else flat_ids, flat_ids,
        flat_ids.numel(), num_experts, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        N=n, K=k, ROWS_PER_A=rows_per_a, GATED=gated, WEIGHTED=weighted,
        SORTED=block_expert is not None, BLOCK_M=block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, IEEE=a.dtype == torch.float32, num_warps=config.num_warps,
        num_stages=config.num_stages)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, sorted_config: MoEKernelConfig | None = None,
              by_expert_config: MoEKernelConfig | None = None,
              by_expert_max_pairs: int | None = None) -> torch.Tensor:
    """Same contract as `experts_reference`; the configs default to the tuning constants."""
    tokens, top_k = ids.shape
    num_experts, hidden, inter = w2.shape
    num_pairs = tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    flat_ids = ids.reshape(-1)
    pair_weights = weights.reshape(-1).to(torch.float32).contiguous()
    max_pairs = BY_EXPERT_MAX_PAIRS if by_expert_max_pairs is None else by_expert_max_pairs
    if num_pairs <= max_pairs:
        config = by_expert_config or BY_EXPERT_CONFIG
        block_m = max(config.block_m, triton.next_power_of_2(num_pairs))
        rows = (None, None)
    else:
        small = num_pairs <= SORTED_SMALL_MAX_PAIRS_PER_EXPERT * num_experts
        config = sorted_config or (SORTED_SMALL_CONFIG if small else SORTED_CONFIG)
        block_m = config.block_m
        rows = align_pairs(flat_ids, num_experts, block_m)
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # every row written
    h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _launch(x, w13, h, pair_weights, rows, flat_ids, num_experts, top_k, True, False, config,
            block_m)
    _launch(h, w2, y, pair_weights, rows, flat_ids, num_experts, 1, False, True, config,
            block_m)
    return y.view(tokens, top_k, hidden).sum(1)
