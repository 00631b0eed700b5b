"""The GPU backend as a whole against the reference backend.

On CPU (Triton's interpreter) this checks the planning of dense attention into library
pieces, with reference pieces standing in for cuDNN / FlashAttention, and the whole attention
context (KV writes, dense and paged attention, LSE merges) over several steps. On CUDA it also
checks the real library ops at sizes where they are used, and CUDA-graph replay of the decode
kernels. Tolerances: see test_kernels.py.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_kernels import DEVICE, LOW, assert_attention_close, rand  # noqa: E402

from cpserve.attention import gpu_backend  # noqa: E402
from cpserve.attention.backend import TorchReferenceBackend, get_backend  # noqa: E402
from cpserve.attention.context import AttentionContext  # noqa: E402
from cpserve.attention.gpu_backend import GPUBackend  # noqa: E402
from cpserve.attention.kernels.dense_plan import build_dense_plan  # noqa: E402
from cpserve.attention.metadata import PlannedSeq, build_step_tokens  # noqa: E402
from cpserve.distributed.groups import ParallelGroups, single_process_groups  # noqa: E402
from cpserve.kv.layout import KVLayout  # noqa: E402

REF = TorchReferenceBackend()
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def reference_piece(q, k, v, causal, scale):
    """What cuDNN computes for one contiguous piece (causal pieces are square)."""
    zeros_q = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    zeros_k = torch.zeros(k.shape[0], dtype=torch.long, device=q.device)
    k_pos = torch.arange(k.shape[0], device=q.device)
    q_pos = k_pos[:q.shape[0]] if causal else zeros_q + k.shape[0]
    return REF.dense_attention(q, k, v, q_pos, k_pos, zeros_q, zeros_k, scale)


@pytest.fixture
def planned_backend(monkeypatch):
    """A GPU backend that plans every dense call, with reference pieces on CPU."""
    monkeypatch.setattr(gpu_backend, "SMALL_DENSE_PAIRS", 0)
    backend = GPUBackend(DEVICE)
    if DEVICE != "cuda":  # every run a library piece, however short
        monkeypatch.setattr(gpu_backend, "MIN_CUDNN_RUN_ROWS", 1)
        backend.ops = {"cudnn": True, "flash": False}
        backend.causal_op = backend.full_op = reference_piece
    return backend


def pcp_step(pcp: int, rank: int):
    """Metadata of PCP rank `rank` for two split prompts, one continuing a cached prefix."""
    seqs = [PlannedSeq(start=0, num_new=37, split=True), PlannedSeq(start=6, num_new=20,
                                                                     split=True)]
    layout = KVLayout(block_size=4, num_shards=pcp)
    groups = ParallelGroups(rank=rank, tp=1, pcp=pcp, dcp=1)
    tables = torch.arange(2 * 20).view(2, 20)
    return build_step_tokens(seqs, tables, layout, groups).metadata


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_planned_dense_matches_reference_for_pcp_layouts(planned_backend, dtype, rank):
    """Head-tail split rows over all-gathered keys (rank-major, with padding rows), and over
    each rank's block alone (the ring exchange)."""
    meta = pcp_step(3, rank)
    gen = torch.Generator().manual_seed(rank)
    n_q, n_k = meta.split_pos.numel(), meta.gathered_pos.numel()
    q = rand(n_q, 8, 32, dtype=dtype, gen=gen)
    k, v = rand(n_k, 2, 32, dtype=dtype, gen=gen), rand(n_k, 2, 32, dtype=dtype, gen=gen)
    idx = [t.to(DEVICE) for t in (meta.split_pos, meta.gathered_pos, meta.split_seq,
                                  meta.gathered_seq)]
    assert build_dense_plan(*idx) is not None  # the layout is one the planner cuts
    got = planned_backend.dense_attention(q, k, v, *idx, 0.2)
    assert_attention_close(got, REF.dense_attention(q, k, v, *idx, 0.2), dtype)
    for src in range(3):  # ring: one block at a time
        rows = slice(src * meta.pad, (src + 1) * meta.pad)
        block = (q, k[rows], v[rows], idx[0], idx[1][rows], idx[2], idx[3][rows])
        got = planned_backend.dense_attention(*block, 0.2)
        assert_attention_close(got, REF.dense_attention(*block, 0.2), dtype)
    assert not planned_backend.fallbacks


