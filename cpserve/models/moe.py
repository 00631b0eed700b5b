"""DeepSeek mixture of experts: routing, routed experts sharded over TP, shared experts.

Every TP rank routes every token (the router is replicated and sees the same hidden state) and
holds a slice of every expert's intermediate dimension, so no token moves between ranks:

    tp = 2, moe_intermediate_size = I           rank 0: columns [0, I/2) of every expert
                                                rank 1: columns [I/2, I) of every expert
    y = all_reduce_tp( sum_k w_k * down_e(k)[:, mine] @ (silu(gate_e(k)[mine] x) * up_e(k)[mine] x)
                       + shared_down[:, mine] @ (silu(shared_gate[mine] x) * shared_up[mine] x) )

One all-reduce serves routed and shared experts together.

The experts of a rank are two stacked tensors, `w13` [E, 2 * I_local, H] (gate rows, then up
rows) and `w2` [E, H, I_local]. Checkpoints store one tensor per expert and projection
(`experts.{e}.gate_proj.weight`, ...); the parameters' `parts` tell the loader which slice of
which checkpoint tensor goes where.

Two implementations of the expert computation share one signature: `experts_reference` (plain
PyTorch, a loop over the experts that got tokens) and `experts_grouped` (tokens sorted by expert,
two `torch._grouped_mm` calls, no host synchronisation). `experts_auto` picks the grouped one for
bf16 on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cpserve.config import ConfigError, ModelConfig
from cpserve.distributed.groups import ParallelGroups, all_reduce
from cpserve.models.layers import GatedMLP, sharded_parameter

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class RoutingConfig:
    num_experts: int
    top_k: int
    method: str  # one of TOPK_METHODS
    scoring: str  # "softmax" or "sigmoid"
    num_groups: int  # expert groups for the group-limited methods (1: no groups)
    topk_groups: int  # groups a token may use
    scaling_factor: float  # routed_scaling_factor, applied to the routing weights
    normalize: bool  # norm_topk_prob: the top-k weights of a token sum to 1 before scaling

    @staticmethod
    def from_hf(hf: dict[str, Any], architecture: str) -> RoutingConfig:
        """DeepSeek-V2 configs name their method (`greedy` by default); V3 always routes by
        `noaux_tc` (transformers' V3 config omits the field)."""
        default = "noaux_tc" if architecture == "DeepseekV3ForCausalLM" else "greedy"
        method = hf.get("topk_method") or default
        if method not in TOPK_METHODS:
            raise ConfigError(f"topk_method={method!r} is not supported (supported: "
                              f"{', '.join(TOPK_METHODS)})")
        scoring = hf.get("scoring_func") or ("sigmoid" if method == "noaux_tc" else "softmax")
        if scoring not in ("softmax", "sigmoid"):
            raise ConfigError(f"scoring_func={scoring!r} must be 'softmax' or 'sigmoid'")
        grouped = method != "greedy"
        routing = RoutingConfig(
            num_experts=int(hf["n_routed_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            method=method,
            scoring=scoring,
            num_groups=int(hf.get("n_group") or 1) if grouped else 1,
            topk_groups=int(hf.get("topk_group") or 1) if grouped else 1,
            scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
            normalize=bool(hf.get("norm_topk_prob")),
        )
        if routing.num_experts % routing.num_groups:
            raise ConfigError(f"n_group={routing.num_groups} must divide n_routed_experts="
                              f"{routing.num_experts}")
        per_group = routing.num_experts // routing.num_groups
        if routing.top_k > routing.topk_groups * per_group:
            raise ConfigError(f"num_experts_per_tok={routing.top_k} exceeds the experts of "
                              f"topk_group={routing.topk_groups} groups")
        return routing


def select_experts(router_logits: torch.Tensor, routing: RoutingConfig,
                   correction_bias: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] (fp32) and expert ids [T, k] from fp32 router logits [T, E].

    greedy                the k best scores.
    group_limited_greedy  the k best among the `topk_groups` groups with the best single score.
    noaux_tc              (V3) experts are *chosen* by score + correction bias, among the groups
                          whose two best biased scores sum highest; their *weights* are the
                          unbiased scores.
    """
    scores = router_logits.softmax(-1) if routing.scoring == "softmax" else router_logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if routing.method == "greedy":
        ids = torch.topk(choice, routing.top_k, dim=-1, sorted=False).indices
    else:
        tokens = choice.shape[0]
        grouped = choice.view(tokens, routing.num_groups, -1)
        if routing.method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
            hidden_value = float("-inf")
        else:
            group_score = grouped.max(dim=-1).values
            hidden_value = 0.0  # softmax scores are positive: masked experts lose every tie
        best_groups = torch.topk(group_score, routing.topk_groups, dim=-1, sorted=False).indices
        allowed = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)
        masked = grouped.masked_fill(~allowed.unsqueeze(-1), hidden_value).view(tokens, -1)
        ids = torch.topk(masked, routing.top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)
    if routing.normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routing.scaling_factor, ids


# The expert computation: reference and grouped GEMM, one signature --------------------------
def experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) for the slice of the experts held here.

    x [T, H], w13 [E, 2I, H], w2 [E, H, I], weights/ids [T, k]. Returns [T, H] in x's dtype.
    """
    out = torch.zeros_like(x)
    inter = w2.shape[-1]
    for expert in torch.unique(ids).tolist():
        token, slot = torch.nonzero(ids == expert, as_tuple=True)
        gate_up = F.linear(x[token], w13[expert])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, w2[expert]) * weights[token, slot].unsqueeze(1)
        out.index_add_(0, token, y.to(x.dtype))
    return out


def experts_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Same result as `experts_reference`, as two grouped GEMMs over tokens sorted by expert.

        (token, k) pairs sorted by expert:  e0 e0 e0 | e1 | e3 e3 ...   offsets = cumsum(counts)
        h = grouped_mm(x_sorted, w13^T, offsets) -> silu(gate) * up -> grouped_mm(., w2^T)
    """
    tokens, top_k = ids.shape
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // top_k
    # scatter_add, not bincount: no device-to-host sync, so decode steps can be graph-captured.
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x[token_of], w13.transpose(-2, -1), offs=offsets)
    inter = w2.shape[-1]
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offsets)
    y = y.float() * weights.reshape(-1)[order].unsqueeze(1).float()
    out = torch.zeros(tokens, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of, y)
    return out.to(x.dtype)


def grouped_gemm_available(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def experts_auto(x, w13, w2, weights, ids) -> torch.Tensor:
    if grouped_gemm_available(x):
        return experts_grouped(x, w13, w2, weights, ids)
    return experts_reference(x, w13, w2, weights, ids)


# Modules ------------------------------------------------------------------------------------
class Router(nn.Module):
    """`mlp.gate`: router weight [E, H] (replicated), and V3's `e_score_correction_bias`."""

    def __init__(self, hidden: int, routing: RoutingConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.routing = routing
        self.weight = sharded_parameter((routing.num_experts, hidden), dtype)
        # V3 checkpoints store the bias in fp32 whatever the model's dtype.
        self.e_score_correction_bias = (sharded_parameter((routing.num_experts,), torch.float32)
                                        if routing.method == "noaux_tc" else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # routing decisions in fp32
        return select_experts(logits, self.routing, self.e_score_correction_bias)


class RoutedExperts(nn.Module):
    """This rank's slice `[start, start + inter_local)` of every expert's intermediate dim."""

    def __init__(self, num_experts: int, hidden: int, inter_local: int, start: int,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.w13 = sharded_parameter((num_experts, 2 * inter_local, hidden), dtype)
        self.w2 = sharded_parameter((num_experts, hidden, inter_local), dtype)
        rows = (0, start, inter_local)
        self.w13.parts = [part for e in range(num_experts) for part in (
            (f"{e}.gate_proj.weight", rows, (e, slice(0, inter_local))),
            (f"{e}.up_proj.weight", rows, (e, slice(inter_local, 2 * inter_local))))]
        self.w2.parts = [(f"{e}.down_proj.weight", (1, start, inter_local), (e,))
                         for e in range(num_experts)]
        self.impl = experts_auto

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.impl(x, self.w13, self.w2, weights, ids)


class MoE(nn.Module):
    """A DeepSeek MoE layer (`mlp` of layers from `first_k_dense_replace` on)."""

    def __init__(self, config: ModelConfig, groups: ParallelGroups) -> None:
        super().__init__()
        hf, dtype, hidden = config.hf_config, config.dtype, config.hidden_size
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r}: only silu experts are supported")
        self.tp_group = groups.tp_group
        routing = RoutingConfig.from_hf(hf, config.architecture)
        inter = int(hf["moe_intermediate_size"])
        local = inter // groups.tp
        self.gate = Router(hidden, routing, dtype)
        self.experts = RoutedExperts(routing.num_experts, hidden, local, groups.tp_rank * local,
                                     dtype)
        shared = int(hf.get("n_shared_experts") or 0)
        # The always-on experts: a gated MLP whose partial sums are reduced with the routed ones.
        self.shared_experts = (GatedMLP(hidden, inter * shared, groups, dtype, reduce=False)
                               if shared else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return all_reduce(out, self.tp_group)
