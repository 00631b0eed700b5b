"""Mixture-of-experts layers: routing, routed experts (TP-sliced or expert-parallel), shared
experts. Serves DeepSeek-V2/V3 (grouped routing, shared experts), Qwen2-MoE (a shared expert
scaled by a sigmoid gate) and Qwen3-MoE (routed experts only).

Tensor parallel (the default). Every TP rank routes every token (the router is replicated and
sees the same hidden state) and holds a slice of every expert's intermediate dimension, so no
token moves between ranks:

    tp = 2, moe_intermediate_size = I           rank 0: columns [0, I/2) of every expert
                                                rank 1: columns [I/2, I) of every expert
    y = all_reduce_tp( sum_k w_k * down_e(k)[:, mine] @ (silu(gate_e(k)[mine] x) * up_e(k)[mine] x)
                       + shared_down[:, mine] @ (silu(shared_gate[mine] x) * shared_up[mine] x) )

One all-reduce serves routed and shared experts together.

Expert parallel (`enable_expert_parallel`). The W = tp * pcp ranks hold E / W whole experts
each, rank r (global order, pcp_rank * tp + tp_rank) experts [r * E/W, (r + 1) * E/W). TP ranks
of one PCP rank hold the same tokens; PCP ranks hold different ones when a prompt is split:

    1. split step: all-gather the tokens over the PCP group, each rank's padded to the most any
       rank holds (replicated + split rows), so every rank holds the same rows:
           rows = [ tokens of pcp rank 0 | tokens of pcp rank 1 | ... ]
       no split (decode, short chunks): every rank holds the step's tokens already.
    2. route all rows; each rank runs its experts on the pairs routed to them (other pairs add
       0), and adds its TP slice of the shared experts on its own PCP rank's rows (without a
       split, PCP rank 0 alone adds them: the rows are the same on every PCP rank).
    3. all-reduce over all W ranks: every row holds every expert's output; keep your own rows.

The experts of a rank are two stacked tensors, `w13` [E_local, 2 * I_local, H] (gate rows, then
up rows) and `w2` [E_local, H, I_local]. Checkpoints store one tensor per expert and projection
(`experts.{e}.gate_proj.weight`, ...); the parameters' `parts` tell the loader which slice of
which checkpoint tensor goes where. The computation itself is in experts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cpserve.config import ConfigError, ModelConfig
from cpserve.distributed.groups import ParallelGroups, all_gather, all_reduce
from cpserve.models.experts import experts_auto
from cpserve.models.layers import GatedMLP, sharded_parameter

if TYPE_CHECKING:
    from cpserve.attention.context import AttentionContext

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
QWEN_MOE_ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")


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
        `noaux_tc` (transformers' V3 config omits the field). Qwen-MoE: softmax, the k best,
        renormalised when `norm_topk_prob`."""
        if architecture in QWEN_MOE_ARCHITECTURES:
            return RoutingConfig(
                num_experts=int(hf.get("num_experts") or hf["num_local_experts"]),
                top_k=int(hf["num_experts_per_tok"]), method="greedy", scoring="softmax",
                num_groups=1, topk_groups=1, scaling_factor=1.0,
                normalize=bool(hf.get("norm_topk_prob")))
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

    On CUDA, greedy softmax routing (DeepSeek-V2-Lite, Qwen-MoE) is one Triton kernel
    (kernels/routing.py), which this code is the reference of.
    """
    if (router_logits.is_cuda and routing.method == "greedy" and routing.scoring == "softmax"
            and correction_bias is None):
        from cpserve.models.kernels.routing import softmax_topk_triton  # needs Triton

        return softmax_topk_triton(router_logits, routing.top_k, routing.normalize,
                                   routing.scaling_factor)
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


@dataclass(frozen=True)
class MoESpec:
    """What differs between the MoE layers of the supported architectures."""

    routing: RoutingConfig
    intermediate: int  # moe_intermediate_size: one routed expert's
    shared_intermediate: int  # 0: no shared experts
    shared_name: str  # the checkpoint's module name for them
    shared_gate: bool  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) scales the shared expert
    fp32_router: bool  # DeepSeek routes on fp32 logits; Qwen on the model dtype's, as HF does

    @staticmethod
    def from_config(config: ModelConfig) -> MoESpec:
        hf, arch = config.hf_config, config.architecture
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r}: only silu experts are supported")
        deepseek = arch not in QWEN_MOE_ARCHITECTURES
        return MoESpec(routing=RoutingConfig.from_hf(hf, arch),
                       intermediate=int(hf["moe_intermediate_size"]),
                       shared_intermediate=config.shared_expert_intermediate_size,
                       shared_name="shared_experts" if deepseek else "shared_expert",
                       shared_gate=arch == "Qwen2MoeForCausalLM", fp32_router=deepseek)


# Modules ------------------------------------------------------------------------------------
class Router(nn.Module):
    """`mlp.gate`: router weight [E, H] (replicated), and V3's `e_score_correction_bias`."""

    def __init__(self, hidden: int, routing: RoutingConfig, dtype: torch.dtype,
                 fp32: bool) -> None:
        super().__init__()
        self.routing = routing
        # Kept in fp32 when routing is: no cast of the weight every step.
        self.weight = sharded_parameter((routing.num_experts, hidden),
                                        torch.float32 if fp32 else dtype)
        # V3 checkpoints store the bias in fp32 whatever the model's dtype.
        self.e_score_correction_bias = (sharded_parameter((routing.num_experts,), torch.float32)
                                        if routing.method == "noaux_tc" else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.to(self.weight.dtype), self.weight).float()
        return select_experts(logits, self.routing, self.e_score_correction_bias)


