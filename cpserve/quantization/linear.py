"""How a linear layer computes `x @ W.T + b`: its `method` (models/layers.py `LinearBase`).

    UNQUANTIZED     F.linear on a weight in the compute dtype (also what FP8 weights become on
                    the weight-only path: dequantized at load)
    Fp8LinearMethod W8A8: the layer holds
                      weight        FP8 [N, K]
                      weight_scale  fp32 [N] (one per output row) or [N/bn, K/bk] (blocks)
                      input_scale   fp32 [] for static activations, else absent
                    activations are quantized per token (row-wise scales, torch._scaled_mm) or
                    in 1 x bk groups (block weights, the Triton block-scaled GEMM)

Where each runs (`fp8_compute`): W8A8 on CUDA, weight-only on CPU, where FP8 GEMMs would only
be emulated; CPSERVE_FP8_COMPUTE=w8a8 or weight-only overrides it (tests run W8A8 on CPU with
the reference kernels). CPSERVE_FP8_KERNELS=reference runs the PyTorch references on CUDA too
(the GPU tests compare the two).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cpserve.config import ConfigError
from cpserve.quantization.fp8 import (
    block_scaled_mm_reference,
    divide,
    quantize_groups,
    rowwise_scaled_mm_reference,
    to_fp8,
)

COMPUTE_MODES = ("auto", "w8a8", "weight-only")


class UnquantizedLinearMethod:
    name = "unquantized"

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


UNQUANTIZED = UnquantizedLinearMethod()


@dataclass(frozen=True)
class Fp8Kernels:
    """The three operations of W8A8, with the signatures of their references."""

    quantize_groups: Callable  # (x [M, K], group) -> (FP8 [M, K], scale [M, ceil(K/group)])
    block_mm: Callable  # (a, a_scale, b, b_scale, block, out_dtype) -> [M, N]
    rowwise_mm: Callable  # (a, a_scale [M, 1], b [N, K], b_scale [N], out_dtype) -> [M, N]


REFERENCE_KERNELS = Fp8Kernels(quantize_groups, block_scaled_mm_reference,
                               rowwise_scaled_mm_reference)


def kernels_for(device: torch.device) -> Fp8Kernels:
    """Triton and cuBLASLt on CUDA; the PyTorch references elsewhere, or when
    CPSERVE_FP8_KERNELS=reference asks for them."""
    choice = os.environ.get("CPSERVE_FP8_KERNELS", "auto")
    if choice not in ("auto", "reference"):
        raise ConfigError(f"CPSERVE_FP8_KERNELS={choice!r} must be 'auto' or 'reference'")
    if device.type != "cuda" or choice == "reference":
        return REFERENCE_KERNELS
    from cpserve.quantization.kernels.block_gemm import block_scaled_mm_triton
    from cpserve.quantization.kernels.quantize import quantize_groups_triton
    from cpserve.quantization.kernels.scaled_mm import rowwise_scaled_mm

    return Fp8Kernels(quantize_groups_triton, block_scaled_mm_triton, rowwise_scaled_mm)


def fp8_compute(device: torch.device) -> str:
    """"w8a8" or "weight-only" for FP8 layers on `device` (see the module docstring)."""
    mode = os.environ.get("CPSERVE_FP8_COMPUTE", "auto")
    if mode not in COMPUTE_MODES:
        raise ConfigError(f"CPSERVE_FP8_COMPUTE={mode!r} must be one of "
                          f"{', '.join(COMPUTE_MODES)}")
    if mode == "auto":
        return "w8a8" if device.type == "cuda" else "weight-only"
    return mode


class Fp8LinearMethod:
    """W8A8 with the layer's FP8 weight and scales (see the module docstring)."""

    name = "fp8"

    def __init__(self, block: tuple[int, int] | None, kernels: Fp8Kernels) -> None:
        self.block = block
        self.kernels = kernels

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, k)
        if self.block is not None:
            xq, x_scale = self.kernels.quantize_groups(rows, self.block[1])
            y = self.kernels.block_mm(xq, x_scale, layer.weight, layer.weight_scale, self.block,
                                      x.dtype)
        else:
            input_scale = getattr(layer, "input_scale", None)
            if input_scale is None:  # dynamic: one scale per token
                xq, x_scale = self.kernels.quantize_groups(rows, k)
            else:
                xq = to_fp8(divide(rows, input_scale))
                x_scale = input_scale.reshape(1, 1).expand(rows.shape[0], 1)
            y = self.kernels.rowwise_mm(xq, x_scale, layer.weight, layer.weight_scale, x.dtype)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])
