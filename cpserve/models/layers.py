"""Building blocks with tensor-parallel sharding.

Each parameter records which slice of the checkpoint's full tensor this rank holds
(`param.shard = (dim, start, length)`, or None for the whole tensor), so the loader reads only
that slice from safetensors.

Linear layers compute through their `method` (see `LinearBase`): `F.linear` unless the
quantization package gives them an FP8 weight, its scales and the kernels that use them.

    ReplicatedLinear       y = x @ W.T                                      (the whole layer)
    ColumnParallelLinear   y[:, cols of rank]  = x @ W[cols of rank].T       (no communication)
    MergedColumnParallelLinear  several column-parallel linears of one input as one GEMM
    RowParallelLinear      y = all_reduce_tp( x[:, rows of rank] @ W[:, rows of rank].T )
    VocabParallelEmbedding e = all_reduce_tp( rows of the vocab this rank holds, 0 elsewhere )
    ParallelLMHead         logits = all_gather_tp( h @ W[vocab of rank].T )
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cpserve.distributed.groups import Group, ParallelGroups, all_gather, all_reduce
from cpserve.quantization.linear import UNQUANTIZED


def sharded_parameter(shape: tuple[int, ...], dtype: torch.dtype, shard=None) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.shard = shard
    return param


class RMSNorm(nn.Module):
    """In fp32, cast back before the weight: the same rounding as transformers. On CUDA one
    Triton kernel (kernels/rms_norm.py), with the residual add when `add_and_norm`."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = sharded_parameter((size,), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, None)[0]

    def add_and_norm(self, x: torch.Tensor,
                     residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream's add and the next norm."""
        return self._norm(x, residual)

    def _norm(self, x, residual):
        kernel_shape = x.dim() == 2 or (x.dim() == 3 and residual is None)
        if x.is_cuda and kernel_shape and x.stride(-1) == 1:
            from cpserve.models.kernels.rms_norm import rms_norm_triton  # needs Triton

            return rms_norm_triton(x, self.weight, self.eps, residual)
        return rms_norm_reference(x, self.weight, self.eps, residual)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, s): s = x + residual (x alone without one), y its RMSNorm; None for s without a
    residual. Reference of kernels/rms_norm.py."""
    s = x if residual is None else x + residual
    wide = s.float()
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(s.dtype), (None if residual is None else s)


class LinearBase(nn.Module):
    """`weight` [out_local, in_local]: this rank's slice of a linear layer, applied by
    `method` (`method.apply(layer, x, bias)`). Unquantized, that is `F.linear`; FP8 layers
    hold an FP8 weight and its scales, installed by `cpserve.quantization` at load.
    A layer whose weight the model reads directly (not through `method`) sets
    `quantizable = False` and keeps it in the compute dtype."""

    quantizable = True

    def __init__(self, out_local: int, in_local: int, dtype: torch.dtype, shard=None) -> None:
        super().__init__()
        self.params_dtype = dtype
        self.weight = sharded_parameter((out_local, in_local), dtype, shard)
        self.bias = None
        self.method = UNQUANTIZED


class ReplicatedLinear(LinearBase):
    """The whole linear layer on every rank."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype,
                 bias: bool = False) -> None:
        super().__init__(out_features, in_features, dtype)
        self.bias = sharded_parameter((out_features,), dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features `[start, start + out_local)` of a linear layer.

    `start` defaults to this rank's even share; attention passes its own (for example the
    KV heads a rank shares with others when tp > num_kv_heads).
    """

    def __init__(self, in_features: int, out_local: int, start: int, dtype: torch.dtype,
                 bias: bool = False) -> None:
        super().__init__(out_local, in_features, dtype, (0, start, out_local))
        self.bias = sharded_parameter((out_local,), dtype, (0, start, out_local)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class MergedColumnParallelLinear(LinearBase):
    """Column-parallel linears that read the same input (q, k, v; gate, up), run as one GEMM.

    The checkpoint keeps them apart, as modules beside this one; this rank's rows of each are
    stacked in one weight, and the output is split back:

        outputs = [("q_proj", rows_q, start_q), ("k_proj", rows_k, start_k), ...]
        weight  = [ q_proj.weight[start_q : start_q + rows_q]    rows 0 .. rows_q
                    k_proj.weight[start_k : start_k + rows_k]    next rows_k rows
                    ... ]
        forward(x) -> (x @ weight.T).split([rows_q, rows_k, ...])

    One GEMM in place of several: decode, a few tokens against all the weights, pays per
    kernel launch, and the small k/v projections alone reach less of the memory bandwidth.
    """

    def __init__(self, in_features: int, outputs: list[tuple[str, int, int]],
                 dtype: torch.dtype, bias: bool = False) -> None:
        sizes = [rows for _, rows, _ in outputs]
        super().__init__(sum(sizes), in_features, dtype)
        self.sizes = sizes
        self.weight.parts = _stacked_parts(outputs, "weight")
        if bias:
            self.bias = sharded_parameter((sum(self.sizes),), dtype)
            self.bias.parts = _stacked_parts(outputs, "bias")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.method.apply(self, x, self.bias).split(self.sizes, dim=-1)


def _stacked_parts(outputs: list[tuple[str, int, int]], kind: str) -> list[tuple]:
    """The loader's `parts` (see loader.py): rows `[start, start + rows)` of the sibling
    module's tensor (`../name.kind`) go to the next `rows` rows of the stacked parameter."""
    parts, offset = [], 0
    for name, rows, start in outputs:
        parts.append((f"../{name}.{kind}", (0, start, rows), (slice(offset, offset + rows),)))
        offset += rows
    return parts


