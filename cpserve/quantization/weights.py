"""FP8 weights of a model: which linear layers hold them, the scale parameters beside them
and the slice of each checkpoint scale a rank reads, and what they become after loading.

    prepare_fp8_layers   before loading: a linear layer whose checkpoint weights are FP8 gets
                         an FP8 weight and scale parameters (`parts`: which checkpoint tensors)
    (loader)             fills every parameter; an FP8 tensor read into a parameter of the
                         compute dtype (MoE experts, MLA's absorbed kv_b_proj, anything that
                         is no linear layer) is dequantized on the way: `dequantized_slice`
    finish_fp8_layers    weight-only: dequantize into the compute dtype; W8A8: keep FP8 with
                         the scales laid out for the kernels; online (a bf16 checkpoint with
                         --quantization fp8, or dummy weights): quantize now

Scale slices follow the weight slice of a tensor-parallel rank:

    "block" bn x bk, weight rows [s, s + n)   ->  scale rows [s / bn, ceil((s + n) / bn))
          (columns likewise): the slice must start on a block boundary and end on one or at
          the tensor's end, so that no block is split between ranks
    "channel" [N, 1]: rows [s, s + n); a column slice (row-parallel layers) reads every row
    "tensor": the one scalar of each tensor (a merged layer holds one per stacked tensor)
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from cpserve.config import ConfigError
from cpserve.models.checkpoint import TensorInfo, parameter_reads
from cpserve.models.layers import LinearBase, sharded_parameter
from cpserve.quantization.config import QuantizationConfig
from cpserve.quantization.fp8 import (
    FP8,
    dequantize,
    quantize_blocks,
    quantize_channels,
    quantize_tensor,
)
from cpserve.quantization.linear import (
    UNQUANTIZED,
    Fp8LinearMethod,
    fp8_compute,
    kernels_for,
)

logger = logging.getLogger(__name__)

# torch._scaled_mm needs K and N multiples of 16; other layers run weight-only.
SCALED_MM_MULTIPLE = 16


def scale_name_of(weight_name: str, quant: QuantizationConfig, kind: str | None = None) -> str:
    """"...q_proj.weight" -> "...q_proj.weight_scale_inv" (or `kind`, e.g. "input_scale")."""
    if not weight_name.endswith("weight"):
        raise ConfigError(f"checkpoint tensor {weight_name!r} is FP8, but only weights of "
                          "linear layers can be")
    return weight_name[: -len("weight")] + (kind or quant.scale_name)


def _check_scale_shape(name: str, scale: str, weight: TensorInfo, info: TensorInfo,
                       quant: QuantizationConfig) -> None:
    rows, cols = weight.shape
    if quant.weights == "block":
        bn, bk = quant.block
        want = (-(-rows // bn), -(-cols // bk))
        ok = info.shape == want
    elif quant.weights == "channel":
        want = (rows, 1)
        ok = info.shape in ((rows, 1), (rows,))
    else:
        want = (1,)
        ok = int(torch.Size(info.shape).numel()) == 1
    if not ok:
        raise ConfigError(f"checkpoint tensor {scale!r} has shape {list(info.shape)}; FP8 "
                          f"weight {name!r} {list(weight.shape)} with {quant.weights} scales "
                          f"needs {list(want)}")


def _whole_blocks(name: str, dim: int, start: int, length: int, full: int,
                  block: int) -> tuple[int, int]:
    """(first block, number of blocks) of the slice [start, start + length) of `dim`."""
    end = start + length
    if start % block or (end % block and end != full):
        raise ConfigError(
            f"FP8 weight {name!r}: this rank's slice [{start}, {end}) of dim {dim} (size {full}) "
            f"does not cover whole {block}-wide scale blocks; every tensor-parallel shard of a "
            f"block-quantized weight must start and end on a multiple of {block} (choose a "
            "tensor_parallel_size that splits it so)")
    return start // block, -(-end // block) - start // block


def scale_slice(name: str, shard: tuple | None, weight_shape: tuple[int, ...],
                quant: QuantizationConfig) -> tuple | None:
    """The slice of `name`'s scale that goes with the weight slice `shard` (module docstring)."""
    if shard is None or quant.weights == "tensor":
        return None
    dim, start, length = shard
    if quant.weights == "channel":
        return (0, start, length) if dim == 0 else None
    first, count = _whole_blocks(name, dim, start, length, weight_shape[dim], quant.block[dim])
    return dim, first, count


