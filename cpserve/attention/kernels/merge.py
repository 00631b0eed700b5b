"""LSE merge of S partial attention results in one pass (see `cpserve.attention.merge`).

    l = logsumexp_s(l_s);   o = sum_s exp(l_s - l) * o_s       (fp32; l = -inf gives o = 0)

One program per (query, head): it reads the S log-sum-exps and S output rows once.
`merge_two_triton` is the two-part case read in place (a chunk's own part and its prefix),
one program per (query, block of heads), so no stacked copy of the parts is made.
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


@triton.jit
def _merge_two_kernel(out_a, lse_a, out_b, lse_b, out, lse, num_heads,
                      sa_n, sa_h, sla_n, sla_h, sb_n, sb_h, slb_n, slb_h, so_n, so_h,
                      D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok = h < num_heads
    mask = h_ok[:, None] & (d[None, :] < D)
    la = tl.load(lse_a + n * sla_n + h * sla_h, mask=h_ok, other=float("-inf")).to(tl.float32)
    lb = tl.load(lse_b + n * slb_n + h * slb_h, mask=h_ok, other=float("-inf")).to(tl.float32)
    top = tl.maximum(la, lb)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    wa, wb = tl.exp(la - safe_top), tl.exp(lb - safe_top)  # 0 for an empty part
    total = wa + wb
    norm = tl.where(total > 0, total, 1.0)
    oa = tl.load(out_a + n * sa_n + h[:, None] * sa_h + d[None, :], mask=mask, other=0.0)
    ob = tl.load(out_b + n * sb_n + h[:, None] * sb_h + d[None, :], mask=mask, other=0.0)
    merged = (oa.to(tl.float32) * (wa / norm)[:, None] + ob.to(tl.float32) * (wb / norm)[:, None])
    tl.store(out + n * so_n + h[:, None] * so_h + d[None, :], merged.to(out.dtype.element_ty),
             mask=mask)
    tl.store(lse + n * num_heads + h, tl.where(total > 0, safe_top + tl.log(norm), float("-inf")),
             mask=h_ok)


def merge_two_triton(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                     lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `cpserve.attention.merge.merge_two`: two partial results of the same
    queries, read in place (no stacked copy). out [N, H, D] in out_a's dtype, lse fp32."""
    n, h, d = out_a.shape
    out = torch.empty(n, h, d, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(n, h, dtype=torch.float32, device=out_a.device)
    if n * h == 0:
        return out, lse
    if out_a.stride(-1) != 1:
        out_a = out_a.contiguous()
    if out_b.stride(-1) != 1:
        out_b = out_b.contiguous()
    block_d = triton.next_power_of_2(d)
    block_h = min(triton.next_power_of_2(h), max(1, 4096 // block_d))
    _merge_two_kernel[(n, triton.cdiv(h, block_h))](
        out_a, lse_a, out_b, lse_b, out, lse, h, out_a.stride(0), out_a.stride(1),
        lse_a.stride(0), lse_a.stride(1), out_b.stride(0), out_b.stride(1), lse_b.stride(0),
        lse_b.stride(1),
        out.stride(0), out.stride(1), D=d, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)
    return out, lse
