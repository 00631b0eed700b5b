"""Each Triton kernel against its PyTorch reference, on random inputs.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
here before Triton is imported), so these tests run in CPU CI; sizes are kept small for it.

Tolerances: fp32 inputs use IEEE dot products in the kernels, so only summation order differs
from the fp32 reference (1e-5). bf16 inputs: both sides see the same bf16 values and
accumulate in fp32, but the kernels round the softmax weights to bf16 before P @ V (8-bit
mantissa, relative 2^-8) and the output to bf16: 2e-2 absolute on outputs of unit scale. LSE
comes from fp32 scores of the same bf16 inputs in both: 1e-3. fp16 (10-bit mantissa): 4e-3.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from cpserve.attention.backend import TorchReferenceBackend  # noqa: E402
from cpserve.attention.kernels import (  # noqa: E402
    masked_attention_triton,
    merge_attention_states_triton,
    paged_attention_triton,
    write_kv_triton,
)
from cpserve.attention.kernels import paged as paged_module  # noqa: E402
from cpserve.attention.merge import merge_attention_states  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REF = TorchReferenceBackend()
TOL = {torch.float32: dict(out=1e-5, lse=1e-5), torch.float16: dict(out=4e-3, lse=1e-3),
       torch.bfloat16: dict(out=2e-2, lse=1e-3)}
# Triton 3.6's interpreter computes bf16 dot products on the raw bits: bf16 runs on CUDA only.
LOW = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def assert_attention_close(got, want, dtype):
    (out, lse), (ref_out, ref_lse) = got, want
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    # Rows that see nothing: out exactly 0 and lse exactly -inf, as in the reference.
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (out[empty] == 0).all()
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol["out"], rtol=tol["out"])
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=tol["lse"], rtol=tol["lse"])


# write_kv ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("latent", [False, True])
def test_write_kv_matches_reference(dtype, latent):
    gen = torch.Generator().manual_seed(1)
    blocks, page, heads, dim = 6, 4, 2 if not latent else 1, 24
    slots = torch.randperm(blocks * page, generator=gen)[:10]
    slots[[2, 7]] = -1  # tokens of another shard
    # K/V come in the cache's dtype, as from the model (a copy, so equality is exact).
    k, v = rand(10, heads, dim, dtype=dtype, gen=gen), rand(10, heads, 16, dtype=dtype, gen=gen)
    caches = []
    for _ in range(2):
        k_cache = torch.full((blocks, page, heads, dim), 7.0, dtype=dtype, device=DEVICE)
        v_cache = None if latent else torch.full((blocks, page, heads, 16), 7.0, dtype=dtype,
                                                  device=DEVICE)
        caches.append((k_cache, v_cache))
    write_kv_triton(k, None if latent else v, *caches[0], slots.to(DEVICE))
    REF.write_kv(k, None if latent else v, *caches[1], slots.to(DEVICE))
    assert torch.equal(caches[0][0], caches[1][0])
    if not latent:
        assert torch.equal(caches[0][1], caches[1][1])


# merge ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("parts", [1, 2, 5])
def test_merge_matches_reference(parts):
    gen = torch.Generator().manual_seed(parts)
    n, heads, dim = 7, 3, 20
    # Packed as sharded.py sends it: [S, N, H, D + 1], LSE in the last column (strided views).
    packed = rand(parts, n, heads, dim + 1, gen=gen) * 3
    packed[0, 0, :, -1] = float("-inf")  # one part empty for some rows
    packed[:, 1, 0, -1] = float("-inf")  # every part empty: o = 0, l = -inf
    outs, lses = packed[..., :-1], packed[..., -1]
    got = merge_attention_states_triton(outs, lses)
    want = merge_attention_states(outs, lses)
    assert_attention_close(got, want, torch.float32)


# paged attention -----------------------------------------------------------------------------
def paged_case(seed, dtype, group, dk=32, dv=32, latent=False, page=4, num_queries=6):
    gen = torch.Generator().manual_seed(seed)
    kv_heads, blocks, width = 2, 24, 5
    k_cache = rand(blocks, page, kv_heads, dk, dtype=dtype, gen=gen)
    v_cache = None if latent else rand(blocks, page, kv_heads, dv, dtype=dtype, gen=gen)
    tables = torch.randperm(blocks, generator=gen)[:3 * width].view(3, width).to(DEVICE)
    seq = torch.sort(torch.randint(0, 3, (num_queries,), generator=gen)).values
    lengths = torch.randint(0, width * page + 1, (num_queries,), generator=gen)
    lengths[0], lengths[-1] = 0, width * page  # nothing visible; every slot visible
    q = rand(num_queries, kv_heads * group, dk, dtype=dtype, gen=gen)
    return q, k_cache, v_cache, tables, seq.to(DEVICE), lengths.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_paged_attention_matches_reference(dtype, group, tiled, splits, monkeypatch):
    # The split factor comes from shapes and the GPU size; force it either way.
    monkeypatch.setitem(paged_module.TUNING, "target_programs_per_sm", 0 if splits == 1 else 64)
    monkeypatch.setitem(paged_module.TUNING, "min_split_tokens", 4)
    monkeypatch.setitem(paged_module.TUNING, "max_splits", splits)
    monkeypatch.setitem(paged_module.TUNING, "block_n", 16)
    monkeypatch.setitem(paged_module.TUNING, "tiled_block_n", 16)
    monkeypatch.setitem(paged_module.TUNING, "rows_per_tile", 16)
    case = paged_case(group * 10 + splits, dtype, group)
    got = paged_attention_triton(*case, 0.3, tiled=tiled)
    assert_attention_close(got, REF.paged_attention(*case, 0.3), dtype)


def test_paged_attention_latent_values_and_odd_dims(monkeypatch):
    """MLA-style: one KV head for all query heads, values = first v_dim key channels,
    dims that are not powers of two."""
    monkeypatch.setitem(paged_module.TUNING, "block_n", 16)
    monkeypatch.setitem(paged_module.TUNING, "tiled_block_n", 16)
    q, k_cache, _, tables, seq, lengths = paged_case(5, torch.float32, 4, dk=40, latent=True)
    got = paged_attention_triton(q, k_cache, None, tables, seq, lengths, 0.2, v_dim=24)
    want = REF.paged_attention(q, k_cache, None, tables, seq, lengths, 0.2, v_dim=24)
    assert_attention_close(got, want, torch.float32)


def test_paged_splits_follow_each_query_length(monkeypatch):
    """Split ranges scale with each query's own length, so a short query in a wide table
    still gets every split (none wasted on slots past its end) and stays exact."""
    monkeypatch.setitem(paged_module.TUNING, "block_n", 16)
    monkeypatch.setitem(paged_module.TUNING, "tiled_block_n", 16)
    monkeypatch.setitem(paged_module.TUNING, "target_programs_per_sm", 64)
    monkeypatch.setitem(paged_module.TUNING, "min_split_tokens", 1)
    q, k_cache, v_cache, tables, seq, _ = paged_case(9, torch.float32, 2, page=8)
    lengths = torch.tensor([1, 3, 17, 40, 9, 33], device=DEVICE)
    assert paged_module.num_splits_for(6 * 2, tables.shape[1] * 8, torch.device(DEVICE)) > 1
    got = paged_attention_triton(q, k_cache, v_cache, tables, seq, lengths, 0.5)
    want = REF.paged_attention(q, k_cache, v_cache, tables, seq, lengths, 0.5)
    assert_attention_close(got, want, torch.float32)


def test_plan_tiles_cuts_runs_of_one_sequence():
    first, rows = paged_module.plan_tiles(torch.tensor([0, 0, 0, 0, 0, 1, 1, 2]), 2)
    assert first.tolist() == [0, 2, 4, 5, 7] and rows.tolist() == [2, 2, 1, 2, 1]


# masked dense attention ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("group", [1, 4])
def test_masked_dense_matches_reference(dtype, group):
    gen = torch.Generator().manual_seed(group)
    n_q, n_k, kv_heads, dim = 21, 70, 2, 32
    q = rand(n_q, kv_heads * group, dim, dtype=dtype, gen=gen)
    k, v = rand(n_k, kv_heads, dim, dtype=dtype, gen=gen), rand(n_k, kv_heads, dim, dtype=dtype,
                                                                 gen=gen)
    q_seq, k_seq = torch.randint(0, 3, (n_q,), generator=gen), torch.randint(-1, 3, (n_k,),
                                                                             generator=gen)
    q_pos, k_pos = torch.randint(0, 30, (n_q,), generator=gen), torch.randint(0, 30, (n_k,),
                                                                              generator=gen)
    q_pos[0], q_seq[0] = -1, 0  # sees nothing
    idx = [t.to(DEVICE) for t in (q_pos, k_pos, q_seq, k_seq)]
    got = masked_attention_triton(q, k, v, *idx, 0.25)
    assert_attention_close(got, REF.dense_attention(q, k, v, *idx, 0.25), dtype)


def test_masked_dense_latent_values():
    gen = torch.Generator().manual_seed(3)
    q, k = rand(9, 4, 48, gen=gen), rand(9, 1, 48, gen=gen)
    pos, seq = torch.arange(9).to(DEVICE), torch.tensor([0] * 5 + [1] * 4).to(DEVICE)
    got = masked_attention_triton(q, k, k[..., :24], pos, pos, seq, seq, 0.2)
    assert_attention_close(got, REF.dense_attention(q, k, k[..., :24], pos, pos, seq, seq, 0.2),
                           torch.float32)


# latent attention (MLA) shapes ---------------------------------------------------------------
# DeepSeek-V2-Lite / V3 in absorbed form: queries [T, H, 512 + 64], one latent cache head whose
# first 512 channels are the values. The kernels read the 576 channels in 64-wide chunks.
MLA_DK, MLA_DV, MLA_SCALE = 576, 512, 192 ** -0.5  # softmax scale of qk_head_dim 128 + 64


def mla_paged_case(seed, dtype, heads, num_queries, page=16, width=4):
    gen = torch.Generator().manual_seed(seed)
    blocks = 3 * width
    k_cache = rand(blocks, page, 1, MLA_DK, dtype=dtype, gen=gen)
    tables = torch.randperm(blocks, generator=gen).view(3, width).to(DEVICE)
    seq = torch.sort(torch.randint(0, 3, (num_queries,), generator=gen)).values
    lengths = torch.randint(1, width * page + 1, (num_queries,), generator=gen)
    lengths[0], lengths[-1] = 0, width * page
    q = rand(num_queries, heads, MLA_DK, dtype=dtype, gen=gen)
    return q, k_cache, None, tables, seq.to(DEVICE), lengths.to(DEVICE)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("heads,num_queries,tiled,splits", [
    (16, 3, False, 1),  # V2-Lite decode
    (16, 3, False, 3),  # ... split-K
    (16, 5, True, 2),  # chunk over a cached prefix: 2 queries x 16 heads per tile
    (64, 2, False, 2),  # V3 at TP 2: heads cut into parts of 32 (accumulator budget)
])
@pytest.mark.parametrize("latent_blocks", [False, True])
def test_paged_attention_mla_shapes(dtype, heads, num_queries, tiled, splits, latent_blocks,
                                    monkeypatch):
    for mode in ("", "wide_"):  # decode's own setting, and the others'
        monkeypatch.setitem(paged_module.TUNING, f"{mode}latent_blocks", latent_blocks)
    monkeypatch.setitem(paged_module.TUNING, "target_programs_per_sm", 0 if splits == 1 else 64)
    monkeypatch.setitem(paged_module.TUNING, "min_split_tokens", 4)
    monkeypatch.setitem(paged_module.TUNING, "max_splits", splits)
    monkeypatch.setitem(paged_module.TUNING, "wide_block_n", 16)
    monkeypatch.setitem(paged_module.TUNING, "wide_tiled_block_n", 16)
    case = mla_paged_case(heads + splits, dtype, heads, num_queries)
    got = paged_attention_triton(*case, MLA_SCALE, v_dim=MLA_DV, tiled=tiled)
    assert_attention_close(got, REF.paged_attention(*case, MLA_SCALE, v_dim=MLA_DV), dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("latent_blocks", [False, True])
def test_paged_attention_mla_verification_mode(dtype, latent_blocks, monkeypatch):
    """A verification step of V2-Lite's shape (16 heads, 576/512): 2 requests x 5 rows of
    growing lengths (padding rows of length 0), tiles of 2 queries x 16 heads, split-K; with
    the key blocks read in 64-wide chunks or once for scores and values (latent blocks)."""
    monkeypatch.setitem(paged_module.TUNING, "latent_blocks", latent_blocks)
    monkeypatch.setitem(paged_module.TUNING, "wide_verify_block_n", 16)
    monkeypatch.setitem(paged_module.TUNING, "wide_verify_target_programs_per_sm", 64)
    monkeypatch.setitem(paged_module.TUNING, "min_split_tokens", 4)
    monkeypatch.setitem(paged_module.TUNING, "max_splits", 2)
    gen = torch.Generator().manual_seed(21)
    k_cache = rand(4, 16, 1, MLA_DK, dtype=dtype, gen=gen)
    tables = torch.randperm(4, generator=gen).view(2, 2).to(DEVICE)
    seq = torch.arange(2).repeat_interleave(5).to(DEVICE)
    lengths = torch.tensor([20, 21, 22, 23, 24, 3, 4, 5, 0, 0]).to(DEVICE)
    q = rand(10, 16, MLA_DK, dtype=dtype, gen=gen)
    case = (q, k_cache, None, tables, seq, lengths)
    got = paged_attention_triton(*case, MLA_SCALE, v_dim=MLA_DV, queries_per_seq=5)
    assert_attention_close(got, REF.paged_attention(*case, MLA_SCALE, v_dim=MLA_DV), dtype)


def test_paged_attention_mla_fp32_exact(monkeypatch):
    """IEEE dot products: only the summation order of the 9 chunks differs."""
    monkeypatch.setitem(paged_module.TUNING, "wide_block_n", 16)
    case = mla_paged_case(4, torch.float32, 16, 2, width=2)
    got = paged_attention_triton(*case, MLA_SCALE, v_dim=MLA_DV)
    assert_attention_close(got, REF.paged_attention(*case, MLA_SCALE, v_dim=MLA_DV),
                           torch.float32)


@pytest.mark.parametrize("dtype", LOW)
def test_masked_dense_mla_shapes(dtype):
    """Prefill of the absorbed form: v is a view of k's first 512 channels; one prompt
    continuing over cached keys (keys before its first query position) and one fresh."""
    gen = torch.Generator().manual_seed(8)
    n_q, heads = 10, 16
    q_seq = torch.tensor([0] * 6 + [1] * 4)
    q_pos = torch.cat([torch.arange(5, 11), torch.arange(4)])
    k_seq = torch.cat([torch.zeros(5, dtype=torch.long), q_seq])
    k_pos = torch.cat([torch.arange(5), q_pos])
    q = rand(n_q, heads, MLA_DK, dtype=dtype, gen=gen)
    k = rand(k_seq.numel(), 1, MLA_DK, dtype=dtype, gen=gen)
    idx = [t.to(DEVICE) for t in (q_pos, k_pos, q_seq, k_seq)]
    got = masked_attention_triton(q, k, k[..., :MLA_DV], *idx, MLA_SCALE)
    want = REF.dense_attention(q, k, k[..., :MLA_DV], *idx, MLA_SCALE)
    assert_attention_close(got, want, dtype)
