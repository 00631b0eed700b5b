"""The RMSNorm, RoPE and routing Triton kernels against their PyTorch references, on random
inputs.

On a machine without CUDA they run in Triton's interpreter. Tolerances: fp32, the reductions'
order only (1e-5 relative). fp16 / bf16 (bf16 on CUDA only: the interpreter's bf16 is wrong):
the norm rounds where the reference does, so within one unit of the last place (1e-2 / 2e-2
relative to values of unit scale); rope rounds once where the reference (halves, in x's
dtype) rounds three times: 2 units of the last place.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from cpserve.models.kernels.rms_norm import rms_norm_triton  # noqa: E402
from cpserve.models.kernels.rope import rope_triton  # noqa: E402
from cpserve.models.kernels.routing import softmax_topk_triton  # noqa: E402
from cpserve.models.layers import rms_norm_reference  # noqa: E402
from cpserve.models.moe import RoutingConfig, select_experts  # noqa: E402
from cpserve.models.rope import RotaryEmbedding, rope_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rand(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_rows_and_per_head_views(dtype):
    weight = rand(48, dtype=dtype, seed=1) + 1
    x = rand(7, 48, dtype=dtype)
    got, _ = rms_norm_triton(x, weight, 1e-6)
    torch.testing.assert_close(got, rms_norm_reference(x, weight, 1e-6)[0],
                               atol=TOL[dtype], rtol=TOL[dtype])
    # Per-head norms of a view into a merged projection ([T, H, D] with a row stride > H*D).
    merged = rand(5, 4 * 48 + 16, dtype=dtype, seed=2)
    heads = merged[:, 16:].view(5, 4, 48)
    got, _ = rms_norm_triton(heads, weight, 1e-6)
    torch.testing.assert_close(got, rms_norm_reference(heads, weight, 1e-6)[0],
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_after_the_residual_add(dtype):
    weight = rand(40, dtype=dtype, seed=1)
    x, residual = rand(6, 40, dtype=dtype, seed=2), rand(6, 40, dtype=dtype, seed=3)
    got, summed = rms_norm_triton(x, weight, 1e-5, residual)
    want, want_sum = rms_norm_reference(x, weight, 1e-5, residual)
    assert torch.equal(summed, want_sum)  # the same one rounding of the same sum
    torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("heads,dim,rotary_dim", [(4, 32, 32), (1, 24, 8), (3, 40, 16)])
def test_rope_matches_the_reference(dtype, interleaved, heads, dim, rotary_dim):
    rotary = RotaryEmbedding({"rope_type": "default", "rope_theta": 10000.0}, dim, 512,
                             rotary_dim).to(DEVICE)
    positions = torch.tensor([0, 5, 17, 300, 2, 511], device=DEVICE)
    table_dtype = torch.float32 if interleaved else dtype  # as the models ask for them
    cos, sin = rotary.cos_sin(positions, table_dtype)
    x = rand(6, heads + 2, dim, dtype=dtype)[:, 1:-1]  # a view: head stride != row stride / H
    got = rope_triton(x, cos, sin, rotary_dim, interleaved)
    want = rope_reference(x, cos, sin, rotary_dim, interleaved)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=2 * TOL[dtype], rtol=2 * TOL[dtype])
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("experts,top_k,normalize,scaling", [
    (64, 6, False, 1.0), (128, 8, True, 1.0), (60, 4, False, 2.5), (8, 2, True, 1.5)])
def test_softmax_routing_matches_select_experts(experts, top_k, normalize, scaling):
    """The same experts and weights per token as the PyTorch routing (whose order within a
    token is unspecified, so both are compared sorted by expert)."""
    logits = rand(33, experts, dtype=torch.float32, seed=4) * 3
    routing = RoutingConfig(experts, top_k, "greedy", "softmax", 1, 1, scaling, normalize)
    weights, ids = softmax_topk_triton(logits, top_k, normalize, scaling)
    want_w, want_ids = select_experts(logits.cpu(), routing)
    order, want_order = ids.cpu().argsort(1), want_ids.argsort(1)
    assert torch.equal(ids.cpu().gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(weights.cpu().gather(1, order), want_w.gather(1, want_order),
                               atol=1e-6, rtol=1e-5)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
