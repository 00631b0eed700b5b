"""Dense attention with an explicit (sequence, position) mask, in Triton.

Contract: `TorchReferenceBackend.dense_attention`: query i sees key j iff
`q_seq[i] == k_seq[j] and k_pos[j] <= q_pos[i]`. Any order of rows, any positions.

Every program scans all keys, so the work is N_q x N_k: this is the path for small steps
(decode tokens attending to themselves, short chunks), which needs nothing from the host and
so can run inside a CUDA graph, and the exact fallback for layouts the library kernels do not
express. Large regular layouts go to cuDNN / FlashAttention (see `gpu_backend.py`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cpserve.attention.kernels.scores import MAX_TILE_DIM, chunked_scores, dk_chunking, dot

LOG2E = 1.4426950408889634
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _masked_step(start, num_k, qv, q_rows, row_ok, my_pos, my_seq, m_i, l_i, acc, k, v, k_pos,
                 k_seq, kv_head, dv, sk_n, sk_h, sv_n, sv_h, scale_log2, DK: tl.constexpr,
                 DV: tl.constexpr, CHUNK_DK: tl.constexpr, NUM_DK_CHUNKS: tl.constexpr,
                 BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One block of BLOCK_N keys: online-softmax update of (m, l, acc)."""
    cols = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < num_k
    their_pos = tl.load(k_pos + cols, mask=col_ok, other=0)
    their_seq = tl.load(k_seq + cols, mask=col_ok, other=-3)
    visible = (their_seq[None, :] == my_seq[:, None]) & (their_pos[None, :] <= my_pos[:, None])
    k_cols = k + cols * sk_n + kv_head * sk_h
    if NUM_DK_CHUNKS == 1:  # the query tile stays in registers across blocks
        dk = tl.arange(0, CHUNK_DK)
        kt = tl.load(k_cols[None, :] + dk[:, None], mask=col_ok[None, :] & (dk[:, None] < DK),
                     other=0.0)
        s = dot(qv, kt, IEEE)
    else:
        s = chunked_scores(q_rows, row_ok, k_cols, col_ok, DK, CHUNK_DK, NUM_DK_CHUNKS, IEEE)
    s = tl.where(visible, s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    vt = tl.load(v + cols[:, None] * sv_n + kv_head * sv_h + dv[None, :],
                 mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
    pv = dot(p.to(vt.dtype), vt, IEEE)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _masked_kernel(q, k, v, q_pos, k_pos, q_seq, k_seq, out, lse, num_q, num_k, scale_log2,
                   sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_n, so_h, sl_n,
                   G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   CHUNK_DK: tl.constexpr, NUM_DK_CHUNKS: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                   INTERPRET: tl.constexpr):
    block = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // G
    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < num_q
    dv = tl.arange(0, BLOCK_DV)
    q_rows = q + rows * sq_n + head * sq_h
    if NUM_DK_CHUNKS == 1:
        dk = tl.arange(0, CHUNK_DK)
        qv = tl.load(q_rows[:, None] + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK),
                     other=0.0)
    else:  # wide keys: each step reads the query in chunks (scores.py)
        qv = 0.0
    my_pos = tl.load(q_pos + rows, mask=row_ok, other=-1)
    my_seq = tl.load(q_seq + rows, mask=row_ok, other=-2)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if INTERPRET:  # Triton's interpreter cannot take tensors as range() bounds
        start = num_k * 0
        while start < num_k:
            m_i, l_i, acc = _masked_step(start, num_k, qv, q_rows, row_ok, my_pos, my_seq, m_i,
                                         l_i, acc, k, v, k_pos, k_seq, kv_head, dv, sk_n, sk_h,
                                         sv_n, sv_h, scale_log2, DK, DV, CHUNK_DK,
                                         NUM_DK_CHUNKS, BLOCK_N, IEEE)
            start += BLOCK_N
    else:
        for start in range(0, num_k, BLOCK_N):
            m_i, l_i, acc = _masked_step(start, num_k, qv, q_rows, row_ok, my_pos, my_seq, m_i,
                                         l_i, acc, k, v, k_pos, k_seq, kv_head, dv, sk_n, sk_h,
                                         sv_n, sv_h, scale_log2, DK, DV, CHUNK_DK,
                                         NUM_DK_CHUNKS, BLOCK_N, IEEE)
    seen = l_i > 0
    result = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(out + rows[:, None] * so_n + head * so_h + dv[None, :],
             result.to(out.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
    row_lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
    tl.store(lse + rows * sl_n + head, row_lse, mask=row_ok)


def masked_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            q_pos: torch.Tensor, k_pos: torch.Tensor, q_seq: torch.Tensor,
                            k_seq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `TorchReferenceBackend.dense_attention`. `v` may be a view of `k`
    (latent attention: its first channels), with a smaller last dimension."""
    num_q, num_heads, dk = q.shape
    num_k, num_kv_heads, dv = k.shape[0], k.shape[1], v.shape[-1]
    out = torch.empty(num_q, num_heads, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_q, num_heads, dtype=torch.float32, device=q.device)
    if num_q == 0:
        return out, lse
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    wide = max(dk, dv) > MAX_TILE_DIM
    # Wide heads (latent attention: DV 512) hold a [BLOCK_M, 512] fp32 accumulator: fewer rows.
    block_m = 16 if num_q <= 16 else (32 if wide else 64)
    big = max(dk, dv) > 128
    chunk_dk, num_dk_chunks = dk_chunking(dk)
    _masked_kernel[(triton.cdiv(num_q, block_m), num_heads)](
        q, k, v, q_pos.contiguous(), k_pos.contiguous(), q_seq.contiguous(), k_seq.contiguous(),
        out, lse, num_q, num_k, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        G=num_heads // num_kv_heads, DK=dk, DV=dv, CHUNK_DK=chunk_dk,
        NUM_DK_CHUNKS=num_dk_chunks, BLOCK_DV=triton.next_power_of_2(dv), BLOCK_M=block_m,
        BLOCK_N=32 if big else 64, IEEE=q.dtype == torch.float32, INTERPRET=INTERPRETING,
        num_warps=8 if wide else 4, num_stages=2)
    return out, lse