@pytest.mark.parametrize("dtype", LOW)
def test_planned_dense_replicated_and_irregular(planned_backend, dtype):
    gen = torch.Generator().manual_seed(7)
    # Replicated prefill of three prompts: one causal piece each, keys are the query rows.
    seq = torch.tensor([0] * 9 + [1] * 4 + [2] * 12)
    pos = torch.cat([torch.arange(9), torch.arange(3, 7), torch.arange(12)])
    q = rand(25, 4, 16, dtype=dtype, gen=gen)
    k, v = rand(25, 4, 16, dtype=dtype, gen=gen), rand(25, 4, 16, dtype=dtype, gen=gen)
    idx = [t.to(DEVICE) for t in (pos, pos, seq, seq)]
    plan = build_dense_plan(*idx)
    assert plan.key_order is None and plan.varlen_causal and len(plan.pieces) == 3
    assert_attention_close(planned_backend.dense_attention(q, k, v, *idx, 0.3),
                           REF.dense_attention(q, k, v, *idx, 0.3), dtype)
    # Keys missing from the middle of a query run: no cut exists, the masked kernel answers.
    keep = torch.tensor([i for i in range(25) if i != 4])
    idx = [pos.to(DEVICE), pos[keep].to(DEVICE), seq.to(DEVICE), seq[keep].to(DEVICE)]
    assert build_dense_plan(*idx) is None
    got = planned_backend.dense_attention(q, k[keep], v[keep], *idx, 0.3)
    assert_attention_close(got, REF.dense_attention(q, k[keep], v[keep], *idx, 0.3), dtype)
    assert planned_backend.fallbacks == {"dense: irregular layout, masked kernel"}


@pytest.mark.parametrize("dtype", LOW)
def test_planned_dense_with_values_narrower_than_keys(planned_backend, dtype):
    """MLA expanded (keys 192 = 128 + 64 rope, values 128): the library pieces get values
    zero-padded to the key width, and the output keeps the value width."""
    gen = torch.Generator().manual_seed(5)
    seq = torch.tensor([0] * 40 + [1] * 24)
    pos = torch.cat([torch.arange(40), torch.arange(24)])
    q, k = rand(64, 4, 192, dtype=dtype, gen=gen), rand(64, 4, 192, dtype=dtype, gen=gen)
    v = rand(64, 4, 128, dtype=dtype, gen=gen)
    idx = [t.to(DEVICE) for t in (pos, pos, seq, seq)]
    widths, library_piece = [], planned_backend.causal_op
    planned_backend.causal_op = lambda q, k, v, *a: widths.append(v.shape[-1]) or library_piece(
        q, k, v, *a)
    got = planned_backend.dense_attention(q, k, v, *idx, 0.07)
    if planned_backend.ops_for(192)["cudnn"]:  # a library piece per sequence, values padded
        assert widths == [192, 192]
    assert got[0].shape == (64, 4, 128)
    assert_attention_close(got, REF.dense_attention(q, k, v, *idx, 0.07), dtype)
    assert not planned_backend.fallbacks


def test_plan_is_built_once_per_step_metadata(planned_backend, monkeypatch):
    built = []
    original = gpu_backend.build_dense_plan
    monkeypatch.setattr(gpu_backend, "build_dense_plan",
                        lambda *a: built.append(1) or original(*a))
    pos, seq = torch.arange(6).to(DEVICE), torch.zeros(6, dtype=torch.long, device=DEVICE)
    q = rand(6, 2, 16, dtype=torch.float16)
    for _ in range(3):  # three layers of one step
        planned_backend.dense_attention(q, q, q, pos, pos, seq, seq, 0.1)
    assert len(built) == 1
    pos2 = pos.clone()  # the next step's metadata: new tensors
    planned_backend.dense_attention(q, q, q, pos2, pos2, seq, seq, 0.1)
    assert len(built) == 2


