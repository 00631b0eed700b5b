"""The FP8 KV cache (`--kv-cache-dtype fp8`): e4m3 values with one scale per layer for K and
one for V, so a token takes half the bytes of bf16 and the cache holds twice the tokens.

    cache[slot] = e4m3(k / k_scale)            read back as  cache[slot] * k_scale

Scales, in this order:
  1. the checkpoint's: `...self_attn.k_scale` / `v_scale` (also compressed-tensors'
     `k_proj.output_scale` / `v_proj.output_scale`, and the older `kv_scale` for both);
  2. measured at start-up: a prefill of a fixed random prompt into a cache of the model's
     dtype, the largest |k| and |v| of each layer over all ranks (an all-reduce MAX: each rank
     sees its own heads and its own shard of the tokens), then
         scale = 2^ceil(log2(HEADROOM * amax / 448))
     HEADROOM leaves room for K/V larger than the warm-up prompt's (beyond it values saturate
     at 448 x scale); a power of two makes x / scale exact, so every layout stores the same
     bits whatever the order its GEMMs summed in.

The attention context rounds each step's new K/V to what the cache will hold (`fake_quantize`)
before attending to them, so a token's K/V are the same numbers whether a query reads them
from the step or from the cache: results do not depend on chunking, prefix hits or layout.
MLA caches one latent vector per token, its values are the latent's first channels: one scale
for the layer, v_scale = k_scale.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from safetensors import safe_open

from cpserve.config import CacheConfig, ConfigError
from cpserve.kv.spec import KVCacheSpec
from cpserve.quantization.fp8 import FP8, FP8_MAX, divide, to_fp8

HEADROOM = 2.0
WARMUP_TOKENS = 256
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale", ".k_proj.output_scale",
                     ".v_proj.output_scale")


def is_kv_scale_name(name: str) -> bool:
    return name.endswith(KV_SCALE_SUFFIXES)


def with_cache_dtype(spec: KVCacheSpec, cache: CacheConfig) -> KVCacheSpec:
    """The model's KV layout in the cache's dtype."""
    return dataclasses.replace(spec, dtype=FP8) if cache.fp8_kv else spec


def fake_quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` as the FP8 cache gives it back: e4m3(x / scale) * scale, in x's dtype."""
    return (to_fp8(divide(x, scale)).float() * scale).to(x.dtype)


def scale_from_amax(amax: float) -> float:
    """The power of two that maps HEADROOM * amax to at most 448 (1.0 for an all-zero layer)."""
    if amax <= 0 or not math.isfinite(amax):
        return 1.0
    return 2.0 ** math.ceil(math.log2(HEADROOM * amax / FP8_MAX))


def checkpoint_kv_scales(files: dict[str, Path], num_layers: int,
                         prefix: str = "model.layers") -> list[tuple[float, float]] | None:
    """(k_scale, v_scale) of every layer from the checkpoint's tensors, or None if it has
    none; some layers with scales and others without is an error."""
    def attn(layer: int) -> str:
        return f"{prefix}.{layer}.self_attn"

    def find(layer: int, kind: str) -> str | None:
        for name in (f"{attn(layer)}.{kind}_scale", f"{attn(layer)}.{kind}_proj.output_scale",
                     f"{attn(layer)}.kv_scale"):
            if name in files:
                return name
        return None

    names = [(find(layer, "k"), find(layer, "v")) for layer in range(num_layers)]
    if all(k is None and v is None for k, v in names):
        return None
    missing = [f"{attn(layer)}.{kind}_scale" for layer, pair in enumerate(names)
               for kind, name in zip("kv", pair) if name is None]
    if missing:
        raise ConfigError(f"the checkpoint has KV-cache scales for some layers but not for "
                          f"{', '.join(missing[:4])}: cannot run --kv-cache-dtype fp8 with them")
    scales = []
    for k_name, v_name in names:
        pair = []
        for name in (k_name, v_name):
            with safe_open(files[name], framework="pt", device="cpu") as f:
                value = float(f.get_tensor(name).float().reshape(-1)[0])
            if not value > 0 or not math.isfinite(value):
                raise ConfigError(f"checkpoint KV-cache scale {name!r} = {value} must be a "
                                  "positive number")
            pair.append(value)
        scales.append((pair[0], pair[1]))
    return scales


def warmup_prompt(vocab_size: int, num_tokens: int) -> list[int]:
    """A fixed prompt of random token ids (the same on every rank and every run)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (num_tokens,), generator=gen).tolist()


def kv_amax(kv_caches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """[layers, 2] largest |k| and |v| held in each layer's cache (a latent cache: v = k)."""
    rows = []
    for k_cache, v_cache in kv_caches:
        k = k_cache.abs().amax().float()
        v = k if v_cache is None else v_cache.abs().amax().float()
        rows.append(torch.stack([k, v]))
    return torch.stack(rows).cpu()


def cache_report(spec: KVCacheSpec, model_dtype: torch.dtype, source: str) -> str:
    """The start-up line of an FP8 cache: bytes per token and what that buys."""
    fp8 = spec.bytes_per_token
    wide = dataclasses.replace(spec, dtype=model_dtype).bytes_per_token
    return (f"  KV cache dtype fp8 (e4m3), scales {source}: {fp8} bytes per token and layer "
            f"against {wide} in {str(model_dtype).removeprefix('torch.')}, "
            f"{wide / fp8:g}x the tokens in the same memory")