class RowParallelLinear(LinearBase):
    """Input features `[rank * in_local, (rank + 1) * in_local)`; partial sums all-reduced.
    A bias, where a model has one, is the model's to add once after the reduction."""

    def __init__(self, in_local: int, out_features: int, tp_rank: int, tp_group: Group,
                 dtype: torch.dtype) -> None:
        super().__init__(out_features, in_local, dtype, (1, tp_rank * in_local, in_local))
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.method.apply(self, x, None), self.tp_group)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), sharded over TP by intermediate rows; gate and up run as
    one GEMM. `reduce=False` leaves the partial sums to the caller (a MoE layer reduces its
    shared and routed experts together)."""

    def __init__(self, hidden: int, intermediate: int, groups: ParallelGroups,
                 dtype: torch.dtype, reduce: bool = True) -> None:
        super().__init__()
        local = intermediate // groups.tp
        start = groups.tp_rank * local
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [("gate_proj", local, start), ("up_proj", local, start)], dtype)
        self.down_proj = RowParallelLinear(local, hidden, groups.tp_rank,
                                           groups.tp_group if reduce else None, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def vocab_range(vocab_size: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """The vocabulary rows a rank holds: equal shares, the last one shorter if uneven."""
    per_rank = -(-vocab_size // tp)
    start = min(tp_rank * per_rank, vocab_size)
    return start, min(start + per_rank, vocab_size)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: int, tp_rank: int, tp_group: Group,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.start, self.end = vocab_range(vocab_size, tp, tp_rank)
        rows = self.end - self.start
        self.weight = sharded_parameter((rows, hidden), dtype, (0, self.start, rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.embedding(token_ids, self.weight)
        mine = (token_ids >= self.start) & (token_ids < self.end)
        local_ids = torch.where(mine, token_ids - self.start, torch.zeros_like(token_ids))
        out = F.embedding(local_ids, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out, self.tp_group)


class ParallelLMHead(nn.Module):
    """Vocab-parallel output layer; may share its weight with the embedding (tied)."""

    def __init__(self, vocab_size: int, hidden: int, tp: int, tp_rank: int, tp_group: Group,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.vocab_size = vocab_size
        self.start, self.end = vocab_range(vocab_size, tp, tp_rank)
        per_rank = -(-vocab_size // tp)
        rows = self.end - self.start
        self.weight = sharded_parameter((rows, hidden), dtype, (0, self.start, rows))
        self.pad = per_rank - rows  # so every rank contributes the same width to the gather

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp_group is None:
            return logits
        if self.pad:
            logits = F.pad(logits, (0, self.pad))
        return all_gather(logits, self.tp_group, dim=-1)[..., : self.vocab_size]
