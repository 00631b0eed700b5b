"""MoE pieces against independent per-token definitions: routing, experts, TP slices, loading."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cpserve.config import ConfigError
from cpserve.models.experts import experts_grouped, experts_reference
from cpserve.models.loader import load_weights
from cpserve.models.moe import RoutedExperts, RoutingConfig, select_experts

ROUTINGS = {
    "greedy": RoutingConfig(16, 3, "greedy", "softmax", 1, 1, 1.0, False),
    "group_limited_greedy": RoutingConfig(16, 3, "group_limited_greedy", "softmax", 4, 2, 1.5,
                                          False),
    "noaux_tc": RoutingConfig(16, 4, "noaux_tc", "sigmoid", 4, 2, 2.5, True),
}


def _route_one_token(logits: list[float], bias: list[float], r: RoutingConfig):
    """The routing rule of one token, written out: {expert: weight}."""
    t = torch.tensor(logits)
    scores = (t.softmax(0) if r.scoring == "softmax" else t.sigmoid()).tolist()
    choice = [s + b for s, b in zip(scores, bias)]
    size = r.num_experts // r.num_groups
    groups = [list(range(g * size, (g + 1) * size)) for g in range(r.num_groups)]
    if r.method == "greedy":
        allowed = list(range(r.num_experts))
    else:
        def group_score(members):
            best = sorted((choice[e] for e in members), reverse=True)
            return best[0] if r.method == "group_limited_greedy" else best[0] + best[1]
        ranked = sorted(groups, key=group_score, reverse=True)[: r.topk_groups]
        allowed = [e for g in ranked for e in g]
    chosen = sorted(allowed, key=lambda e: choice[e], reverse=True)[: r.top_k]
    weights = [scores[e] for e in chosen]
    if r.normalize:
        weights = [w / sum(weights) for w in weights]
    return {e: w * r.scaling_factor for e, w in zip(chosen, weights)}


@pytest.mark.parametrize("method", list(ROUTINGS))
def test_routing_matches_the_rule_written_per_token(method):
    routing = ROUTINGS[method]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, routing.num_experts, generator=g) * 2
    bias = (torch.randn(routing.num_experts, generator=g) * 0.3 if method == "noaux_tc"
            else None)
    weights, ids = select_experts(logits, routing, bias)
    assert weights.dtype == torch.float32 and ids.shape == (64, routing.top_k)
    bias_list = bias.tolist() if bias is not None else [0.0] * routing.num_experts
    for t in range(64):
        expected = _route_one_token(logits[t].tolist(), bias_list, routing)
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert sorted(got) == sorted(expected), f"token {t}"
        for e, w in expected.items():
            assert abs(got[e] - w) < 1e-6, f"token {t} expert {e}"


def test_group_limits_change_the_choice():
    """The group rules are not vacuous on these inputs: plain greedy picks differently."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g) * 2
    for method in ("group_limited_greedy", "noaux_tc"):
        r = ROUTINGS[method]
        _, grouped = select_experts(logits, r)
        _, greedy = select_experts(logits, dataclasses.replace(r, method="greedy"))
        assert (grouped.sort(1).values != greedy.sort(1).values).any()


def test_routing_config_from_checkpoint_fields():
    hf = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    assert RoutingConfig.from_hf(hf, "DeepseekV2ForCausalLM").method == "greedy"
    v3 = RoutingConfig.from_hf(hf, "DeepseekV3ForCausalLM")
    assert (v3.method, v3.scoring, v3.num_groups) == ("noaux_tc", "sigmoid", 4)
    with pytest.raises(ConfigError, match="topk_method"):
        RoutingConfig.from_hf({**hf, "topk_method": "sinkhorn"}, "DeepseekV2ForCausalLM")
    with pytest.raises(ConfigError, match="n_group"):
        RoutingConfig.from_hf({**hf, "n_group": 3, "topk_method": "noaux_tc"},
                              "DeepseekV3ForCausalLM")


def _experts(num_experts=8, hidden=32, inter=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(num_experts, inter, hidden, generator=g) * 0.2 for _ in range(2))
    down = torch.randn(num_experts, hidden, inter, generator=g) * 0.2
    return gate, up, down


def _routed(tokens=20, num_experts=8, top_k=3, hidden=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    # Experts 6 and 7 get no token: empty groups must work.
    ids = torch.stack([torch.randperm(num_experts - 2, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    return x, weights, ids


def _per_token(x, weights, ids, gate, up, down):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k]
            out[t] += weights[t, k] * (down[e] @ (F.silu(gate[e] @ x[t]) * (up[e] @ x[t])))
    return out


def test_reference_experts_match_the_per_token_definition():
    gate, up, down = _experts()
    x, weights, ids = _routed()
    out = experts_reference(x, torch.cat([gate, up], 1), down, weights, ids)
    assert torch.allclose(out, _per_token(x, weights, ids, gate, up, down), atol=1e-5)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm missing")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_gemm_experts_match_the_reference(dtype, tol):
    gate, up, down = _experts()
    x, weights, ids = _routed()
    w13, w2 = torch.cat([gate, up], 1).to(dtype), down.to(dtype)
    ref = experts_reference(x.to(dtype), w13, w2, weights, ids).float()
    out = experts_grouped(x.to(dtype), w13, w2, weights, ids)
    assert out.dtype == dtype
    # bf16: both round the intermediate h and the output; tolerance relative to the scale.
    assert torch.allclose(out.float(), ref, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_tp_slices_load_from_per_expert_tensors_and_sum_to_the_whole(tp, tmp_path):
    """Each rank loads its columns of every expert from per-expert checkpoint tensors; the
    ranks' partial outputs add up to the unsharded experts."""
    num_experts, hidden, inter = 8, 32, 24
    gate, up, down = _experts(num_experts, hidden, inter)
    tensors = {}
    for e in range(num_experts):
        tensors[f"{e}.gate_proj.weight"] = gate[e].contiguous()
        tensors[f"{e}.up_proj.weight"] = up[e].contiguous()
        tensors[f"{e}.down_proj.weight"] = down[e].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    x, weights, ids = _routed(num_experts=num_experts, hidden=hidden)
    local = inter // tp
    total = torch.zeros_like(x)
    for rank in range(tp):
        experts = RoutedExperts(num_experts, hidden, local, rank * local, torch.float32)
        load_weights(experts, SimpleNamespace(path=str(tmp_path)))
        cols = slice(rank * local, (rank + 1) * local)
        assert torch.equal(experts.w13[:, :local], gate[:, cols])
        assert torch.equal(experts.w13[:, local:], up[:, cols])
        assert torch.equal(experts.w2, down[:, :, cols])
        total += experts(x, weights, ids)
    assert torch.allclose(total, _per_token(x, weights, ids, gate, up, down), atol=1e-5)