def scale_info(name: str, index: dict[str, TensorInfo], quant: QuantizationConfig | None,
               kind: str | None = None) -> tuple[str, TensorInfo]:
    """(name, info) of the scale of FP8 weight `name`, checked against the weight's shape."""
    if quant is None:
        raise ConfigError(f"checkpoint tensor {name!r} is FP8, but config.json has no "
                          "quantization_config saying how it is scaled")
    scale = scale_name_of(name, quant, kind)
    if scale not in index:
        raise ConfigError(f"FP8 weight {name!r} has no {scale!r} in the checkpoint "
                          f"({quant.method}, {quant.weights} scales)")
    if kind is None:
        _check_scale_shape(name, scale, index[name], index[scale], quant)
    return scale, index[scale]


def dequantized_slice(read, name: str, shard: tuple | None, index: dict[str, TensorInfo],
                      quant: QuantizationConfig | None, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, str]:
    """This rank's slice of FP8 weight `name`, dequantized to `dtype`, and the name of the
    scale it used. `read(name, shard)` reads a checkpoint slice."""
    scale_name, _ = scale_info(name, index, quant)
    weight = read(name, shard)
    if weight.dim() != 2:
        raise ConfigError(f"FP8 checkpoint tensor {name!r} has {weight.dim()} dims; only 2-D "
                          "weights are supported")
    scale = read(scale_name, scale_slice(name, shard, index[name].shape, quant))
    return dequantize(weight, scale, quant.block, dtype), scale_name


# Before loading ------------------------------------------------------------------------------
def prepare_fp8_layers(model: nn.Module, quant: QuantizationConfig | None,
                       index: dict[str, TensorInfo]) -> None:
    """FP8 weight and scale parameters for every quantizable linear layer whose checkpoint
    weights are FP8 (the others keep their dtype; FP8 tensors they read are dequantized).

    A merged layer (one GEMM for several checkpoint tensors, e.g. MLA's q_a_proj and
    kv_a_proj_with_mqa) whose tensors are FP8 and not all of them stays in the compute dtype,
    its FP8 parts dequantized as they are read: correct, without FP8's savings for it."""
    mixed = []
    for prefix, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            continue
        reads = parameter_reads(f"{prefix}.weight", layer.weight)
        dtypes = {name: index[name].dtype for name, _, _ in reads if name in index}
        if FP8 not in dtypes.values():
            continue
        for name, dtype in dtypes.items():  # every FP8 tensor's scale present, of the right shape
            if dtype == FP8:
                scale_info(name, index, quant)
        if len(set(dtypes.values())) > 1:
            mixed.append(prefix)
        elif layer.quantizable:
            _make_fp8_parameters(layer, quant, index, reads)
    if mixed:
        logger.warning("%d merged layer(s) stack FP8 and non-FP8 checkpoint tensors and run in "
                       "the compute dtype (their FP8 weights dequantized at load): %s",
                       len(mixed), ", ".join(mixed[:4]) + (", ..." if len(mixed) > 4 else ""))


def _relative_parts(param: nn.Parameter) -> list[tuple[str, tuple | None, tuple]]:
    """A parameter's `parts`, or its one (own name, shard, whole) part."""
    parts = getattr(param, "parts", None)
    return list(parts) if parts is not None else [("weight", getattr(param, "shard", None), ())]


