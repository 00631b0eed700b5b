"""RMSNorm in one Triton kernel, optionally after the residual add (decode steps pay ~7 small
PyTorch kernels per norm: casts, square, mean, rsqrt, two multiplies).

Reference: `cpserve.models.layers.rms_norm_reference` (what `RMSNorm` computes on CPU, with
transformers' rounding):

    s = x + residual                 (in x's dtype; only with a residual)
    y = weight * (s_fp32 * rsqrt(mean(s_fp32^2) + eps)).to(dtype)

Rows are the leading dims of x: [T, N], or [T, H, N] (per-head norms, Qwen3's q/k), with any
strides but a unit stride along N; one program normalises one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x, residual, weight, out, summed, eps, heads, sx_t, sx_h, sr_t, sr_h,
                     so_t, so_h, ss_t, N: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    t, h = (row // heads).to(tl.int64), (row % heads).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    s = tl.load(x + t * sx_t + h * sx_h + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        s = s + tl.load(residual + t * sr_t + h * sr_h + cols, mask=ok, other=0.0)
        tl.store(summed + t * ss_t + cols, s, mask=ok)
    wide = s.to(tl.float32)
    normed = wide * tl.rsqrt(tl.sum(wide * wide, axis=0) / N + eps)
    w = tl.load(weight + cols, mask=ok, other=0.0)
    y = w.to(tl.float32) * normed.to(s.dtype).to(tl.float32)
    tl.store(out + t * so_t + h * so_h + cols, y.to(out.dtype.element_ty), mask=ok)


def _rows3(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(1)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None, out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `rms_norm_reference`; `out` (x's shape, unit stride along N) may be
    given to write the result into a view of a bigger buffer."""
    assert x.dim() in (2, 3) and x.stride(-1) == 1, "rows of unit stride"
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    summed = None
    if residual is not None:
        assert x.dim() == 2 and residual.stride(-1) == 1
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x3, o3 = _rows3(x), _rows3(out)
    r3 = _rows3(residual) if residual is not None else x3
    tokens, heads = x3.shape[0], x3.shape[1]
    if tokens * heads == 0:
        return out, summed
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(tokens * heads,)](
        x3, r3, weight, o3, summed if summed is not None else o3, eps, heads,
        x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1), o3.stride(0), o3.stride(1),
        summed.stride(0) if summed is not None else 0, N=n, BLOCK=block,
        HAS_RESIDUAL=residual is not None, num_warps=4 if block >= 1024 else 1)
    return out, summed
