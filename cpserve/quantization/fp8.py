"""FP8 (e4m3) in plain PyTorch: quantize and dequantize with the three kinds of weight scale.

    dequantized = fp8 value x scale          (DeepSeek's `weight_scale_inv` means the same)

    "tensor"   one scale per tensor                  scale []            or [1]
    "channel"  one per output row                    scale [N, 1]
    "block"    one per bn x bk block of [N, K]       scale [ceil(N/bn), ceil(K/bk)]

                 K ->  bk   bk   bk (last block may be short)
            N  bn  [ s00 | s01 | s02 ]
            |  bn  [ s10 | s11 | s12 ]

These are the references of the FP8 kernels (quantize_groups, block_scaled_mm_reference,
rowwise_scaled_mm_reference), and the CPU path's dequantization.

Rounding rule: every scale and every scaled value is an IEEE fp32 division (`divide`), on
every device, as the Triton kernels compute it (`tl.math.div_rn`). PyTorch on CUDA computes a
tensor divided by a Python number as x * (1 / d), which is one ulp off now and then (the H200
run of 2026-12-01: scales one ulp apart); the CPU divides.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
# A scale for an all-zero group: any positive value gives zeros; this one keeps x / scale finite.
MIN_SCALE = 1e-12


def divide(x: torch.Tensor, d: float | torch.Tensor) -> torch.Tensor:
    """x / d in fp32, correctly rounded on CPU and CUDA alike: a number divisor becomes a
    0-dim tensor on x's device (no host copy: safe in CUDA graphs), so CUDA divides too."""
    x = x.float()
    if not isinstance(d, torch.Tensor):
        d = x.new_full((), d)
    return x / d.float()


def scale_for(amax: torch.Tensor) -> torch.Tensor:
    """The scale mapping a group's largest magnitude to 448: amax / 448 (IEEE), at least
    MIN_SCALE."""
    return divide(amax, FP8_MAX).clamp(min=MIN_SCALE)


def to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3 value, saturating: casts of out-of-range values are NaN on
    some torch builds, so clamp first."""
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int],
                       block: tuple[int, int]) -> torch.Tensor:
    """A [ceil(N/bn), ceil(K/bk)] block scale as one scale per element of [N, K]."""
    rows, cols = shape
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[:rows, :cols]


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
               dtype: torch.dtype) -> torch.Tensor:
    """FP8 `weight` [N, K] times its scale (tensor, channel or block), computed in fp32."""
    wide, scale = weight.float(), scale.float()
    if block is not None:
        return (wide * expand_block_scale(scale, tuple(weight.shape), block)).to(dtype)
    if scale.numel() == 1:
        return (wide * scale.reshape(())).to(dtype)
    return (wide * scale.reshape(-1, 1)).to(dtype)


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor: (fp8 weight, scale [])."""
    scale = scale_for(weight.abs().amax())
    return to_fp8(divide(weight, scale)), scale


def quantize_channels(weight: torch.Tensor,
                      amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per output row: (fp8 weight [N, K], scale [N, 1]). `amax` [N, 1]: the rows'
    largest magnitudes, if they come from elsewhere (the whole row of a sharded weight)."""
    if amax is None:
        amax = weight.abs().amax(dim=1, keepdim=True)
    scale = scale_for(amax)
    return to_fp8(divide(weight, scale)), scale


def quantize_blocks(weight: torch.Tensor,
                    block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per block: (fp8 weight [N, K], scale [ceil(N/bn), ceil(K/bk)])."""
    rows, cols = weight.shape
    bn, bk = block
    padded = torch.zeros(-(-rows // bn) * bn, -(-cols // bk) * bk, dtype=torch.float32,
                         device=weight.device)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    scale = scale_for(blocks.abs().amax(dim=(1, 3)))
    q = to_fp8(divide(weight, expand_block_scale(scale, (rows, cols), block)))
    return q, scale


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] in 1 x `group` groups along K (the last one may be short):
    (fp8 [M, K], scale [M, ceil(K / group)]). `group = K` is one scale per row (token)."""
    rows, cols = x.shape
    groups = -(-cols // group)
    padded = torch.zeros(rows, groups * group, dtype=torch.float32, device=x.device)
    padded[:, :cols] = x.float()
    scale = scale_for(padded.view(rows, groups, group).abs().amax(-1))
    full = scale.repeat_interleave(group, 1)[:, :cols]
    return to_fp8(divide(x, full)), scale


def block_scaled_mm_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                              b_scale: torch.Tensor, block: tuple[int, int],
                              out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] FP8 with a_scale [M, ceil(K/bk)]; b [N, K] FP8 with b_scale per bn x bk block.
    Returns a @ b.T [M, N] in `out_dtype`, computed in fp32."""
    bk = block[1]
    a_wide = a.float() * a_scale.float().repeat_interleave(bk, 1)[:, : a.shape[1]]
    b_wide = b.float() * expand_block_scale(b_scale.float(), tuple(b.shape), block)
    return (a_wide @ b_wide.T).to(out_dtype)


def rowwise_scaled_mm_reference(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                                b_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] FP8, a_scale [M, 1]; b [N, K] FP8, b_scale [N]. Returns [M, N], fp32 math."""
    a_wide = a.float() * a_scale.float().reshape(-1, 1)
    b_wide = b.float() * b_scale.float().reshape(-1, 1)
    return (a_wide @ b_wide.T).to(out_dtype)
