"""FP8 kernels against their PyTorch references, on random inputs.

On a machine without CUDA the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1).
Its float -> FP8 casts truncate, so the kernels round to e4m3 in fp32 first
(cpserve/quantization/kernels/e4m3.py); FP8 values are then compared exactly, on CPU and GPU.
`torch._scaled_mm` has a CPU implementation in torch's CPU build, so its test runs here too.

Tolerances: GEMMs of FP8 operands make exact fp32 products (4-bit mantissas), so fp32 outputs
differ from the reference only by summation order (1e-5 relative) in the interpreter; bf16
outputs by their own rounding (2^-8 relative). On Hopper the block-scaled GEMM's tensor-core
dots accumulate with ~14 bits within each 128-wide K block (block_gemm.py): fp32 outputs within
2^-9 of the largest output (measured on an H200: up to 5.1e-4; a wrong or misplaced scale is
off by tens of percent). Attention over an FP8 cache in fp32: 1e-5, as for fp32 caches.

Quantization is bit-exact on every device: scales and scaled values are IEEE divisions in the
kernels (`tl.math.div_rn`) and in the references (`fp8.divide`).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from cpserve.attention.backend import TorchReferenceBackend  # noqa: E402
from cpserve.attention.kernels import paged as paged_module  # noqa: E402
from cpserve.attention.kernels import paged_attention_triton, write_kv_triton  # noqa: E402
from cpserve.quantization.fp8 import (  # noqa: E402
    FP8,
    block_scaled_mm_reference,
    divide,
    quantize_blocks,
    quantize_channels,
    quantize_groups,
    rowwise_scaled_mm_reference,
)
from cpserve.quantization.kernels.block_gemm import block_scaled_mm_triton  # noqa: E402
from cpserve.quantization.kernels.quantize import quantize_groups_triton  # noqa: E402
from cpserve.quantization.kernels.scaled_mm import rowwise_scaled_mm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REF = TorchReferenceBackend()


def rand(*shape, gen, dtype=torch.float32, spread=1.0):
    """Values over many binades (log-normal magnitudes), as activations have."""
    x = torch.randn(*shape, generator=gen) * torch.exp(torch.randn(*shape, generator=gen) * spread)
    return x.to(DEVICE, dtype)


def same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.dtype == b.dtype == FP8
    return torch.equal(a.float(), b.float())


# activation quantization ---------------------------------------------------------------------
def test_divide_is_correctly_rounded():
    """The references' division is IEEE on every device (CUDA turns x / number into
    x * (1 / number), one ulp off now and then: the kernels' div_rn would not match)."""
    gen = torch.Generator().manual_seed(5)
    x = rand(4096, gen=gen, spread=3.0)
    for d in (448.0, 0.37, torch.tensor(0.011, device=DEVICE)):
        d32 = torch.as_tensor(d, dtype=torch.float32, device=DEVICE)  # the divisor in fp32
        exact = (x.double() / d32.double()).float()  # fp64 then fp32: correctly rounded
        assert torch.equal(divide(x, d), exact)


