"""Dynamic activation quantization (Triton): x [M, K] -> FP8 [M, K] and one fp32 scale per
row and 1 x `group` group, in one pass over the data per group.

Contract: `cpserve.quantization.fp8.quantize_groups` (the PyTorch reference). `group = K`
gives one scale per token (the row-wise `torch._scaled_mm` path); `group = 128` the activation
groups of block-scaled GEMMs.

    program (row m, group g): amax over x[m, g*group : (g+1)*group], read BLOCK at a time
                              scale[m, g] = max(amax / 448, 1e-12)
                              out = round_to_e4m3(x / scale)      (second read, from L2)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpserve.quantization.fp8 import FP8, MIN_SCALE
from cpserve.quantization.kernels.e4m3 import round_to_e4m3

MAX_BLOCK = 1024


@triton.jit
def _quantize_groups_kernel(x, out, scale, K, stride_xm, stride_om, stride_sm,
                            GROUP: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                            MIN_SCALE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    first = group * GROUP
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for c in tl.static_range(NUM_CHUNKS):
        cols = first + c * BLOCK + offs
        ok = (cols < K) & (c * BLOCK + offs < GROUP)
        v = tl.load(x + row * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    s = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 448.0), MIN_SCALE)
    tl.store(scale + row * stride_sm + group, s)
    for c in tl.static_range(NUM_CHUNKS):
        cols = first + c * BLOCK + offs
        ok = (cols < K) & (c * BLOCK + offs < GROUP)
        v = tl.load(x + row * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
        q = round_to_e4m3(tl.math.div_rn(v, s))
        tl.store(out + row * stride_om + cols, q.to(out.dtype.element_ty), mask=ok)


def quantize_groups_triton(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `fp8.quantize_groups`: (FP8 [M, K], scale [M, ceil(K / group)])."""
    rows, cols = x.shape
    groups = triton.cdiv(cols, group)
    out = torch.empty(rows, cols, dtype=FP8, device=x.device)
    scale = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, scale
    if x.stride(-1) != 1:
        x = x.contiguous()
    block = min(triton.next_power_of_2(min(group, cols)), MAX_BLOCK)
    _quantize_groups_kernel[(rows, groups)](
        x, out, scale, cols, x.stride(0), out.stride(0), scale.stride(0),
        GROUP=group, BLOCK=block, NUM_CHUNKS=triton.cdiv(min(group, cols), block),
        MIN_SCALE=MIN_SCALE, num_warps=4 if block >= 512 else 1)
    return out, scale
