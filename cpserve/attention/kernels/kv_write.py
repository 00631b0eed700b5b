"""KV-cache write: token i's K (and V) go to flat slot `slot_mapping[i]` of this rank's cache.

    k [T, H_kv, D_k]             k_cache [num_blocks, B, H_kv, D_k]
    slot_mapping [T]  ──────>    flat slot s = block * B + offset;  s = -1: not this shard's

One program per token: slots are unique within a step, so programs never collide, and a
token whose slot is -1 (its KV lives on another shard) costs one load.

An FP8 cache stores e4m3(x / scale), rounded as the PyTorch reference rounds (e4m3.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from cpserve.quantization.kernels.e4m3 import round_to_e4m3


@triton.jit
def _write_kv_kernel(src, cache, slots, scale, stride_st, stride_sh, stride_cs, stride_ch,
                     H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr, FP8: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slots + token)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < H) & (dims < D)
        x = tl.load(src + token.to(tl.int64) * stride_st + heads * stride_sh + dims, mask=mask)
        if FP8:
            x = round_to_e4m3(tl.math.div_rn(x.to(tl.float32), scale))
        tl.store(cache + slot * stride_cs + heads * stride_ch + dims,
                 x.to(cache.dtype.element_ty), mask=mask)


def _write(src: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, scale: float) -> None:
    num_tokens, heads, dim = src.shape
    if num_tokens == 0:
        return
    if src.stride(-1) != 1:
        src = src.contiguous()
    flat = cache.view(-1, *cache.shape[2:])  # [num_blocks * B, H_kv, D]
    assert flat.stride(-1) == 1, "the cache's last dimension must be contiguous"
    _write_kv_kernel[(num_tokens,)](
        src, flat, slots, float(scale), src.stride(0), src.stride(1), flat.stride(0),
        flat.stride(1), H=heads, D=dim, BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim), FP8=cache.dtype == torch.float8_e4m3fn,
        num_warps=4 if heads * dim >= 1024 else 1)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor | None, k_cache: torch.Tensor,
                    v_cache: torch.Tensor | None, slot_mapping: torch.Tensor,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Same contract as `TorchReferenceBackend.write_kv`: skip slots that are -1; with
    `v_cache=None` only keys are stored (latent attention keeps values inside the keys)."""
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    _write(k, k_cache, slots, k_scale)
    if v_cache is not None:
        _write(v, v_cache, slots, v_scale)