@pytest.mark.parametrize("rows,cols,group", [(5, 256, 128), (3, 200, 128), (4, 320, 320),
                                             (2, 2500, 2500), (0, 256, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_groups_matches_reference(rows, cols, group, dtype):
    gen = torch.Generator().manual_seed(cols)
    x = rand(rows, cols, gen=gen, dtype=dtype, spread=2.0)
    if rows:
        x[0] = 0  # an all-zero token: scale 1e-12, zeros out
        x[-1, :7] = 1e4  # far beyond the group's other values
    q, scale = quantize_groups_triton(x, group)
    ref_q, ref_scale = quantize_groups(x, group)
    assert scale.shape == (rows, -(-cols // group)) and q.shape == x.shape
    assert torch.equal(scale, ref_scale)
    assert same_fp8(q, ref_q)


# block-scaled GEMM ---------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 20, 130])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_block_scaled_mm_matches_reference(m, out_dtype):
    gen = torch.Generator().manual_seed(m)
    n, k, block = 160, 384, (128, 128)  # a short last block of rows
    a, a_scale = quantize_groups(rand(m, k, gen=gen), block[1])
    b, b_scale = quantize_blocks(rand(n, k, gen=gen) * 0.05, block)
    got = block_scaled_mm_triton(a, a_scale, b, b_scale, block, out_dtype)
    want = block_scaled_mm_reference(a, a_scale, b, b_scale, block, out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    if out_dtype == torch.bfloat16:
        tol = 2 ** -8
    else:  # Hopper's FP8 dot accumulation (module docstring); exact products elsewhere
        tol = 2 ** -9 if DEVICE == "cuda" else 1e-5
    scale = want.float().abs().max()
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("m", [1, 33])
def test_rowwise_scaled_mm_matches_reference(m):
    gen = torch.Generator().manual_seed(m)
    n, k = 48, 96
    a, a_scale = quantize_groups(rand(m, k, gen=gen), k)
    b, b_scale = quantize_channels(rand(n, k, gen=gen) * 0.05)
    got = rowwise_scaled_mm(a, a_scale, b, b_scale.reshape(-1), torch.float32)
    want = rowwise_scaled_mm_reference(a, a_scale, b, b_scale.reshape(-1), torch.float32)
    scale = want.abs().max()  # cuBLASLt's row-wise mode writes bf16
    torch.testing.assert_close(got, want, atol=2 ** -8 * scale, rtol=2 ** -8)


# KV cache in FP8 -----------------------------------------------------------------------------
@pytest.mark.parametrize("latent", [False, True])
@pytest.mark.parametrize("k_scale,v_scale", [(0.25, 2.0), (0.37, 0.011)])
def test_write_kv_fp8_matches_reference(latent, k_scale, v_scale):
    gen = torch.Generator().manual_seed(2)
    blocks, page, heads, dim = 6, 4, 1 if latent else 2, 24
    slots = torch.randperm(blocks * page, generator=gen)[:10]
    slots[[2, 7]] = -1
    k, v = rand(10, heads, dim, gen=gen, spread=2.0), rand(10, heads, 16, gen=gen, spread=2.0)
    caches = []
    for _ in range(2):
        k_cache = torch.zeros(blocks, page, heads, dim, dtype=FP8, device=DEVICE)
        v_cache = None if latent else torch.zeros(blocks, page, heads, 16, dtype=FP8,
                                                  device=DEVICE)
        caches.append((k_cache, v_cache))
    values = None if latent else v
    write_kv_triton(k, values, *caches[0], slots.to(DEVICE), k_scale, v_scale)
    REF.write_kv(k, values, *caches[1], slots.to(DEVICE), k_scale, v_scale)
    assert same_fp8(caches[0][0], caches[1][0])
    if not latent:
        assert same_fp8(caches[0][1], caches[1][1])


# Triton 3.6's interpreter computes bf16 dot products on the raw bits: bf16 runs on CUDA only.
QUERY_DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("latent", [False, True])
@pytest.mark.parametrize("dtype", QUERY_DTYPES)
def test_paged_attention_over_fp8_cache_matches_reference(tiled, latent, dtype, monkeypatch):
    monkeypatch.setitem(paged_module.TUNING, "block_n", 16)
    monkeypatch.setitem(paged_module.TUNING, "rows_per_tile", 16)
    gen = torch.Generator().manual_seed(3)
    kv_heads, blocks, width, page, dk = 1 if latent else 2, 24, 5, 4, 40
    k_cache = rand(blocks, page, kv_heads, dk, gen=gen).to(FP8)
    v_cache = None if latent else rand(blocks, page, kv_heads, 24, gen=gen).to(FP8)
    tables = torch.randperm(blocks, generator=gen)[:3 * width].view(3, width).to(DEVICE)
    seq = torch.sort(torch.randint(0, 3, (7,), generator=gen)).values.to(DEVICE)
    lengths = torch.randint(1, width * page + 1, (7,), generator=gen)
    lengths[0] = 0
    q = rand(7, kv_heads * 4, dk, gen=gen, dtype=dtype)
    args = (q, k_cache, v_cache, tables, seq, lengths.to(DEVICE), 0.3)
    v_dim = 24 if latent else None
    got = paged_attention_triton(*args, v_dim, tiled=tiled, k_scale=0.5, v_scale=3.0)
    want = REF.paged_attention(*args, v_dim, 0.5, 3.0)
    # bf16: the kernel rounds softmax weights and outputs to bf16 (as in test_kernels.py);
    # outputs here are of scale v_scale * |v| ~ 5.
    tol = 1e-5 if dtype == torch.float32 else 1e-1
    for g, w in zip(got, want):
        finite = torch.isfinite(w)
        torch.testing.assert_close(g[finite].float(), w[finite].float(), atol=tol, rtol=tol)
    # The scales matter: scores use k_scale, outputs v_scale (k_scale for latent values).
    plain = REF.paged_attention(*args, v_dim)
    assert not torch.allclose(plain[0], want[0], atol=1e-3)
