"""Load Hugging Face safetensors checkpoints, each rank reading only its own slices."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from cpserve.config import ConfigError, ModelConfig
from cpserve.distributed.groups import ParallelGroups


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, for single-file and sharded (indexed) checkpoints."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"no model.safetensors or model.safetensors.index.json in {path}")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _reads(name: str, param: nn.Parameter) -> list[tuple[str, tuple | None, tuple]]:
    """(checkpoint tensor, slice of it to read, where in `param` it goes) for one parameter.

    A parameter is one checkpoint tensor, or the slice `param.shard = (dim, start, length)` of
    it. A parameter that stacks several tensors (a layer's experts, merged q/k/v rows) lists
    them in `param.parts = [(name relative to the parameter's module, shard, index into
    param)]`; each leading "../" in a name climbs one module, to tensors of sibling modules.
    """
    parts = getattr(param, "parts", None)
    if parts is None:
        return [(name, getattr(param, "shard", None), ())]
    return [(_relative_name(name.rpartition(".")[0], part), shard, index)
            for part, shard, index in parts]


def _relative_name(module: str, relative: str) -> str:
    """"model.layers.0.self_attn.qkv_proj" + "../q_proj.weight"
    -> "model.layers.0.self_attn.q_proj.weight"."""
    while relative.startswith("../"):
        module, relative = module.rpartition(".")[0], relative[3:]
    return f"{module}.{relative}" if module else relative


def load_weights(model: nn.Module, config: ModelConfig) -> None:
    """Fill every parameter of `model` from the checkpoint; all must be found."""
    files = checkpoint_files(Path(config.path))
    by_file: dict[Path, list[tuple[str, tuple | None, torch.Tensor]]] = {}
    for param_name, param in model.named_parameters():
        for name, shard, index in _reads(param_name, param):
            if name not in files:
                raise ConfigError(f"checkpoint {config.path} has no tensor {name!r}")
            by_file.setdefault(files[name], []).append((name, shard, param[index]))
    for file, reads in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            for name, shard, target in reads:
                tensor_slice = f.get_slice(name)
                if shard is None:
                    loaded = tensor_slice[:]
                else:
                    dim, start, length = shard
                    index = [slice(None)] * len(tensor_slice.get_shape())
                    index[dim] = slice(start, start + length)
                    loaded = tensor_slice[tuple(index)]
                if tuple(loaded.shape) != tuple(target.shape):
                    raise ConfigError(f"tensor {name!r}: checkpoint slice {tuple(loaded.shape)} "
                                      f"does not fit parameter {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(loaded.to(target.dtype))


def build_model(config: ModelConfig, groups: ParallelGroups, device: torch.device,
                load_format: str = "auto", seed: int = 0, model_cls: type | None = None
                ) -> nn.Module:
    """The model of `config` on `device`, this rank's slices loaded from the checkpoint; or,
    with load format "dummy", random weights made directly on the device (benchmarks: speed
    does not depend on the values, and an 8B model needs no 16 GB of files). `model_cls`
    builds another module of the checkpoint than the architecture's (the MTP drafter)."""
    from cpserve.models.registry import model_class

    make = model_cls or model_class(config.architecture)
    if load_format != "dummy":
        model = make(config, groups)
        load_weights(model, config)
        return model.to(device).eval()
    with torch.device(device):
        model = make(config, groups)
    # Seeded by TP rank: PCP ranks hold the same weights, as with a checkpoint.
    gen = torch.Generator(device=device).manual_seed(seed + groups.tp_rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.eval()
