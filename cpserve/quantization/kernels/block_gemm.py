"""Block-scaled FP8 GEMM (Triton): activations in 1 x bk groups against weights in bn x bk
blocks, as DeepSeek-V3's FP8 checkpoints are made to run.

    y[m, n] = sum over k-blocks j of  a_scale[m, j] * b_scale[n // bn, j]
                                      * sum_{k in block j} a[m, k] * b[n, k]

    a [M, K] FP8, a_scale [M, ceil(K/bk)]      b [N, K] FP8, b_scale [ceil(N/bn), ceil(K/bk)]

One program computes a BLOCK_M x BLOCK_N tile of y; its K loop steps one scale block (bk) at a
time, so each step is one FP8 tensor-core dot (fp32 accumulate) rescaled by an outer product
of the step's scales. A tile narrower than bn reads the same weight-scale row for all its
columns; the scales are gathered per column, so any BLOCK_N works.

Contract: `cpserve.quantization.fp8.block_scaled_mm_reference` (dequantize both, fp32 matmul).

Precision on Hopper: an FP8 tensor-core dot accumulates with about 14 bits (DeepSeek-V3
report, section 3.3.2), not fp32. Each bk = 128 step is its own dot, promoted into the fp32
accumulator with its scales: DeepSeek's recipe (promotion every 128 elements of K). fp32
outputs then differ from the reference by ~2^-11 of their largest magnitude (the H200 run of
2026-12-01: 4e-4 to 5e-4), where the interpreter and the CPU agree to summation order.
TUNING["max_num_imprecise_acc"] = 32 promotes after every k32 instruction instead (Triton's
sm90 default, None, lets the whole 128-wide dot accumulate imprecisely); benchmarks/
profile_fp8.py measures what it buys and costs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TUNING = {"max_num_imprecise_acc": None}


@triton.jit
def _block_mm_step(kb, acc, a_rows, b_cols, a_scales, b_scales, ks, row_ok, col_ok, K,
                   BK: tl.constexpr, IMPRECISE_ACC: tl.constexpr):
    """acc += one bk-wide slice of K: an FP8 dot, rescaled by the outer product of scales."""
    k = kb * BK + ks
    k_ok = k < K
    a_tile = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    b_tile = tl.load(b_cols + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    sa = tl.load(a_scales + kb, mask=row_ok, other=0.0)
    sb = tl.load(b_scales + kb, mask=col_ok, other=0.0)
    return acc + tl.dot(a_tile, b_tile, max_num_imprecise_acc=IMPRECISE_ACC) * (
        sa[:, None] * sb[None, :])


@triton.jit
def _block_mm_kernel(a, a_scale, b, b_scale, c, M, N, K, K_BLOCKS, stride_am, stride_asm,
                     stride_bn, stride_bsn, stride_cm, SCALE_ROWS: tl.constexpr,
                     BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IMPRECISE_ACC: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BK)
    row_ok, col_ok = rows < M, cols < N
    a_rows = a + rows.to(tl.int64)[:, None] * stride_am
    b_cols = b + cols.to(tl.int64)[None, :] * stride_bn
    a_scales = a_scale + rows.to(tl.int64) * stride_asm
    b_scales = b_scale + (cols // SCALE_ROWS).to(tl.int64) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if INTERPRET:  # Triton's interpreter cannot take tensors as range() bounds
        kb = 0
        while kb < K_BLOCKS:
            acc = _block_mm_step(kb, acc, a_rows, b_cols, a_scales, b_scales, ks, row_ok,
                                 col_ok, K, BK, IMPRECISE_ACC)
            kb += 1
    else:
        for kb in range(0, K_BLOCKS):
            acc = _block_mm_step(kb, acc, a_rows, b_cols, a_scales, b_scales, ks, row_ok,
                                 col_ok, K, BK, IMPRECISE_ACC)
    out = c + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    tl.store(out, acc.to(c.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tiles(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): few rows (decode) take narrow tiles, so that
    the weight, which every row needs, is spread over many programs."""
    if m <= 16:
        return 16, 32, 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    return 128, 128, 8, 3


def block_scaled_mm_triton(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                           b_scale: torch.Tensor, block: tuple[int, int],
                           out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as `fp8.block_scaled_mm_reference`."""
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    assert a.stride(-1) == 1 and b.stride(-1) == 1, "FP8 operands must be row-major"
    a_scale, b_scale = a_scale.contiguous(), b_scale.contiguous()
    block_m, block_n, warps, stages = _tiles(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _block_mm_kernel[grid](a, a_scale, b, b_scale, out, m, n, k, triton.cdiv(k, block[1]),
                           a.stride(0), a_scale.stride(0),
                           b.stride(0), b_scale.stride(0), out.stride(0), SCALE_ROWS=block[0],
                           BK=block[1], BLOCK_M=block_m, BLOCK_N=block_n,
                           IMPRECISE_ACC=TUNING["max_num_imprecise_acc"], INTERPRET=INTERPRETING,
                           num_warps=warps, num_stages=stages)
    return out
