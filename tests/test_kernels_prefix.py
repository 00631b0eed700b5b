"""Attention of a chunk over a cached prefix (the GPU backend's fast path) against the
reference, and the promise that goes with it: every plan of a step is made on the host
before the layers run, none inside them.

On CPU the Triton kernels (gather, merge, paged) run in the interpreter and reference pieces
stand in for cuDNN (as in test_kernels_backend.py); on CUDA the same tests use the real
library ops, and a chunked step of a real model runs under
`torch.cuda.set_sync_debug_mode("error")`. Tolerances: see test_kernels.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_kernels import DEVICE, LOW, TOL, assert_attention_close, rand  # noqa: E402
from test_kernels_backend import reference_piece  # noqa: E402

from cpserve.attention import gpu_backend  # noqa: E402
from cpserve.attention.backend import AttentionShape, TorchReferenceBackend  # noqa: E402
from cpserve.attention.context import AttentionContext  # noqa: E402
from cpserve.attention.gpu_backend import GPUBackend  # noqa: E402
from cpserve.attention.kernels import prefix_plan  # noqa: E402
from cpserve.attention.kernels.gather import gather_kv_reference, gather_kv_triton  # noqa: E402
from cpserve.attention.kernels.merge import merge_two_triton  # noqa: E402
from cpserve.attention.kernels.prefix_plan import build_prefix_plan  # noqa: E402
from cpserve.attention.merge import merge_two  # noqa: E402
from cpserve.attention.metadata import PlannedSeq, build_step_tokens  # noqa: E402
from cpserve.distributed.groups import ParallelGroups, single_process_groups  # noqa: E402
from cpserve.kv.layout import KVLayout  # noqa: E402
from cpserve.quantization.fp8 import FP8  # noqa: E402

REF = TorchReferenceBackend()
# Head width of the small cases: 16 keeps the interpreter fast; on a GPU 32, a width the
# library ops are known to take (the GPU parity tests run it).
D = 32 if DEVICE == "cuda" else 16
MODES = ["gather-cudnn", "triton"] + (["gather-flash"] if DEVICE == "cuda" else [])
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def planned_backend(shape: AttentionShape | None, mode: str = "gather-cudnn",
                    max_prefix_tokens: int = 0) -> GPUBackend:
    backend = GPUBackend(DEVICE, shape=shape, max_prefix_tokens=max_prefix_tokens)
    backend.prefix_attention = mode
    if DEVICE != "cuda":
        backend.ops = {"cudnn": True, "flash": False}
        backend.causal_op = backend.full_op = reference_piece
    return backend


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    """Library paths at test sizes: prefix groups of 8 queries, planned dense calls at any
    size; on CPU (reference pieces) dense runs of 2 rows go to the library too, so a decode
    beside a chunk still takes the masked kernel and everything else the pieces."""
    monkeypatch.setattr(prefix_plan, "MIN_LIBRARY_QUERIES", 8)
    monkeypatch.setattr(gpu_backend, "SMALL_DENSE_PAIRS", 0)
    if DEVICE != "cuda":
        monkeypatch.setattr(gpu_backend, "MIN_CUDNN_RUN_ROWS", 2)


# kernels -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_matches_reference(dtype, monkeypatch):
    monkeypatch.setattr(prefix_plan, "GATHER_BLOCK_TOKENS", 4)  # items end inside pages
    gen = torch.Generator().manual_seed(3)
    cache = rand(12, 4, 3, 200, dtype=dtype, gen=gen)  # 600 channels: two programs per item
    tables = torch.randperm(12, generator=gen)[:12].view(2, 6).to(DEVICE)
    # Groups in (sequence, length) order: 21 tokens of seq 0, then 9 of seq 1.
    plan = build_prefix_plan(torch.tensor([1] * 8 + [0] * 9), torch.tensor([9] * 8 + [21] * 9),
                             2, torch.device(DEVICE), library=True, tile_queries=4)
    work = plan.library.gather
    assert work.num_rows == 30 and work.num_items == 6 + 3
    got = gather_kv_triton(cache, tables, work)
    want = gather_kv_reference(cache, tables, work)
    assert torch.equal(got, want)
    flat = cache.reshape(-1, 3, 200)
    for row, (seq, local) in ((13, (0, 13)), (21 + 6, (1, 6))):
        assert torch.equal(got[row], flat[tables[seq, local // 4] * 4 + local % 4])


def test_merge_two_matches_reference():
    gen = torch.Generator().manual_seed(4)
    out_a, out_b = rand(6, 5, 24, dtype=torch.float16, gen=gen), rand(6, 5, 24, dtype=torch.float16,
                                                                      gen=gen)
    lse_a, lse_b = rand(5, 6, gen=gen).t(), rand(6, 5, gen=gen)  # lse_a strided, as cuDNN's
    lse_a[0], lse_b[0] = float("-inf"), float("-inf")  # a row that sees nothing
    lse_b[1] = float("-inf")  # a row seen by one part only
    out_a[0], out_b[:2] = 0, 0
    got, want = merge_two_triton(out_a, lse_a, out_b, lse_b), merge_two(out_a, lse_a, out_b, lse_b)
    assert_attention_close(got, want, torch.float16)


# planning ------------------------------------------------------------------------------------
def test_prefix_plan_splits_rows_between_library_and_kernel():
    seq = torch.tensor([2] * 6 + [0] + [2] * 3 + [1] * 2 + [3] * 8)
    lens = torch.tensor([30] * 6 + [11] + [30] * 3 + [0] * 2 + [8] * 8)
    plan = build_prefix_plan(seq, lens, 4, torch.device("cpu"), library=True, tile_queries=4)
    lib, tri = plan.library, plan.triton
    # seq 2 (9 rows in two places) and seq 3 (8 rows): library, grouped by (seq, length).
    assert lib.rows.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9] + list(range(12, 20))
    assert lib.pieces == ((0, 9, 0, 30), (9, 17, 30, 38))
    assert lib.cu_q.tolist() == [0, 9, 17] and lib.cu_k.tolist() == [0, 30, 38]
    assert tri.rows.tolist() == [6] and tri.tiles is None  # a decode: decode mode
    # Seq 1 sees nothing on this shard: in neither part.
    capped = build_prefix_plan(seq, lens, 4, torch.device("cpu"), library=True,
                               tile_queries=4, gather_capacity=30)
    assert capped.library.pieces == ((0, 9, 0, 30),)  # seq 3 no longer fits: the kernel
    assert capped.triton.rows.tolist() == [6] + list(range(12, 20))
    one_run = build_prefix_plan(torch.zeros(70, dtype=torch.long), torch.full((70,), 5), 1,
                                torch.device("cpu"), library=True, tile_queries=4)
    assert one_run.library.rows is None and one_run.triton is None  # no permutation at all
    kernel_only = build_prefix_plan(torch.zeros(70, dtype=torch.long), torch.full((70,), 5), 1,
                                    torch.device("cpu"), library=False, tile_queries=16)
    assert kernel_only.library is None and kernel_only.triton.rows is None
    assert kernel_only.triton.tiles.rows.tolist() == [16, 16, 16, 16, 6]


def _caches(dtype, gen, blocks=48, page=4, kv_heads=2, dim=D):
    return rand(blocks, page, kv_heads, dim, dtype=dtype, gen=gen), rand(
        blocks, page, kv_heads, dim, dtype=dtype, gen=gen)


def _layouts():
    """(name, query_seq, query_kv_len, num_seqs) of prefix calls the engine makes."""
    one = ("chunk over a prefix", [0] * 40, [37] * 40, 1)
    mixed = ("decodes, a short run and a chunk", [1, 2] + [0] * 30 + [3] * 3,
             [19, 44] + [23] * 30 + [9] * 3, 4)
    # PCP rank 1 of 2, two split prompts over prefixes: every rank's rows, padded.
    meta = _pcp_meta(pcp=2, rank=1)
    pcp = ("PCP split over a prefix", meta.gathered_seq.clamp(min=0).tolist(),
           meta.gathered_prefix_len.tolist(), 2)
    # Shard 1 of 4 (DCP): a prefix of 2 tokens leaves it nothing (interleave 1 puts them
    # on shards 0 and 1... and 5 tokens give shard 1 two).
    layout = KVLayout(4, num_shards=4)
    lens = [layout.local_count(start, 1) for start in (1, 5, 57)]
    dcp = ("one shard of four", [0] * 8 + [1] * 8 + [2] * 8, [lens[0]] * 8 + [lens[1]] * 8
           + [lens[2]] * 8, 3)
    return [one, mixed, pcp, dcp]


def _pcp_meta(pcp: int, rank: int):
    seqs = [PlannedSeq(start=40, num_new=37, split=True), PlannedSeq(start=6, num_new=20,
                                                                      split=True)]
    groups = ParallelGroups(rank=rank, tp=1, pcp=pcp, dcp=1)
    return build_step_tokens(seqs, torch.arange(2 * 24).view(2, 24),
                             KVLayout(block_size=4, num_shards=pcp), groups).metadata


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", _layouts(), ids=lambda x: x[0])
def test_planned_prefix_attention_matches_reference(dtype, mode, layout):
    _, seq, lens, num_seqs = layout
    gen = torch.Generator().manual_seed(len(seq))
    k_cache, v_cache = _caches(dtype, gen)
    tables = torch.randperm(48, generator=gen)[:num_seqs * 12].view(num_seqs, 12).to(DEVICE)
    seq, lens = torch.tensor(seq), torch.tensor(lens)
    q = rand(seq.numel(), 8, D, dtype=dtype, gen=gen)
    shape = AttentionShape(8, 2, D, D, dtype)
    backend = planned_backend(shape, mode, max_prefix_tokens=64)
    plan = backend._prefix_plan(seq, lens, num_seqs, shape)
    seq, lens = seq.to(DEVICE), lens.to(DEVICE)
    got = backend.paged_attention(q, k_cache, v_cache, tables, seq, lens, 0.3, plan=plan)
    want = REF.paged_attention(q, k_cache, v_cache, tables, seq, lens, 0.3)
    assert_attention_close(got, want, dtype)
    assert (plan.library is not None) == (mode != "triton")
    assert backend.host_plans == 0 and not backend.fallbacks


def test_unplanned_call_plans_itself_once():
    """Tests and benchmarks may call without a plan: the backend plans (a host sync), once
    for all the layers of a step."""
    gen = torch.Generator().manual_seed(9)
    k_cache, v_cache = _caches(torch.float16, gen)
    tables = torch.arange(12).view(1, 12).to(DEVICE)
    seq, lens = torch.zeros(70, dtype=torch.long, device=DEVICE), torch.full((70,), 30,
                                                                             device=DEVICE)
    q = rand(70, 4, D, dtype=torch.float16, gen=gen)
    backend = planned_backend(None)
    for _ in range(3):
        got = backend.paged_attention(q, k_cache, v_cache, tables, seq, lens, 0.2)
    assert backend.host_plans == 1
    assert_attention_close(got, REF.paged_attention(q, k_cache, v_cache, tables, seq, lens, 0.2),
                           torch.float16)
    wrong_rows = q[:50]
    plan = backend._prefix_plan(seq.cpu(), lens.cpu(), 1, AttentionShape(4, 2, D, D,
                                                                          torch.float16))
    with pytest.raises(ValueError, match="prefix plan was made for"):
        backend.paged_attention(wrong_rows, k_cache, v_cache, tables, seq[:50], lens[:50], 0.2,
                                plan=plan)


# whole steps ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["gather-cudnn", "triton"])
def test_attention_context_steps_are_planned_ahead(mode):
    """Prefill of two prompts, then a chunk continuing one and a decode of the other: the
    plans `plan_step` makes from the host metadata serve every call, none is made in a layer,
    and outputs and cache contents match the reference backend."""
    dtype, layout, groups = torch.float16, KVLayout(block_size=4), single_process_groups()
    tables = torch.arange(2 * 12).view(2, 12)
    shape = AttentionShape(4, 2, D, D, dtype)
    backends = [REF, planned_backend(shape, mode, max_prefix_tokens=48)]
    caches = [[(torch.zeros(24, 4, 2, D, dtype=dtype, device=DEVICE),
                torch.zeros(24, 4, 2, D, dtype=dtype, device=DEVICE))] for _ in backends]
    gen = torch.Generator().manual_seed(12)
    for seqs in ([PlannedSeq(0, 27, False), PlannedSeq(0, 9, False)],
                 [PlannedSeq(27, 18, False), PlannedSeq(9, 1, False)]):
        host = build_step_tokens(seqs, tables, layout, groups).metadata
        meta = type(host)(**{n: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x)
                             for n, x in vars(host).items()})
        t = host.rep_pos.numel()
        q, k, v = (rand(t, h, D, dtype=dtype, gen=gen) for h in (4, 2, 2))
        outs = [AttentionContext(meta, c, groups, b, plans=b.plan_step(host, "allgather"))
                .attention(0, q, k, v, 0.25) for b, c in zip(backends, caches)]
        lse = torch.zeros(outs[0].shape[:2], device=DEVICE)
        assert_attention_close((outs[1], lse), (outs[0], lse), dtype)
    plans = backends[1].plan_step(host, "allgather")
    assert plans.rep_dense is not None and plans.rep_prefix is not None
    assert backends[1].host_plans == 0
    for (k_ref, v_ref), (k_gpu, v_gpu) in zip(caches[0], caches[1]):
        assert torch.equal(k_ref, k_gpu) and torch.equal(v_ref, v_gpu)


@pytest.mark.parametrize("exchange", ["allgather", "ring"])
@pytest.mark.parametrize("rank", [0, 2])
def test_pcp_step_plans_match_reference(exchange, rank):
    """A PCP rank's plans for its split rows: over the exchanged keys (all at once, or one
    ring block at a time) and, for every rank's rows, over the cached prefix."""
    pcp, dtype = 3, torch.float16
    host = _pcp_meta(pcp, rank)
    shape = AttentionShape(8, 2, D, D, dtype)
    backend = planned_backend(shape, max_prefix_tokens=64)
    plans = backend.plan_step(host, exchange)
    gen = torch.Generator().manual_seed(rank)
    n_q, n_k, pad = host.split_pos.numel(), host.gathered_pos.numel(), host.pad
    q = rand(n_q, 8, D, dtype=dtype, gen=gen)
    k, v = rand(n_k, 2, D, dtype=dtype, gen=gen), rand(n_k, 2, D, dtype=dtype, gen=gen)
    idx = [t.to(DEVICE) for t in (host.split_pos, host.gathered_pos, host.split_seq,
                                  host.gathered_seq)]
    blocks = [slice(0, n_k)] if exchange == "allgather" else [
        slice(s * pad, (s + 1) * pad) for s in range(pcp)]
    for source, rows in enumerate(blocks):
        call = (q, k[rows], v[rows], idx[0], idx[1][rows], idx[2], idx[3][rows])
        got = backend.dense_attention(*call, 0.2, plan=plans.split_dense_for(source))
        assert_attention_close(got, REF.dense_attention(*call, 0.2), dtype)
    k_cache, v_cache = _caches(dtype, gen)
    tables = torch.randperm(48, generator=gen).view(2, 24).to(DEVICE)
    all_q = rand(n_k, 8, D, dtype=dtype, gen=gen)
    seq, lens = host.gathered_seq.clamp(min=0).to(DEVICE), host.gathered_prefix_len.to(DEVICE)
    got = backend.paged_attention(all_q, k_cache, v_cache, tables, seq, lens, 0.2,
                                  plan=plans.split_prefix)
    assert_attention_close(got, REF.paged_attention(all_q, k_cache, v_cache, tables, seq, lens,
                                                    0.2), dtype)
    assert plans.split_prefix.library is not None
    assert backend.host_plans == 0 and not backend.fallbacks