def _make_fp8_parameters(layer: LinearBase, quant: QuantizationConfig,
                         index: dict[str, TensorInfo], reads: list) -> None:
    old = layer.weight
    layer.weight = sharded_parameter(tuple(old.shape), FP8, getattr(old, "shard", None))
    parts = _relative_parts(old)
    if getattr(old, "parts", None) is not None:
        layer.weight.parts = old.parts
    rows = old.shape[0]
    # Rows of the merged weight each stacked tensor fills (tensor scales are expanded by them).
    layer.fp8_part_rows = [(w[0].stop - w[0].start) if w else rows for _, _, w in parts]
    scale_parts = []
    for i, ((rel, shard, where), (name, _, _)) in enumerate(zip(parts, reads)):
        rel_scale = rel[: -len("weight")] + quant.scale_name
        if quant.weights == "tensor":
            scale_parts.append((rel_scale, None, (i,)))
            continue
        sliced = scale_slice(name, shard, index[name].shape, quant)
        if quant.weights == "block" and where:
            bn = quant.block[0]
            lo, hi = where[0].start, where[0].stop
            if lo % bn:
                raise ConfigError(f"{name!r} starts at row {lo} of its merged layer, inside a "
                                  f"{bn}-row scale block: the stacked tensors must each be "
                                  f"whole blocks ({layer.fp8_part_rows} rows here)")
            where = (slice(lo // bn, -(-hi // bn)),)
        scale_parts.append((rel_scale, sliced, where))
    if quant.weights == "block":
        bn, bk = quant.block
        shape = (-(-rows // bn), -(-old.shape[1] // bk))
    elif quant.weights == "channel":
        shape = (rows, 1)
    else:
        shape = (len(parts),)
    scale = sharded_parameter(shape, torch.float32)
    scale.parts = scale_parts
    setattr(layer, quant.scale_name, scale)
    if quant.activations == "static":
        for name, _, _ in reads:
            scale_info(name, index, quant, "input_scale")
        layer.input_scale = sharded_parameter((len(parts),), torch.float32)
        layer.input_scale.parts = [(rel[: -len("weight")] + "input_scale", None, (i,))
                                   for i, (rel, _, _) in enumerate(parts)]


# After loading -------------------------------------------------------------------------------
def finish_fp8_layers(model: nn.Module, quant: QuantizationConfig, device: torch.device,
                      online: bool, tp_group=None) -> None:
    """Turn loaded (or, `online`, freshly quantized) FP8 weights into what runs: dequantized
    weights (weight-only) or FP8 weights with kernel-ready scales (W8A8). `tp_group`: the
    ranks that share the rows of row-parallel layers (online per-channel scales)."""
    compute = "weight-only" if quant.activations == "none" else fp8_compute(device)
    method = Fp8LinearMethod(quant.block, kernels_for(device))
    for layer in model.modules():
        if not isinstance(layer, LinearBase) or not layer.quantizable:
            continue
        if layer.weight.dtype == FP8:
            weight, scale, input_scale = _loaded(layer, quant)
        elif online:
            weight, scale = _quantize(layer, quant, tp_group)
            input_scale = None  # no calibration data: activations are scaled per token
        else:
            continue  # left unquantized by the checkpoint
        n, k = weight.shape
        runs_w8a8 = compute == "w8a8" and (quant.block is not None or (
            n % SCALED_MM_MULTIPLE == 0 and k % SCALED_MM_MULTIPLE == 0))
        if runs_w8a8:
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer.weight_scale = nn.Parameter(scale.float().contiguous(), requires_grad=False)
            if input_scale is not None:
                layer.input_scale = nn.Parameter(input_scale, requires_grad=False)
            layer.method = method
        else:
            layer.weight = nn.Parameter(dequantize(weight, scale, quant.block,
                                                   layer.params_dtype), requires_grad=False)
            layer.method = UNQUANTIZED


def _loaded(layer: LinearBase, quant: QuantizationConfig):
    """(FP8 weight, scale as the kernels take it, static input scale or None); the loading
    parameters are removed from the layer."""
    weight = layer.weight.data
    scale = getattr(layer, quant.scale_name).data
    delattr(layer, quant.scale_name)
    if quant.weights == "channel":
        scale = scale.reshape(-1)
    elif quant.weights == "tensor":  # one per stacked tensor, repeated over its rows
        rows = torch.tensor(layer.fp8_part_rows, device=scale.device)
        scale = scale.float().repeat_interleave(rows)
    input_scale = None
    if quant.activations == "static":
        # The stacked tensors share one input: the largest scale covers all of them.
        input_scale = layer.input_scale.data.float().max()
        del layer.input_scale
    return weight, scale, input_scale


def _quantize(layer: LinearBase, quant: QuantizationConfig, tp_group):
    weight = layer.weight.data
    if quant.weights == "block":  # a shard holds whole blocks: its scales are the blocks'
        return quantize_blocks(weight, quant.block)
    if quant.weights == "channel":
        # A row-parallel rank holds a slice of every row (dim 1 sharded): the row's scale is
        # the largest over the TP group, as one process would compute it, so every layout
        # quantizes the same way.
        amax = weight.abs().amax(dim=1, keepdim=True).float()
        shard = getattr(layer.weight, "shard", None)
        if shard is not None and shard[0] == 1:
            all_reduce_max(amax, tp_group)
        q, scale = quantize_channels(weight, amax)
        return q, scale.reshape(-1)
    q, scale = quantize_tensor(weight)
    return q, scale.expand(weight.shape[0]).clone()


def all_reduce_max(tensor: torch.Tensor, group) -> None:
    if group is not None:
        torch.distributed.all_reduce(tensor, torch.distributed.ReduceOp.MAX, group=group)
