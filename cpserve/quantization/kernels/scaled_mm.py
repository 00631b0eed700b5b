"""Row-wise scaled FP8 GEMM through `torch._scaled_mm` (cuBLASLt on Hopper; torch's CPU
build implements it too). Contract: `cpserve.quantization.fp8.rowwise_scaled_mm_reference`.

    y[m, n] = a_scale[m] * b_scale[n] * sum_k a[m, k] * b[n, k]

a_scale is per token (dynamic activations) or one static scale repeated; b_scale is per output
row (per-channel weights, or per-tensor scales repeated over the rows of their tensor).
cuBLASLt's row-wise mode writes bf16 only, so other output dtypes are cast afterwards.
"""

from __future__ import annotations

import torch


def rowwise_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                      b_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Same contract as `fp8.rowwise_scaled_mm_reference`; K and N multiples of 16."""
    if a.shape[0] == 0:
        return torch.empty(0, b.shape[0], dtype=out_dtype, device=a.device)
    out = torch._scaled_mm(a, b.t(), scale_a=a_scale.float().reshape(-1, 1).contiguous(),
                           scale_b=b_scale.float().reshape(1, -1).contiguous(),
                           out_dtype=torch.bfloat16)
    return out if out_dtype == torch.bfloat16 else out.to(out_dtype)
