"""Rotary position embeddings with the scaling types of Hugging Face configs.

Positions are explicit per token, never assumed to be 0..T-1: under PCP a rank holds the
head and the tail of a prompt, and a chunk continues at its request's position.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def inverse_frequencies(rope: dict[str, Any], rotary_dim: int,
                        max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Per-pair rotation frequencies and the factor applied to cos/sin (YaRN's mscale)."""
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float()
                                / rotary_dim))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rope["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if kind == "yarn":
        return _yarn(rope, base, rotary_dim, max_position_embeddings)
    raise ValueError(f"rope_scaling type {kind!r} is not supported "
                     "(supported: default, linear, llama3, yarn)")


def _llama3(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: dict[str, Any], base: float, dim: int,
          max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; scale attention."""
    original = rope.get("original_max_position_embeddings") or max_position_embeddings
    factor = rope.get("factor") or max_position_embeddings / original
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original (extrapolate), 0: divide by factor (interpolate)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


class StepPositions:
    """The positions of a forward pass's tokens, and the cos/sin of rotary embeddings there.

    The layers of a model share one RotaryEmbedding: the first layer to ask computes its
    cos/sin, the others reuse them (a decode step would otherwise spend a dozen small kernels
    a layer on the same tables). A new StepPositions is made for every forward pass, so
    nothing carries over from one step to the next, nor past a CUDA graph capture.
    """

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions
        self._tables: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, rotary: RotaryEmbedding,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(rotary), dtype)
        if key not in self._tables:
            self._tables[key] = rotary.cos_sin(self.positions, dtype)
        return self._tables[key]


class RotaryEmbedding(nn.Module):
    """Applies rotate-half RoPE to q and k at given positions."""

    def __init__(self, rope: dict[str, Any], head_dim: int, max_position_embeddings: int,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        inv_freq, self.attention_factor = inverse_frequencies(rope, self.rotary_dim,
                                                              max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float().unsqueeze(0)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.attention_factor).to(dtype)
        sin = (emb.sin() * self.attention_factor).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)  # [T, 1, rotary_dim], broadcast over heads

    def forward(self, positions: StepPositions, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = positions.cos_sin(self, q.dtype)
        return (apply_rope(q, cos, sin, self.rotary_dim, False),
                apply_rope(k, cos, sin, self.rotary_dim, False))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
               interleaved: bool) -> torch.Tensor:
    """RoPE of x [T, H, D]: one Triton kernel on CUDA (kernels/rope.py), else the reference."""
    half = rotary_dim // 2
    if x.is_cuda and x.dim() == 3 and x.stride(-1) == 1 and half & (half - 1) == 0:
        from cpserve.models.kernels.rope import rope_triton  # needs Triton

        return rope_triton(x, cos, sin, rotary_dim, interleaved)
    return rope_reference(x, cos, sin, rotary_dim, interleaved)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                   interleaved: bool) -> torch.Tensor:
    """Rotate-half RoPE of the first `rotary_dim` channels in x's dtype (transformers'
    rounding); `interleaved`: DeepSeek's pairs (2i, 2i+1), in fp32, output as [all firsts,
    all seconds] (q and k get the same permutation). cos / sin: [T, 1, rotary_dim], each angle
    twice."""
    if not interleaved:
        return _rotate(x, cos, sin, rotary_dim)
    half = rotary_dim // 2
    cos, sin = cos[..., :half].float(), sin[..., :half].float()
    even, odd = x[..., 0:rotary_dim:2].float(), x[..., 1:rotary_dim:2].float()
    rotated = torch.cat([even * cos - odd * sin, odd * cos + even * sin], -1).to(x.dtype)
    return torch.cat([rotated, x[..., rotary_dim:]], -1) if x.shape[-1] > rotary_dim else rotated


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos + rotated_half * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
