"""LSE merge of S partial attention results in one pass (see `cpserve.attention.merge`).

    l = logsumexp_s(l_s);   o = sum_s exp(l_s - l) * o_s       (fp32; l = -inf gives o = 0)

One program per (query, head): it reads the S log-sum-exps and S output rows once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(outs, lses, out, lse, num_heads,
                  so_s, so_n, so_h, sl_s, sl_n, sl_h, sr_n, sr_h,
                  S: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    n = (row // num_heads).to(tl.int64)
    h = row % num_heads
    parts = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    part_lse = tl.load(lses + parts * sl_s + n * sl_n + h * sl_h, mask=parts < S,
                       other=float("-inf")).to(tl.float32)
    top = tl.max(part_lse, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp(part_lse - safe_top)  # 0 for empty parts
    total = tl.sum(weights, axis=0)
    o = tl.load(outs + parts[:, None] * so_s + n * so_n + h * so_h + dims[None, :],
                mask=(parts[:, None] < S) & (dims[None, :] < D), other=0.0).to(tl.float32)
    merged = tl.sum(o * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out + n * sr_n + h * sr_h + dims, merged.to(out.dtype.element_ty),
             mask=dims < D)
    tl.store(lse + row, tl.where(total > 0, safe_top + tl.log(total), float("-inf")))


def merge_attention_states_triton(outs: torch.Tensor,
                                  lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """outs [S, N, H, D], lses [S, N, H] -> out [N, H, D] (dtype of outs), lse [N, H] fp32."""
    num_parts, n, h, d = outs.shape
    if outs.stride(-1) != 1:
        outs = outs.contiguous()
    out = torch.empty(n, h, d, dtype=outs.dtype, device=outs.device)
    lse = torch.empty(n, h, dtype=torch.float32, device=outs.device)
    if n * h == 0:
        return out, lse
    _merge_kernel[(n * h,)](
        outs, lses, out, lse, h, outs.stride(0), outs.stride(1), outs.stride(2),
        lses.stride(0), lses.stride(1), lses.stride(2), out.stride(0), out.stride(1),
        S=num_parts, D=d, BLOCK_S=triton.next_power_of_2(num_parts),
        BLOCK_D=triton.next_power_of_2(d), num_warps=1 if d <= 128 else 4)
    return out, lse