def test_get_backend_picks_by_device():
    assert isinstance(get_backend("auto", "cpu"), TorchReferenceBackend)
    assert isinstance(get_backend("gpu", "cpu"), GPUBackend)
    with pytest.raises(ValueError):
        get_backend("nope", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_attention_context_steps_match_reference(dtype):
    """Prefill of two prompts, then a step with a decode token and a chunk continuing over
    the cache: outputs and cache contents of both backends agree."""
    layout, groups = KVLayout(block_size=4), single_process_groups()
    tables = torch.tensor([[3, 0, 5, 1], [2, 6, 4, 7]])
    backends = [TorchReferenceBackend(), get_backend("gpu", DEVICE)]
    caches = [[(torch.zeros(8, 4, 2, 16, dtype=dtype, device=DEVICE),
                torch.zeros(8, 4, 2, 16, dtype=dtype, device=DEVICE))] for _ in backends]
    gen = torch.Generator().manual_seed(11)
    for seqs in ([PlannedSeq(0, 7, False), PlannedSeq(0, 5, False)],
                 [PlannedSeq(7, 1, False), PlannedSeq(5, 6, False)]):
        meta = build_step_tokens(seqs, tables, layout, groups).metadata
        meta = type(meta)(**{n: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x)
                             for n, x in vars(meta).items()})
        t = meta.rep_pos.numel()
        q, k, v = (rand(t, h, 16, dtype=dtype, gen=gen) for h in (4, 2, 2))
        outs = [AttentionContext(meta, c, groups, b).attention(0, q, k, v, 0.25)
                for b, c in zip(backends, caches)]
        lse = torch.zeros(outs[0].shape[:2], device=DEVICE)  # compare outputs only
        assert_attention_close((outs[1], lse), (outs[0], lse), dtype)
    for (k_ref, v_ref), (k_gpu, v_gpu) in zip(caches[0], caches[1]):
        assert torch.equal(k_ref, k_gpu) and torch.equal(v_ref, v_gpu)


def test_latent_attention_shapes_take_the_kernels():
    """DeepSeek MLA (absorbed): paged and dense attention run in the kernels, no fallback."""
    backend = GPUBackend(DEVICE)
    gen = torch.Generator().manual_seed(5)
    dtype = torch.float16
    k_cache = rand(6, 8, 1, 576, dtype=dtype, gen=gen)
    tables = torch.tensor([[4, 1, 5], [0, 3, 2]], device=DEVICE)
    q = rand(3, 16, 576, dtype=dtype, gen=gen)
    seq, lengths = torch.tensor([0, 1, 1], device=DEVICE), torch.tensor([19, 7, 24],
                                                                        device=DEVICE)
    paged = (q, k_cache, None, tables, seq, lengths, 0.07)
    assert_attention_close(backend.paged_attention(*paged, v_dim=512),
                           REF.paged_attention(*paged, v_dim=512), dtype)
    k = rand(3, 1, 576, dtype=dtype, gen=gen)
    dense = (q, k, k[..., :512], lengths, lengths, seq, seq, 0.07)
    assert_attention_close(backend.dense_attention(*dense), REF.dense_attention(*dense), dtype)
    assert not backend.fallbacks
    too_wide = rand(3, 2, 1040, dtype=dtype, gen=gen)
    backend.dense_attention(too_wide, too_wide, too_wide, *dense[3:])
    assert backend.fallbacks == {"dense: head dims 1040/1040"}


# CUDA only -----------------------------------------------------------------------------------
@cuda_only
def test_library_ops_pass_their_probe():
    backend = GPUBackend("cuda")
    assert backend.ops["cudnn"] or backend.ops["flash"], backend.ops


@cuda_only
@pytest.mark.parametrize("lengths", [[4096], [1000, 3000, 96]])
def test_library_dense_at_prefill_sizes(lengths):
    backend = GPUBackend("cuda")
    n = sum(lengths)
    seq = torch.cat([torch.full((m,), i) for i, m in enumerate(lengths)]).cuda()
    pos = torch.cat([torch.arange(m) for m in lengths]).cuda()
    q = rand(n, 32, 128, dtype=torch.bfloat16)
    k, v = rand(n, 8, 128, dtype=torch.bfloat16), rand(n, 8, 128, dtype=torch.bfloat16)
    got = backend.dense_attention(q, k, v, pos, pos, seq, seq, 128 ** -0.5)
    assert_attention_close(got, REF.dense_attention(q, k, v, pos, pos, seq, seq, 128 ** -0.5),
                           torch.bfloat16)