# a model runner ------------------------------------------------------------------------------
TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=4 * D,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6)


def _runner(tmp_path, dtype: str, max_len: int, backend: str, kv_cache_dtype: str = "auto"):
    from cpserve.config import (
        CacheConfig,
        EngineConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
    )
    from cpserve.engine.model_runner import ModelRunner

    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, torch_dtype=dtype)))
    config = EngineConfig(ModelConfig.from_pretrained(tmp_path, dtype, max_len), ParallelConfig(),
                          CacheConfig(block_size=16, num_blocks=max_len // 16 + 8,
                                      kv_cache_dtype=kv_cache_dtype),
                          SchedulerConfig(max_num_seqs=8), device=DEVICE, load_format="dummy",
                          enforce_eager=True)
    runner = ModelRunner(config, single_process_groups(), torch.device(DEVICE))
    if backend == "planned" and DEVICE != "cuda":  # on CPU the runner picks the reference
        runner.backend = planned_backend(runner.attention_shape(), max_prefix_tokens=max_len)
    return runner


def _chunked_plans(prompt_len: int, chunk: int):
    """Step plans of one prompt in chunks, a second prompt joining, then decodes of both."""
    from cpserve.distributed.plan import PlannedRequest, StepPlan

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (prompt_len,), generator=gen).tolist()
    other = torch.randint(0, 256, (40,), generator=gen).tolist()
    blocks = list(range(prompt_len // 16 + 2))
    plans = []
    for start in range(0, prompt_len, chunk):
        ids = prompt[start:start + chunk]
        plans.append(StepPlan([PlannedRequest("a", ids, start, blocks if start == 0 else [],
                                              start == 0, 1)]))
    last = [PlannedRequest("a", [7], prompt_len, [], False, 1),
            PlannedRequest("b", other, 0, [len(blocks) + i for i in range(4)], True, 1)]
    plans.append(StepPlan(last))
    return plans


def test_runner_chunked_steps_planned_ahead_match_reference(tmp_path, monkeypatch):
    """The engine's own path: chunks over the cache, then a step mixing a decode and a new
    prompt. Logits equal the reference backend's (fp16 attention outputs: TOL), the chunks
    take the gather + library path, and no plan is made inside a layer."""
    planned = _runner(tmp_path, "float16", 512, "planned")
    reference = _runner(tmp_path, "float16", 512, "reference")
    reference.backend = REF
    gathers, prefix_calls = [], []
    gather = gpu_backend.gather_kv_triton
    monkeypatch.setattr(gpu_backend, "gather_kv_triton",
                        lambda *a, **kw: gathers.append(1) or gather(*a, **kw))
    planned.backend.full_op = (lambda q, k, v, causal, scale: prefix_calls.append(k.shape[0])
                               or reference_piece(q, k, v, causal, scale))
    for plan in _chunked_plans(150, 64):
        got, want = planned.execute(plan), reference.execute(plan)
        torch.testing.assert_close(got, want, atol=TOL[torch.float16]["out"], rtol=0)
    assert prefix_calls == [64, 64, 128, 128]  # chunks 2 and 3, in each of the two layers
    assert len(gathers) == 2 * len(prefix_calls)  # their keys and values
    assert planned.backend.host_plans == 0


@cuda_only
def test_chunked_step_has_no_host_synchronisation(tmp_path):
    """A chunk over a 2k cached prefix (library prefix, planned dense) and a mixed step:
    their forward passes run under sync debug mode "error" (any host sync raises)."""
    runner = _runner(tmp_path, "bfloat16", 4096, "planned")
    assert runner.backend.name == "gpu"
    plans = _chunked_plans(3072, 1024)
    for plan in plans:  # warm up: kernels compiled, library plans built, allocator pools
        runner.execute(plan)
    runner.rows.clear()
    for plan in plans:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # the host's preparation too: table diffs, inputs, plans
            runner.forward(runner.prepare(plan))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert runner.backend.host_plans == 0


@cuda_only
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("groups", [[(2048, 16384)], [(96, 3000)] * 10])
def test_prefix_attention_at_prefill_sizes(mode, groups):
    """bf16, 32 query heads over 8 KV heads: one long chunk over a long prefix (cuDNN), and
    ten sequences' chunks (FlashAttention varlen), against the reference."""
    page, dtype = 16, torch.bfloat16
    blocks_per_seq = max(length for _, length in groups) // page + 1
    k_cache, v_cache = (rand(len(groups) * blocks_per_seq, page, 8, 128, dtype=dtype)
                        for _ in range(2))
    tables = torch.randperm(len(groups) * blocks_per_seq).view(len(groups), -1).cuda()
    seq = torch.cat([torch.full((n,), i) for i, (n, _) in enumerate(groups)])
    lens = torch.cat([torch.full((n,), length) for n, length in groups])
    shape = AttentionShape(32, 8, 128, 128, dtype)
    backend = GPUBackend("cuda", shape=shape, max_prefix_tokens=sum(g[1] for g in groups))
    backend.prefix_attention = mode
    plan = backend._prefix_plan(seq, lens, len(groups), shape)
    q = rand(seq.numel(), 32, 128, dtype=dtype)
    seq, lens = seq.cuda(), lens.cuda()
    got = backend.paged_attention(q, k_cache, v_cache, tables, seq, lens, 128 ** -0.5, plan=plan)
    want = REF.paged_attention(q, k_cache, v_cache, tables, seq, lens, 128 ** -0.5)
    assert_attention_close(got, want, dtype)


# an FP8 KV cache ----------------------------------------------------------------------------
# Scales of a checkpoint (any positive number) rather than the warm-up's powers of two, so the
# dequantization rounds.
K_SCALE, V_SCALE = 0.37, 1.5


def _fp8_caches(gen, blocks=48, page=4, kv_heads=2, dim=D):
    return tuple(c.to(FP8) for c in _caches(torch.float32, gen, blocks, page, kv_heads, dim))


@pytest.mark.parametrize("dtype", LOW)
def test_gather_dequantizes_an_fp8_cache(dtype, monkeypatch):
    """The gather into the model's dtype: each row is e4m3 value * scale (in fp32, then
    rounded), as the reference and the paged kernel read an FP8 cache."""
    monkeypatch.setattr(prefix_plan, "GATHER_BLOCK_TOKENS", 4)
    gen = torch.Generator().manual_seed(5)
    cache = rand(12, 4, 3, 40, gen=gen).mul(20).to(FP8)
    tables = torch.randperm(12, generator=gen).view(2, 6).to(DEVICE)
    plan = build_prefix_plan(torch.tensor([1] * 8 + [0] * 9), torch.tensor([9] * 8 + [21] * 9),
                             2, torch.device(DEVICE), library=True, tile_queries=4)
    work = plan.library.gather
    got = gather_kv_triton(cache, tables, work, scale=K_SCALE, dtype=dtype)
    want = gather_kv_reference(cache, tables, work, scale=K_SCALE, dtype=dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    flat = cache.reshape(-1, 3, 40)
    for row, (seq, local) in ((13, (0, 13)), (21 + 6, (1, 6))):
        stored = flat[tables[seq, local // 4] * 4 + local % 4]
        assert torch.equal(got[row], (stored.float() * K_SCALE).to(dtype))
    into = torch.empty(work.num_rows + 5, 3, 40, dtype=dtype, device=DEVICE)  # a workspace
    assert torch.equal(gather_kv_triton(cache, tables, work, out=into[:work.num_rows],
                                        scale=K_SCALE), want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", _layouts(), ids=lambda x: x[0])
def test_planned_prefix_attention_over_fp8_cache_matches_reference(mode, layout):
    """Every planned path over an FP8 cache with its layer's scales: the gather (which now
    dequantizes, so the library path stays on), the tiled kernel and decode mode."""
    dtype = LOW[0]
    _, seq, lens, num_seqs = layout
    gen = torch.Generator().manual_seed(len(seq))
    k_cache, v_cache = _fp8_caches(gen)
    tables = torch.randperm(48, generator=gen)[:num_seqs * 12].view(num_seqs, 12).to(DEVICE)
    seq, lens = torch.tensor(seq), torch.tensor(lens)
    q = rand(seq.numel(), 8, D, dtype=dtype, gen=gen)
    shape = AttentionShape(8, 2, D, D, dtype, kv_dtype=FP8)
    backend = planned_backend(shape, mode, max_prefix_tokens=64)
    plan = backend._prefix_plan(seq, lens, num_seqs, shape)
    seq, lens = seq.to(DEVICE), lens.to(DEVICE)
    call = (q, k_cache, v_cache, tables, seq, lens, 0.3)
    got = backend.paged_attention(*call, k_scale=K_SCALE, v_scale=V_SCALE, plan=plan)
    want = REF.paged_attention(*call, k_scale=K_SCALE, v_scale=V_SCALE)
    assert_attention_close(got, want, dtype)
    assert (plan.library is not None) == (mode != "triton")
    if mode != "triton" and DEVICE == "cuda":  # (on CPU the backend starts without ops)
        assert backend._workspace[0].dtype == dtype  # it holds dequantized rows
    assert backend.host_plans == 0 and not backend.fallbacks
    unscaled = REF.paged_attention(*call)  # the scales matter
    assert not torch.allclose(unscaled[0].float(), want[0].float(), atol=1e-2)


@pytest.mark.parametrize("mode", ["gather-cudnn", "triton"])
def test_attention_context_fp8_steps_match_reference(mode):
    """AttentionContext with an FP8 cache and per-layer scales: a prefill of two prompts,
    then a chunk over the cached prefix beside a decode, planned ahead. Outputs match the
    reference backend and both write the same FP8 values (Triton's rounding writes +0 where
    PyTorch's writes -0: the same value)."""
    dtype, layout, groups = LOW[0], KVLayout(block_size=4), single_process_groups()
    tables = torch.arange(2 * 12).view(2, 12)
    shape = AttentionShape(4, 2, D, D, dtype, kv_dtype=FP8)
    backends = [REF, planned_backend(shape, mode, max_prefix_tokens=48)]
    caches = [[(torch.zeros(24, 4, 2, D, dtype=FP8, device=DEVICE),
                torch.zeros(24, 4, 2, D, dtype=FP8, device=DEVICE))] for _ in backends]
    gen = torch.Generator().manual_seed(13)
    scales = [(K_SCALE, V_SCALE)]
    for seqs in ([PlannedSeq(0, 27, False), PlannedSeq(0, 9, False)],
                 [PlannedSeq(27, 18, False), PlannedSeq(9, 1, False)]):
        host = build_step_tokens(seqs, tables, layout, groups).metadata
        meta = type(host)(**{n: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x)
                             for n, x in vars(host).items()})
        t = host.rep_pos.numel()
        q, k, v = (rand(t, h, D, dtype=dtype, gen=gen) for h in (4, 2, 2))
        outs = [AttentionContext(meta, c, groups, b, kv_scales=scales,
                                 plans=b.plan_step(host, "allgather"))
                .attention(0, q, k, v, 0.25) for b, c in zip(backends, caches)]
        lse = torch.zeros(outs[0].shape[:2], device=DEVICE)
        assert_attention_close((outs[1], lse), (outs[0], lse), dtype)
    plans = backends[1].plan_step(host, "allgather")
    assert (plans.rep_prefix.library is not None) == (mode != "triton")
    assert backends[1].host_plans == 0
    for (k_ref, v_ref), (k_gpu, v_gpu) in zip(caches[0], caches[1]):
        assert torch.equal(k_ref.float(), k_gpu.float())
        assert torch.equal(v_ref.float(), v_gpu.float())


def test_runner_fp8_chunked_steps_take_the_gather_path(tmp_path, monkeypatch):
    """The engine's path with --kv-cache-dtype fp8: the chunks over the FP8 cache gather
    their prefix (dequantized) for the library op, planned ahead, with the logits of the
    reference backend on the same FP8 cache and scales."""
    planned = _runner(tmp_path, "float16", 512, "planned", kv_cache_dtype="fp8")
    reference = _runner(tmp_path, "float16", 512, "reference", kv_cache_dtype="fp8")
    reference.backend = REF
    assert planned.kv_scales == reference.kv_scales and planned.kv_scales is not None
    assert planned.attention_shape().cache_dtype == FP8
    gathers, prefix_calls = [], []
    gather = gpu_backend.gather_kv_triton
    monkeypatch.setattr(gpu_backend, "gather_kv_triton",
                        lambda *a, **kw: gathers.append(kw["scale"]) or gather(*a, **kw))
    planned.backend.full_op = (lambda q, k, v, causal, scale: prefix_calls.append(k.dtype)
                               or reference_piece(q, k, v, causal, scale))
    for plan in _chunked_plans(150, 64):
        got, want = planned.execute(plan), reference.execute(plan)
        torch.testing.assert_close(got, want, atol=TOL[torch.float16]["out"], rtol=0)
    assert prefix_calls == [torch.float16] * 4  # chunks 2 and 3, in each of the two layers
    assert gathers == [s for layer in (0, 1, 0, 1) for s in planned.kv_scales[layer]]
    assert planned.backend.host_plans == 0
    # Layer 0's K/V come from the embeddings alone: the same FP8 values on both sides (deeper
    # layers' may differ by an e4m3 step where the attention outputs' rounding did).
    (k_ref, v_ref), (k_gpu, v_gpu) = reference.kv_caches[0], planned.kv_caches[0]
    assert k_gpu.dtype == v_gpu.dtype == FP8
    assert torch.equal(k_ref.float(), k_gpu.float())
    assert torch.equal(v_ref.float(), v_gpu.float())
