"""Rotary embeddings of one tensor in one Triton kernel (PyTorch spends about ten small kernels
on each of q and k: slices, negation, concatenations, multiplies, adds).

Reference: `cpserve.models.rope.rope_reference` (same signature). Pair i of the R rotated
channels is (x_a, x_b), rotated by the angle of its position:

    halves       x_a = x[i],      x_b = x[i + R/2]        out[i], out[i + R/2]
    interleaved  x_a = x[2i],     x_b = x[2i + 1]         out[i], out[i + R/2]   (DeepSeek)
                 out = (x_a cos - x_b sin,  x_b cos + x_a sin),  in fp32, rounded once

Interleaved input comes out de-interleaved (firsts, then seconds): queries and keys get the
same permutation, so their dot products do not change. Channels past R are copied.
cos / sin: [T, 1, R] tables with each angle twice (RotaryEmbedding.cos_sin); the first half
is read. One program per token, all heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x, cos, sin, out, heads, sx_t, sx_h, so_t, so_h, sc_t,
                 R: tl.constexpr, D: tl.constexpr, INTERLEAVED: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_REST: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    h_ok = (h < heads)[:, None]
    i = tl.arange(0, R // 2)[None, :]
    c = tl.load(cos + t * sc_t + i).to(tl.float32)
    s = tl.load(sin + t * sc_t + i).to(tl.float32)
    src = x + t * sx_t + h[:, None] * sx_h
    if INTERLEAVED:
        a = tl.load(src + 2 * i, mask=h_ok, other=0.0).to(tl.float32)
        b = tl.load(src + 2 * i + 1, mask=h_ok, other=0.0).to(tl.float32)
    else:
        a = tl.load(src + i, mask=h_ok, other=0.0).to(tl.float32)
        b = tl.load(src + R // 2 + i, mask=h_ok, other=0.0).to(tl.float32)
    dst = out + t * so_t + h[:, None] * so_h
    tl.store(dst + i, (a * c - b * s).to(out.dtype.element_ty), mask=h_ok)
    tl.store(dst + R // 2 + i, (b * c + a * s).to(out.dtype.element_ty), mask=h_ok)
    if D > R:
        rest = R + tl.arange(0, BLOCK_REST)[None, :]
        rest_ok = h_ok & (rest < D)
        tl.store(dst + rest, tl.load(src + rest, mask=rest_ok, other=0.0), mask=rest_ok)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                interleaved: bool) -> torch.Tensor:
    """x [T, H, D] (unit stride along D) -> a new [T, H, D] tensor."""
    tokens, heads, dim = x.shape
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    rest = dim - rotary_dim
    _rope_kernel[(tokens,)](
        x, cos, sin, out, heads, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        cos.stride(0), R=rotary_dim, D=dim, INTERLEAVED=interleaved,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_REST=triton.next_power_of_2(rest) if rest else 1,
        num_warps=4 if heads * dim >= 2048 else 1)
    return out