@cuda_only
@pytest.mark.parametrize("batch,context", [(1, 32768), (8, 4000)])
def test_paged_decode_long_context(batch, context):
    page, blocks = 16, batch * (context // 16 + 1)
    k_cache, v_cache = (rand(blocks, page, 8, 128, dtype=torch.bfloat16) for _ in range(2))
    tables = torch.randperm(blocks).view(batch, -1).cuda()
    q = rand(batch, 32, 128, dtype=torch.bfloat16)
    seq = torch.arange(batch).cuda()
    lengths = torch.tensor([context - 37 * i for i in range(batch)]).cuda()
    got = GPUBackend("cuda").paged_attention(q, k_cache, v_cache, tables, seq, lengths, 0.088)
    want = REF.paged_attention(q, k_cache, v_cache, tables, seq, lengths, 0.088)
    assert_attention_close(got, want, torch.bfloat16)


@cuda_only
@pytest.mark.parametrize("batch,context,heads", [(1, 32768, 16), (16, 4000, 16), (2, 8000, 128)])
def test_paged_decode_latent_long_context(batch, context, heads):
    """DeepSeek-V2-Lite (16 heads) / V3 (128 heads) decode over one latent head, bf16."""
    page, blocks = 64, batch * (context // 64 + 1)
    k_cache = rand(blocks, page, 1, 576, dtype=torch.bfloat16)
    tables = torch.randperm(blocks).view(batch, -1).cuda()
    q = rand(batch, heads, 576, dtype=torch.bfloat16)
    seq = torch.arange(batch).cuda()
    lengths = torch.tensor([context - 37 * i for i in range(batch)]).cuda()
    backend = GPUBackend("cuda")
    got = backend.paged_attention(q, k_cache, None, tables, seq, lengths, 0.072, v_dim=512)
    want = REF.paged_attention(q, k_cache, None, tables, seq, lengths, 0.072, v_dim=512)
    assert_attention_close(got, want, torch.bfloat16)
    assert not backend.fallbacks


@cuda_only
def test_dense_latent_prefill_without_scores_in_memory():
    """A 4k-token MLA prefill: the masked kernel, exact against the reference."""
    n = 4096
    seq, pos = torch.zeros(n, dtype=torch.long).cuda(), torch.arange(n).cuda()
    q, k = rand(n, 16, 576, dtype=torch.bfloat16), rand(n, 1, 576, dtype=torch.bfloat16)
    backend = GPUBackend("cuda")
    got = backend.dense_attention(q, k, k[..., :512], pos, pos, seq, seq, 0.072)
    want = REF.dense_attention(q, k, k[..., :512], pos, pos, seq, seq, 0.072)
    assert_attention_close(got, want, torch.bfloat16)
    assert not backend.fallbacks


@cuda_only
def test_decode_kernels_replay_in_a_cuda_graph():
    backend = GPUBackend("cuda")
    k_cache, v_cache = (rand(64, 16, 8, 128, dtype=torch.bfloat16) for _ in range(2))
    tables = torch.randperm(64).view(4, 16).cuda()
    q, k = rand(4, 32, 128, dtype=torch.bfloat16), rand(4, 8, 128, dtype=torch.bfloat16)
    seq, lengths = torch.arange(4).cuda(), torch.tensor([5, 100, 255, 1]).cuda()

    def step():
        dense = backend.dense_attention(q, k, k, lengths, lengths, seq, seq, 0.1)
        return dense, backend.paged_attention(q, k_cache, v_cache, tables, seq, lengths, 0.1)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    q.copy_(rand(4, 32, 128, dtype=torch.bfloat16))
    lengths.copy_(torch.tensor([200, 3, 17, 256]))
    graph.replay()
    eager = step()
    for (out, lse), (eager_out, eager_lse) in zip(captured, eager):
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
