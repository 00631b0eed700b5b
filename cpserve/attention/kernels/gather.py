"""Gather of a cached prefix from the paged KV cache into one contiguous buffer (Triton).

Library attention (cuDNN, FlashAttention) reads keys and values as contiguous rows, while the
paged cache scatters a request's tokens over blocks. A chunk over a cached prefix therefore
gathers the prefix once per layer and hands the buffer to the library kernel:

    cache [num_blocks, B, H_kv, D]        local token t of sequence s lives in slot
                                          block_tables[s, t // B] * B + t % B
    work item i = (seq, src, dst, count): local tokens [src, src + count) of `seq`
                                          -> rows [dst, dst + count) of the output

    B = 4, block_tables[s] = [7, 2, ...], one item (s, src=0, dst=10, count=6):
        slots   28 29 30 31 | 8 9        (block 7, then block 2)
        rows    10 11 12 13  14 15

Items are built on the host once per step (kernels/prefix_plan.py) with at most `block_tokens`
tokens each; each program copies one item's tokens over a slice of the H_kv * D channels.
For the 8B shape a 128k-token prefix is 256 MiB of keys per layer: read once, written once.

An FP8 cache (`--kv-cache-dtype fp8`) is gathered into the model's dtype and dequantized on
the way, row = e4m3 value * the layer's scale (computed in fp32, then rounded), the numbers
the paged kernel and the reference read back (cpserve/quantization/kv_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Channels (H_kv * D) one program copies: 8 KV heads of 128 are two programs per item.
BLOCK_CHANNELS = 512


@dataclass(frozen=True)
class GatherWork:
    """What to copy: `items` [4, I] int32 rows (seq, src, dst, count), on the cache's device.
    `num_rows` output rows in all; every count is at most `block_tokens`."""

    items: torch.Tensor
    num_rows: int
    block_tokens: int

    @property
    def num_items(self) -> int:
        return self.items.shape[1]


@triton.jit
def _gather_kernel(cache, out, tables, items, num_items, scale, s_slot, s_head, s_table, s_out,
                   HEAD_DIM: tl.constexpr, CHANNELS: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SCALED: tl.constexpr):
    item = tl.program_id(0)
    seq = tl.load(items + item).to(tl.int64)
    src = tl.load(items + num_items + item)
    dst = tl.load(items + 2 * num_items + item).to(tl.int64)
    count = tl.load(items + 3 * num_items + item)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < count
    local = src + t
    page = tl.load(tables + seq * s_table + local // PAGE, mask=t_ok, other=0).to(tl.int64)
    slot = page * PAGE + local % PAGE
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < CHANNELS
    mask = t_ok[:, None] & c_ok[None, :]
    x = tl.load(cache + slot[:, None] * s_slot + (c // HEAD_DIM)[None, :] * s_head
                + (c % HEAD_DIM)[None, :], mask=mask)
    if SCALED:  # an FP8 cache: dequantized in fp32
        x = x.to(tl.float32) * scale
    tl.store(out + (dst + t)[:, None] * s_out + c[None, :], x.to(out.dtype.element_ty),
             mask=mask)


def _check_cache(cache: torch.Tensor) -> None:
    # Slots are addressed as one flat index: blocks must be B consecutive slot strides apart.
    assert cache.stride(0) == cache.shape[1] * cache.stride(1), "cache blocks must be dense"
    assert cache.stride(-1) == 1, "the cache's last dimension must be contiguous"


def _out(cache: torch.Tensor, work: GatherWork, out: torch.Tensor | None,
         dtype: torch.dtype | None) -> torch.Tensor:
    _, _, heads, dim = cache.shape
    if out is None:
        out = torch.empty(work.num_rows, heads, dim, dtype=dtype or cache.dtype,
                          device=cache.device)
    return out


def _scaled(cache: torch.Tensor) -> bool:
    """Whether the gather multiplies by `scale`: an FP8 cache (read back as value * scale)."""
    return cache.dtype == torch.float8_e4m3fn


def gather_kv_triton(cache: torch.Tensor, block_tables: torch.Tensor, work: GatherWork,
                     out: torch.Tensor | None = None, scale: float = 1.0,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows of `cache` [num_blocks, B, H_kv, D] named by `work`, as a contiguous
    [work.num_rows, H_kv, D] tensor (`out`, or a new one in `dtype`, by default the cache's).
    An FP8 cache's rows come out as value * `scale` (its dequantization)."""
    _, page, heads, dim = cache.shape
    out = _out(cache, work, out, dtype)
    if work.num_items == 0:
        return out
    _check_cache(cache)
    assert out.is_contiguous() and out.shape[0] >= work.num_rows
    block_tables = block_tables.contiguous()
    channels = heads * dim
    block_c = min(BLOCK_CHANNELS, triton.next_power_of_2(channels))
    _gather_kernel[(work.num_items, triton.cdiv(channels, block_c))](
        cache, out, block_tables, work.items, work.num_items, float(scale), cache.stride(1),
        cache.stride(2), block_tables.stride(0), channels, HEAD_DIM=dim, CHANNELS=channels,
        PAGE=page, BLOCK_T=triton.next_power_of_2(work.block_tokens), BLOCK_C=block_c,
        SCALED=_scaled(cache), num_warps=4)
    return out


def gather_kv_reference(cache: torch.Tensor, block_tables: torch.Tensor, work: GatherWork,
                        out: torch.Tensor | None = None, scale: float = 1.0,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """The specification of `gather_kv_triton`, in PyTorch (same signature)."""
    _, page, heads, dim = cache.shape
    out = _out(cache, work, out, dtype)
    if work.num_items == 0:
        return out
    seq, src, dst, count = work.items.long()
    t = torch.arange(work.block_tokens, device=cache.device)
    valid = t[None, :] < count[:, None]
    local = (src[:, None] + t)[valid]
    rows_seq = seq[:, None].expand_as(valid)[valid]
    slots = block_tables[rows_seq, local // page] * page + local % page
    rows = cache.reshape(-1, heads, dim)[slots]
    if _scaled(cache):
        rows = rows.float() * scale
    out[(dst[:, None] + t)[valid]] = rows.to(out.dtype)
    return out