class RoutedExperts(nn.Module):
    """Experts [first, first + count), each its columns `[start, start + inter_local)`."""

    def __init__(self, count: int, hidden: int, inter_local: int, start: int,
                 dtype: torch.dtype, first: int = 0) -> None:
        super().__init__()
        self.first, self.count = first, count
        self.w13 = sharded_parameter((count, 2 * inter_local, hidden), dtype)
        self.w2 = sharded_parameter((count, hidden, inter_local), dtype)
        rows = (0, start, inter_local)
        self.w13.parts = [part for e in range(count) for part in (
            (f"{first + e}.gate_proj.weight", rows, (e, slice(0, inter_local))),
            (f"{first + e}.up_proj.weight", rows, (e, slice(inter_local, 2 * inter_local))))]
        self.w2.parts = [(f"{first + e}.down_proj.weight", (1, start, inter_local), (e,))
                         for e in range(count)]
        self.impl = experts_auto

    def held_here(self, ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> indices into this rank's experts, -1 for the others'."""
        local = ids - self.first
        return torch.where((local >= 0) & (local < self.count), local, -1)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.impl(x, self.w13, self.w2, weights, ids)


class SharedExpertGate(nn.Module):
    """Qwen2-MoE's `shared_expert_gate`: a per-token scale sigmoid(x . w) (replicated)."""

    def __init__(self, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = sharded_parameter((1, hidden), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x, self.weight))


class MoE(nn.Module):
    """A MoE layer (`mlp` of the sparse layers). Takes the step's attention context, whose
    metadata says whether the PCP ranks hold different tokens (expert parallelism needs it)."""

    takes_step_context = True

    def __init__(self, config: ModelConfig, groups: ParallelGroups) -> None:
        super().__init__()
        spec = MoESpec.from_config(config)
        dtype, hidden = config.dtype, config.hidden_size
        self.groups = groups
        self.gate = Router(hidden, spec.routing, dtype, spec.fp32_router)
        experts = spec.routing.num_experts
        if groups.expert_parallel:
            count = experts // groups.world_size
            self.experts = RoutedExperts(count, hidden, spec.intermediate, 0, dtype,
                                         first=groups.rank * count)
        else:
            local = spec.intermediate // groups.tp
            self.experts = RoutedExperts(experts, hidden, local, groups.tp_rank * local, dtype)
        self.shared_name = spec.shared_name
        self.shared_expert_gate = SharedExpertGate(hidden, dtype) if spec.shared_gate else None
        if spec.shared_intermediate:
            # A gated MLP whose partial sums are reduced with the routed experts'.
            self.add_module(spec.shared_name, GatedMLP(hidden, spec.shared_intermediate, groups,
                                                       dtype, reduce=False))

    def _shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """This rank's TP slice of the shared experts' output (None without shared experts)."""
        shared = getattr(self, self.shared_name, None)
        if shared is None:
            return None
        out = shared(x)
        return out if self.shared_expert_gate is None else out * self.shared_expert_gate(x)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.groups.expert_parallel:
            return self._expert_parallel(x, ctx)
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        shared = self._shared(x)
        if shared is not None:
            out = out + shared
        return all_reduce(out, self.groups.tp_group)

    def _expert_parallel(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Steps 1-3 of the module docstring."""
        g, meta = self.groups, ctx.metadata
        split = g.pcp > 1 and meta.has_split
        if split:
            per_rank = meta.rep_index.numel() + meta.pad  # the most local rows a PCP rank has
            rows = all_gather(F.pad(x, (0, 0, 0, per_rank - x.shape[0])), g.pcp_group)
            mine = slice(g.pcp_rank * per_rank, g.pcp_rank * per_rank + x.shape[0])
        else:
            rows, mine = x, slice(0, x.shape[0])
        weights, ids = self.gate(rows)
        out = self.experts(rows, weights, self.experts.held_here(ids))
        if split or g.pcp_rank == 0:
            shared = self._shared(x)
            if shared is not None:
                out[mine] += shared
        return all_reduce(out, g.ep_group)[mine]
