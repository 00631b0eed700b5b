"""Thin wrappers over the attention kernels PyTorch ships, in the shapes the backend uses.

    q [T_q, H, D], k / v [T_k, H_kv, D]  ->  out [T_q, H, D], lse [T_q, H] (fp32, natural log)

cuDNN (`aten._scaled_dot_product_cudnn_attention`) is the fastest measured on the lent H200s
(DESIGN.md, about 600 TFLOP/s), but its causal mask is top-left: right only for square
pieces. FlashAttention-2 varlen (`aten._flash_attention_forward`) is bottom-right and takes
many sequences in one call. Both accept fewer KV heads than query heads. Which of them work
on a machine, and whether their LSE means what we think, is checked once by `probe_ops`.

cuDNN graphs are built per shape: PyTorch caches one per exact (q_len, k_len, strides), and a
miss costs tens to hundreds of milliseconds (others measured 55-70 ms a plan, 400 ms, about
1 s when a kernel is compiled). A chunked prefill meets a new prefix length every step. With
TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1, PyTorch rounds lengths up to powers of two and passes the
real ones as ragged offsets (contiguous q / k / v only), so a process builds a few graphs in
all. PyTorch reads the variable once, at its first cuDNN attention: `prefer_cudnn_shape_reuse`
sets it before that, unless the user set it.
"""

from __future__ import annotations

import os

import torch

from cpserve.attention.backend import TorchReferenceBackend

# Ask PyTorch to reuse cuDNN graphs across lengths (see above); benchmarks/bench_chunk_attention.py
# measures both settings and says which to keep.
CUDNN_AVOID_RECOMPILE = True
_AVOID_RECOMPILE_ENV = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"


def prefer_cudnn_shape_reuse() -> None:
    if CUDNN_AVOID_RECOMPILE:
        os.environ.setdefault(_AVOID_RECOMPILE_ENV, "1")


def _reuses_shapes() -> bool:
    return os.environ.get(_AVOID_RECOMPILE_ENV) == "1"


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence. `causal` is top-left: use it only when T_q == T_k."""
    if _reuses_shapes():  # graph reuse needs [T, H, D] contiguous (BSHD with B = 1)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    t_q, heads = q.shape[0], q.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2),
        v.unsqueeze(0).transpose(1, 2), None, True, 0.0, causal, False, scale=scale)[:2]
    return out[0].transpose(0, 1), lse.reshape(heads, t_q).transpose(0, 1)


def flash_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
                           causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Many sequences: sequence b is rows [cu_q[b], cu_q[b+1]) of q over [cu_k[b], cu_k[b+1])
    of k, v (int32 offsets on the device). `causal` is bottom-right."""
    out, lse = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)[:2]
    t_q = q.shape[0]
    if lse.dim() == 2:  # [H, T_q], unpadded
        return out, lse.transpose(0, 1)
    # Older FlashAttention-2: padded [B, H, max_q]; row r of sequence b sits at r - cu_q[b].
    seq_of_row = torch.searchsorted(cu_q[1:].long(), torch.arange(t_q, device=q.device),
                                    right=True)
    index_in_seq = torch.arange(t_q, device=q.device) - cu_q.long()[seq_of_row]
    return out, lse[seq_of_row, :, index_in_seq]


def probe_ops(device: torch.device, dtype: torch.dtype = torch.bfloat16,
              head_dim: int = 128) -> dict[str, bool]:
    """Which library ops run here and agree with the reference (output and LSE), on a small
    GQA problem with this head dim: causal square, full rectangular, and varlen causal over
    a prefix."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    ref = TorchReferenceBackend()
    heads, kv_heads, dim, t_q, t_k = 8, 2, head_dim, 96, 160
    q, k, v = rand(t_q, heads, dim), rand(t_k, kv_heads, dim), rand(t_k, kv_heads, dim)
    zeros_q = torch.zeros(t_q, dtype=torch.long, device=device)
    zeros_k = torch.zeros(t_k, dtype=torch.long, device=device)
    pos_k = torch.arange(t_k, device=device)

    def close(got, want) -> bool:
        (out, lse), (ref_out, ref_lse) = got, want
        return (torch.allclose(out.float(), ref_out.float(), atol=3e-2, rtol=3e-2)
                and torch.allclose(lse, ref_lse, atol=1e-2, rtol=1e-3))

    def check(fn) -> bool:
        try:
            return bool(fn())
        except Exception:  # an op missing in this build, or refusing these shapes
            return False

    def cudnn_ok() -> bool:
        square = cudnn_attention(q, k[:t_q], v[:t_q], True, 0.1)
        full = cudnn_attention(q, k, v, False, 0.1)
        want_sq = ref.dense_attention(q, k[:t_q], v[:t_q], pos_k[:t_q], pos_k[:t_q],
                                      zeros_q, zeros_q, 0.1)
        want_full = ref.dense_attention(q, k, v, zeros_q + t_k, pos_k, zeros_q, zeros_k, 0.1)
        # Other lengths of the same power-of-two class: with graph reuse, the same graph.
        part = cudnn_attention(q[:70], k[:130], v[:130], False, 0.1)
        want_part = ref.dense_attention(q[:70], k[:130], v[:130], zeros_q[:70] + 130,
                                        pos_k[:130], zeros_q[:70], zeros_k[:130], 0.1)
        return close(square, want_sq) and close(full, want_full) and close(part, want_part)

    def flash_ok() -> bool:
        # Two sequences: 40 queries over 100 keys, then 56 over 60 (bottom-right causal).
        cu_q = torch.tensor([0, 40, t_q], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 100, t_k], dtype=torch.int32, device=device)
        got = flash_varlen_attention(q, k, v, cu_q, cu_k, 56, 100, True, 0.1)
        q_seq = torch.cat([zeros_q[:40], zeros_q[40:] + 1])
        k_seq = torch.cat([zeros_k[:100], zeros_k[100:] + 1])
        q_pos = torch.cat([torch.arange(60, 100), torch.arange(4, 60)]).to(device)
        k_pos = torch.cat([torch.arange(100), torch.arange(60)]).to(device)
        want = ref.dense_attention(q, k, v, q_pos, k_pos, q_seq, k_seq, 0.1)
        return close(got, want)

    return {"cudnn": check(cudnn_ok), "flash": check(flash_ok)}
