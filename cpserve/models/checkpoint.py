"""What a safetensors checkpoint holds (names, dtypes, shapes, files: read from the headers
only), and which checkpoint tensors a model parameter is made of."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from cpserve.config import ConfigError

# safetensors' dtype names
_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16,
           "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype | str  # the safetensors name where torch has no such dtype
    shape: tuple[int, ...]


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


def checkpoint_index(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint with its dtype and shape (headers only, no data)."""
    path = Path(path)
    files = checkpoint_files(path)
    index: dict[str, TensorInfo] = {}
    for file in sorted(set(files.values())):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if files.get(name) != file:
                    continue
                info = f.get_slice(name)
                dtype = info.get_dtype()
                index[name] = TensorInfo(file, _DTYPES.get(dtype, dtype),
                                         tuple(info.get_shape()))
    missing = sorted(set(files) - set(index))
    if missing:
        raise ConfigError(f"checkpoint {path}: the index lists tensors its files do not hold: "
                          f"{', '.join(missing[:5])}")
    return index


def parameter_reads(name: str, param: nn.Parameter) -> list[tuple[str, tuple | None, tuple]]:
    """(checkpoint tensor, slice of it to read, where in `param` it goes) for one parameter.

    A parameter is one checkpoint tensor, or the slice `param.shard = (dim, start, length)` of
    it. A parameter that stacks several tensors (a layer's experts, merged q/k/v rows) lists
    them in `param.parts = [(name relative to the parameter's module, shard, index into
    param)]`; each leading "../" in a name climbs one module, to tensors of sibling modules.
    """
    parts = getattr(param, "parts", None)
    if parts is None:
        return [(name, getattr(param, "shard", None), ())]
    return [(relative_name(name.rpartition(".")[0], part), shard, index)
            for part, shard, index in parts]


def relative_name(module: str, relative: str) -> str:
    """"model.layers.0.self_attn.qkv_proj" + "../q_proj.weight"
    -> "model.layers.0.self_attn.q_proj.weight"."""
    while relative.startswith("../"):
        module, relative = module.rpartition(".")[0], relative[3:]
    return f"{module}.{relative}" if module else relative
