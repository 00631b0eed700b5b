"""Which quantization a model runs with, from config.json's `quantization_config` and the
`--quantization` flag. Every refusal is here, each naming the field and what is supported.

    config.json quantization_config                          weights    activations
    -------------------------------------------------------  ---------  --------------------
    {"quant_method": "fp8", "weight_block_size": [128, 128], "block"    dynamic, 1 x 128
     "activation_scheme": "dynamic"}   (DeepSeek-V3/R1)      128 x 128  groups per token
    {"quant_method": "fp8", "activation_scheme": "static"}   "tensor"   static: input_scale
    {"quant_method": "fp8", "activation_scheme": "dynamic"}  "tensor"   dynamic per token
    {"quant_method": "compressed-tensors", ...}  float 8-bit "channel",  dynamic per token,
                                                 weights     "tensor" or static per tensor,
                                                             "block"    or none (weight-only)
    none, and --quantization fp8 (online)                    "channel"  dynamic per token

Which linear layers are quantized is read from the checkpoint itself (an FP8 weight tensor
has its scales beside it), so `ignore` / `modules_to_not_convert` lists need no parsing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpserve.config import ConfigError

SUPPORTED = ("fp8", "compressed-tensors")
ASCEND_ONLY = ("ascend",)


@dataclass(frozen=True)
class QuantizationConfig:
    method: str  # "fp8" or "compressed-tensors", as the checkpoint or the flag names it
    weights: str  # "block", "channel" or "tensor": what one weight scale covers
    activations: str  # "dynamic" (per token, or per 1 x block_k group), "static", "none"
    block: tuple[int, int] | None = None  # (rows, cols) of a weight block, "block" only
    online: bool = False  # bf16 checkpoint, weights quantized at load
    scale_name: str = "weight_scale"  # checkpoint tensor beside each FP8 weight

    def describe(self) -> str:
        what = f"{self.weights} scales" if self.block is None else (
            f"{self.block[0]}x{self.block[1]} blocks")
        source = "bf16 weights quantized at load" if self.online else "checkpoint"
        return f"{self.method} ({source}): FP8 weights with {what}, {self.activations} activations"


def resolve_quantization(hf_config: dict[str, Any], flag: str | None) -> QuantizationConfig | None:
    """The quantization the engine will run, or None; raises ConfigError for anything it
    cannot honour."""
    if flag is not None and flag in ASCEND_ONLY:
        raise ConfigError(f"--quantization {flag} is vLLM-Ascend's format for Ascend NPUs; "
                          "cpserve runs on NVIDIA GPUs and CPUs (supported: fp8, "
                          "compressed-tensors)")
    if flag is not None and flag not in SUPPORTED:
        raise ConfigError(f"--quantization {flag!r} is not supported (supported: "
                          f"{', '.join(SUPPORTED)})")
    raw = hf_config.get("quantization_config")
    if raw is None:
        if flag == "fp8":
            return QuantizationConfig("fp8", "channel", "dynamic", online=True)
        if flag is not None:
            raise ConfigError(f"--quantization {flag} needs a checkpoint quantized that way; "
                              "this one's config.json has no quantization_config (use "
                              "--quantization fp8 to quantize its weights at load)")
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json quantization_config must be an object, got {raw!r}")
    method = raw.get("quant_method")
    if method not in SUPPORTED:
        raise ConfigError(f"config.json quantization_config has quant_method={method!r}, which "
                          f"cpserve does not support (supported: {', '.join(SUPPORTED)}); "
                          "loading it as plain weights would give wrong results")
    if flag is not None and flag != method:
        raise ConfigError(f"--quantization {flag} does not match the checkpoint's quant_method "
                          f"{method!r}; leave the flag out, or pass --quantization {method}")
    if method == "fp8":
        return _fp8(raw)
    return _compressed_tensors(raw)


def _fp8(raw: dict[str, Any]) -> QuantizationConfig:
    """vLLM's "fp8" checkpoints: block-wise (DeepSeek-V3/R1) or one scale per tensor."""
    scheme = raw.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ConfigError(f"quantization_config activation_scheme={scheme!r} must be 'dynamic' "
                          "or 'static'")
    fmt = raw.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config fmt={fmt!r}: only e4m3 FP8 weights are supported")
    block = raw.get("weight_block_size")
    if block is None:
        return QuantizationConfig("fp8", "tensor", scheme)
    block = _block_shape(block, "weight_block_size")
    if scheme != "dynamic":
        raise ConfigError("quantization_config: block-wise FP8 (weight_block_size) needs "
                          f"activation_scheme 'dynamic', got {scheme!r}")
    return QuantizationConfig("fp8", "block", "dynamic", block=block,
                              scale_name="weight_scale_inv")


def _block_shape(block: Any, name: str) -> tuple[int, int]:
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b >= 16 and b & (b - 1) == 0 for b in block)):
        raise ConfigError(f"quantization_config {name}={block!r} must be two powers of two "
                          ">= 16 (rows, columns), such as [128, 128]")
    return int(block[0]), int(block[1])


def _compressed_tensors(raw: dict[str, Any]) -> QuantizationConfig:
    """compressed-tensors (llm-compressor) with float 8-bit weights; one scheme for all
    groups (the checkpoint's tensors say which layers it applies to)."""
    fmt = raw.get("format", "float-quantized")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ConfigError(f"compressed-tensors format={fmt!r} is not supported (supported: "
                          "float-quantized, naive-quantized with float 8-bit weights)")
    groups = raw.get("config_groups") or {}
    if not groups:
        raise ConfigError("compressed-tensors quantization_config has no config_groups")
    schemes = {name: _ct_scheme(name, group) for name, group in groups.items()}
    first = next(iter(schemes.values()))
    if any(s != first for s in schemes.values()):
        raise ConfigError("compressed-tensors config_groups with different schemes are not "
                          f"supported: {schemes}")
    return first


def _ct_scheme(name: str, group: dict[str, Any]) -> QuantizationConfig:
    where = f"compressed-tensors config_groups.{name}"
    weights = group.get("weights") or {}
    if weights.get("num_bits") != 8 or weights.get("type") != "float":
        raise ConfigError(f"{where}.weights: num_bits={weights.get('num_bits')} "
                          f"type={weights.get('type')!r}; only float 8-bit (FP8) weights are "
                          "supported")
    if weights.get("symmetric", True) is not True or weights.get("dynamic", False):
        raise ConfigError(f"{where}.weights must be symmetric with static scales")
    strategy = weights.get("strategy")
    block = None
    if strategy == "block":
        block = _block_shape(weights.get("block_structure"), f"{where}.weights.block_structure")
    elif strategy not in ("channel", "tensor"):
        raise ConfigError(f"{where}.weights.strategy={strategy!r} is not supported (supported: "
                          "channel, tensor, block)")
    acts = group.get("input_activations")
    if acts is None:
        activations = "none"
    else:
        if acts.get("num_bits") != 8 or acts.get("type") != "float":
            raise ConfigError(f"{where}.input_activations: only float 8-bit activations are "
                              "supported")
        if acts.get("dynamic", False):
            activations = "dynamic"
        elif acts.get("strategy") == "tensor":
            activations = "static"
        else:
            raise ConfigError(f"{where}.input_activations: static scales must be per tensor, "
                              f"got strategy {acts.get('strategy')!r}")
        if block is not None and activations != "dynamic":
            raise ConfigError(f"{where}: block weights need dynamic activation groups")
    return QuantizationConfig("compressed-tensors", strategy, activations, block=block)
