"""The fused MoE Triton kernel against `experts_reference`, on random routings.

On a machine without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set
before Triton is imported). Tolerances: fp32 runs IEEE dot products, so only summation order
differs (1e-5). fp16 / bf16 (CUDA only for bf16: the interpreter's bf16 dots are wrong): the
kernel keeps gate/up in fp32 and rounds h once, the reference rounds gate, up and h; both
round the output: a few units of the last place of outputs of unit scale.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from cpserve.models.experts import experts_reference  # noqa: E402
from cpserve.models.kernels.fused_moe import (  # noqa: E402
    BY_EXPERT_CONFIG,
    MoEKernelConfig,
    align_pairs,
    fused_moe,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# Small tiles keep the interpreter quick and make several blocks per expert and per dim.
SMALL = MoEKernelConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
# None: the tuning constants, as the engine runs them (the problems below use both the
# prefill tile and the small one, by pairs per expert).
CONFIGS = {"small": SMALL, "constants": None}


def _problem(tokens, num_experts, top_k, hidden=40, inter=56, seed=0, dtype=torch.float32,
             skew=False):
    """Random experts and routing; `skew`: most pairs go to expert 1 (a long sorted run)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(num_experts, hidden, inter, generator=g) * 0.2
    x = torch.randn(tokens, hidden, generator=g)
    # The last expert never gets a token: its programs must exit without writing.
    ids = torch.stack([torch.randperm(num_experts - 1, generator=g)[:top_k]
                       for _ in range(tokens)])
    if skew:
        ids[: tokens * 3 // 4, 0] = 1
        ids[: tokens * 3 // 4, 1:] = torch.where(ids[: tokens * 3 // 4, 1:] == 1, 0,
                                                 ids[: tokens * 3 // 4, 1:])
    weights = torch.rand(tokens, top_k, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, w13, w2)] + [weights.to(DEVICE), ids.to(DEVICE)]


def _assert_close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype] * scale, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("tokens,num_experts,top_k,skew", [
    (37, 8, 2, False), (50, 6, 3, True), (5, 16, 4, False)])
def test_sorted_mode_matches_the_reference(dtype, config, tokens, num_experts, top_k, skew):
    x, w13, w2, weights, ids = _problem(tokens, num_experts, top_k, dtype=dtype, skew=skew)
    out = fused_moe(x, w13, w2, weights, ids, sorted_config=CONFIGS[config],
                    by_expert_max_pairs=0)
    _assert_close(out, experts_reference(x, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,top_k", [(1, 2), (1, 8), (3, 4), (16, 4)])
def test_by_expert_mode_matches_the_reference(dtype, tokens, top_k):
    """Decode batches: every pair in one tile, a program per expert."""
    x, w13, w2, weights, ids = _problem(tokens, 12, top_k, dtype=dtype)
    config = MoEKernelConfig(16, 32, 32, 4, 2) if DEVICE == "cpu" else BY_EXPERT_CONFIG
    out = fused_moe(x, w13, w2, weights, ids, by_expert_config=config, by_expert_max_pairs=64)
    _assert_close(out, experts_reference(x, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize("max_pairs", [0, 64], ids=["sorted", "by-expert"])
def test_experts_held_elsewhere_add_nothing(max_pairs):
    """Expert parallelism: ids of other ranks' experts are -1 and their pairs contribute 0,
    in a token with only such pairs too."""
    x, w13, w2, weights, ids = _problem(20, 8, 3)
    held = torch.where(ids < 4, ids, -1)
    held[0] = -1
    out = fused_moe(x, w13[:4], w2[:4], weights, held, sorted_config=SMALL,
                    by_expert_config=SMALL, by_expert_max_pairs=max_pairs)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    _assert_close(out, experts_reference(x, w13[:4], w2[:4], weights, held), torch.float32)


def test_no_tokens():
    x, w13, w2, weights, ids = _problem(4, 4, 2)
    out = fused_moe(x[:0], w13, w2, weights[:0], ids[:0])
    assert out.shape == (0, x.shape[1])


@pytest.mark.parametrize("block_m", [1, 16])
def test_align_pairs_places_pairs_as_the_stable_sort_does(block_m, monkeypatch):
    """Few pairs are placed by running counts, many by a sort: the same placement."""
    from cpserve.models.kernels import fused_moe as module

    g = torch.Generator().manual_seed(4)
    flat = torch.randint(-1, 8, (300,), generator=g).int().to(DEVICE)
    counted = align_pairs(flat, 8, block_m)
    monkeypatch.setattr(module, "ONE_HOT_MAX_PAIRS", 0)
    sorted_ = align_pairs(flat, 8, block_m)
    assert all(torch.equal(a, b) for a, b in zip(counted, sorted_))


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_pairs_puts_each_pair_once_in_a_block_of_its_expert(block_m):
    g = torch.Generator().manual_seed(3)
    num_experts, pairs = 6, 45
    flat = torch.randint(-1, num_experts - 1, (pairs,), generator=g).int()  # expert 5: none
    sorted_pairs, block_expert = align_pairs(flat.to(DEVICE), num_experts, block_m)
    sorted_pairs, block_expert = sorted_pairs.cpu(), block_expert.cpu()
    blocks = sorted_pairs.view(-1, block_m)
    assert blocks.shape[0] == block_expert.numel()
    seen = []
    for block, expert in zip(blocks.tolist(), block_expert.tolist()):
        real = [p for p in block if p < pairs]
        if expert == -1:  # past the end: padding only
            assert not real
            continue
        assert real, "a block of a group holds at least one pair"
        want = -1 if expert == num_experts else expert
        assert all(flat[p] == want for p in real)
        seen += real
    assert sorted(seen) == list(range(pairs))
    # Used blocks come first, each group's blocks together, in expert order.
    used = block_expert[block_expert >= 0]
    assert torch.equal(used, used.sort().values)
    assert (block_expert[used.numel():] == -1).all()
