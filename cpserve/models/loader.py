"""Load Hugging Face safetensors checkpoints, each rank reading only its own slices.

Every parameter must be found in the checkpoint (a missing tensor is an error naming it);
checkpoint tensors that no rank used are listed in a warning, since a name the model does not
know usually means a format it does not understand. FP8 checkpoints: see
`cpserve.quantization.weights` (FP8 linear layers, or weights dequantized as they are read).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from cpserve.config import ConfigError, ModelConfig
from cpserve.distributed.groups import ParallelGroups
from cpserve.models.checkpoint import (
    TensorInfo,
    checkpoint_files,
    checkpoint_index,
    parameter_reads,
)
from cpserve.quantization.fp8 import FP8
from cpserve.quantization.kv_cache import is_kv_scale_name
from cpserve.quantization.weights import dequantized_slice, finish_fp8_layers, prepare_fp8_layers

__all__ = ["build_model", "checkpoint_files", "load_weights"]

logger = logging.getLogger(__name__)
# Tensors some checkpoints carry that no model computes with.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
UNUSED_SHOWN = 8


def _fit(loaded: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """`loaded` in the parameter's shape; only size-1 dims may differ (a scalar scale stored
    as [1], a per-row scale as [N] or [N, 1])."""
    if loaded.shape == shape:
        return loaded
    if [d for d in loaded.shape if d != 1] == [d for d in shape if d != 1]:
        return loaded.reshape(shape)
    raise ConfigError(f"tensor {name!r}: checkpoint slice {tuple(loaded.shape)} does not fit "
                      f"parameter {tuple(shape)}")


def _check_source_dtype(name: str, source, target: torch.dtype) -> None:
    """Refuse what a cast would silently turn into garbage: packed integers (GPTQ, AWQ, ...),
    FP8 kinds other than e4m3, dtypes torch does not know."""
    if isinstance(source, str) or (source.is_floating_point != target.is_floating_point):
        raise ConfigError(f"checkpoint tensor {name!r} is {source}, the model needs "
                          f"{target}: a quantized format cpserve does not read")
    if source.itemsize == 1 and source.is_floating_point and source != FP8:
        raise ConfigError(f"checkpoint tensor {name!r} is {source}: only e4m3 FP8 "
                          "(float8_e4m3fn) weights are supported")


def load_weights(model: nn.Module, config: ModelConfig,
                 index: dict[str, TensorInfo] | None = None) -> set[str]:
    """Fill every parameter of `model` from the checkpoint; all must be found. Returns the
    checkpoint tensors read (scales of dequantized FP8 weights included)."""
    index = checkpoint_index(config.path) if index is None else index
    quant = getattr(config, "quant_config", None)
    used: set[str] = set()
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def read(name: str, shard: tuple | None) -> torch.Tensor:
            file = index[name].file
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt",
                                                              device="cpu"))
            if shard is None:
                return handles[file].get_tensor(name)
            tensor_slice = handles[file].get_slice(name)
            dim, start, length = shard
            where = [slice(None)] * len(tensor_slice.get_shape())
            where[dim] = slice(start, start + length)
            return tensor_slice[tuple(where)]

        for param_name, param in model.named_parameters():
            for name, shard, where in parameter_reads(param_name, param):
                if name not in index:
                    raise ConfigError(f"checkpoint {config.path} has no tensor {name!r}")
                target = param[where]
                _check_source_dtype(name, index[name].dtype, target.dtype)
                if index[name].dtype == FP8 and target.dtype != FP8:
                    loaded, scale_name = dequantized_slice(read, name, shard, index, quant,
                                                           target.dtype)
                    used.add(scale_name)
                else:
                    loaded = read(name, shard)
                with torch.no_grad():
                    target.copy_(_fit(loaded, target.shape, name).to(target.dtype))
                used.add(name)
    return used


def warn_unused(index: dict[str, TensorInfo], used: set[str], groups: ParallelGroups) -> None:
    """On the driver, list the checkpoint tensors no rank read (ranks read different slices,
    and may read different tensors, so their sets are joined first)."""
    names = sorted(index)
    read = torch.tensor([name in used for name in names], dtype=torch.uint8)
    if groups.cpu_group is not None:
        dist.all_reduce(read, dist.ReduceOp.MAX, group=groups.cpu_group)
    unused = [name for name, hit in zip(names, read.tolist())
              if not hit and not name.endswith(IGNORED_SUFFIXES) and not is_kv_scale_name(name)]
    if unused and groups.is_driver:
        shown = ", ".join(unused[:UNUSED_SHOWN]) + (", ..." if len(unused) > UNUSED_SHOWN else "")
        logger.warning("%d checkpoint tensor(s) were not used by the model: %s", len(unused),
                       shown)


def build_model(config: ModelConfig, groups: ParallelGroups, device: torch.device,
                load_format: str = "auto", seed: int = 0, model_cls: type | None = None
                ) -> nn.Module:
    """The model of `config` on `device`, this rank's slices loaded from the checkpoint; or,
    with load format "dummy", random weights made directly on the device (benchmarks: speed
    does not depend on the values, and an 8B model needs no 16 GB of files). Dummy weights of
    a quantized model are quantized on the device, as `--quantization fp8` does at load.
    `model_cls` builds another module of the checkpoint than the architecture's (the MTP
    drafter), quantized the same way."""
    from cpserve.models.registry import model_class

    make = model_cls or model_class(config.architecture)
    quant = config.quant_config
    if load_format != "dummy":
        model = make(config, groups)
        index = checkpoint_index(config.path)
        prepare_fp8_layers(model, quant, index)
        used = load_weights(model, config, index)
        if model_cls is None:  # a part of the checkpoint (MTP) reads few of its tensors
            warn_unused(index, used, groups)
        model = model.to(device)
        if quant is not None:
            finish_fp8_layers(model, quant, device, quant.online, groups.tp_group)
        return model.eval()
    with torch.device(device):
        model = make(config, groups)
    # Seeded by TP rank: PCP ranks hold the same weights, as with a checkpoint.
    gen = torch.Generator(device=device).manual_seed(seed + groups.tp_rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:  # drawn in bf16 whatever the dtype: an fp32 run holds the same values
                param.copy_(torch.empty(param.shape, dtype=torch.bfloat16, device=param.device)
                            .normal_(0.0, 0.02, generator=gen))
    if quant is not None:
        finish_fp8_layers(model, quant, device, True, groups.tp_group)
    return model.eval()
