"""MLA's cached prefix read in the expanded form (attention/forms.py, latent_prefix.py).

  reference   `latent_prefix_attention` (prefix latents up-projected, then attended) equals the
              absorbed paged attention taken to value space, over a model-dtype and an FP8 cache;
  GPU         the backend's planned path (gather, expand into the workspace in pieces, library
              op, LSE merge; decodes and small groups absorbed in the paged kernel) equals the
              reference: on CPU the Triton kernels run in the interpreter and reference pieces
              stand in for cuDNN (as in test_kernels_prefix.py);
  end to end  a tiny DeepSeek-V2 (fp32, the reference backend on CPU) with chunked prompts and
              prefix-cache hits: the tokens and logprobs of transformers, with the prefix
              read expanded or absorbed.
PCP and DCP layouts: tests/test_deepseek_context_parallel.py (its expanded layouts without DCP
read the prefix expanded, those with DCP absorbed).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_kernels import DEVICE, TOL, assert_attention_close  # noqa: E402
from test_kernels_backend import reference_piece  # noqa: E402

from cpserve import LLM, SamplingParams  # noqa: E402
from cpserve.attention import gpu_backend, latent_prefix  # noqa: E402
from cpserve.attention.backend import AttentionShape, TorchReferenceBackend  # noqa: E402
from cpserve.attention.context import AttentionContext  # noqa: E402
from cpserve.attention.forms import LatentForms  # noqa: E402
from cpserve.attention.gpu_backend import GPUBackend  # noqa: E402
from cpserve.attention.kernels import prefix_plan  # noqa: E402
from cpserve.attention.latent_prefix import LatentWorkspace  # noqa: E402
from cpserve.attention.metadata import PlannedSeq, build_step_tokens  # noqa: E402
from cpserve.distributed.groups import single_process_groups  # noqa: E402
from cpserve.kv.layout import KVLayout  # noqa: E402
from cpserve.quantization.fp8 import FP8, to_fp8  # noqa: E402
from tests.checkpoints import (  # noqa: E402
    hf_greedy,
    load_hf_model,
    make_deepseek_checkpoint,
    random_prompts,
)

REF = TorchReferenceBackend()
# Small on CPU (the interpreter); on a GPU, widths the library ops are known to take.
HEADS, NOPE, ROPE, V, LATENT = (4, 32, 32, 32, 64) if DEVICE == "cuda" else (4, 16, 8, 16, 32)
BLOCK, BLOCKS = 4, 32


def _forms(dtype, gen) -> LatentForms:
    kv_b = (torch.randn(HEADS * (NOPE + V), LATENT, generator=gen) / LATENT ** 0.5)
    return LatentForms(kv_b.to(DEVICE, dtype), HEADS, NOPE, V, LATENT)


def _cache(dtype, gen, k_scale: float):
    latent = torch.randn(BLOCKS, BLOCK, 1, LATENT + ROPE, generator=gen)
    if dtype == FP8:
        return to_fp8(latent / k_scale).to(DEVICE)
    return latent.to(DEVICE, dtype)


def _absorbed(q, cache, tables, seq, lens, scale, forms, k_scale):
    out, lse = REF.paged_attention(forms.cached_query(q), cache, None, tables, seq, lens, scale,
                                   LATENT, k_scale, k_scale)
    return forms.cached_output(out), lse


def _rows():
    """24 rows of sequence 0 over 27 cached tokens, a decode of sequence 1 over 9, a row that
    sees nothing, 10 rows of sequence 1 over 13."""
    seq = torch.tensor([0] * 24 + [1, 0] + [1] * 10)
    lens = torch.tensor([27] * 24 + [9, 0] + [13] * 10)
    return seq, lens


@pytest.mark.parametrize("cache_dtype", [torch.float32, FP8])
def test_reference_expanded_prefix_equals_absorbed(cache_dtype):
    gen = torch.Generator().manual_seed(0)
    k_scale = 0.5 if cache_dtype == FP8 else 1.0
    forms, cache = _forms(torch.float32, gen), _cache(cache_dtype, gen, k_scale)
    tables = torch.randperm(BLOCKS, generator=gen).view(2, 16).to(DEVICE)
    seq, lens = (t.to(DEVICE) for t in _rows())
    q = torch.randn(seq.numel(), HEADS, NOPE + ROPE, generator=gen).to(DEVICE)
    got = REF.latent_prefix_attention(q, cache, tables, seq, lens, 0.3, forms, k_scale)
    want = _absorbed(q, cache, tables, seq, lens, 0.3, forms, k_scale)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert torch.isinf(got[1][25]).all() and not got[0][25].any()  # the row that sees nothing


def _shape(dtype, cache_dtype) -> AttentionShape:
    return AttentionShape(HEADS, 1, LATENT + ROPE, LATENT, dtype, values_in_keys=True,
                          kv_dtype=cache_dtype, expanded_dims=(NOPE + ROPE, V))


def _backend(shape, monkeypatch, pieces: list, piece_tokens: int = 8) -> GPUBackend:
    monkeypatch.setattr(latent_prefix, "MLA_PREFIX_PIECE_TOKENS", piece_tokens)
    backend = GPUBackend(DEVICE, shape=shape, max_prefix_tokens=64)
    if DEVICE != "cuda":  # no library ops at start-up: the workspace is made here
        backend.ops = {"cudnn": True, "flash": False}
        backend.causal_op = reference_piece
        backend.latent_piece_tokens = piece_tokens
        backend._latent_workspace = LatentWorkspace(shape, piece_tokens, torch.device(DEVICE))
    library = backend.full_op if DEVICE == "cuda" else reference_piece
    backend.full_op = (lambda q, k, v, causal, scale: pieces.append(k.shape[0])
                       or library(q, k, v, causal, scale))
    return backend


@pytest.fixture(autouse=True)
def small_groups(monkeypatch):
    monkeypatch.setattr(prefix_plan, "MIN_LIBRARY_QUERIES", 8)


@pytest.mark.parametrize("cache_dtype", [torch.float16, FP8])
def test_planned_expanded_prefix_matches_reference(cache_dtype, monkeypatch):
    """Groups in pieces of 8 tokens from the workspace (27 = 8 + 8 + 8 + 3, 13 = 8 + 5), the
    decode absorbed, the empty row empty."""
    dtype, gen, pieces = torch.float16, torch.Generator().manual_seed(1), []
    k_scale = 0.5 if cache_dtype == FP8 else 1.0
    backend = _backend(_shape(dtype, cache_dtype), monkeypatch, pieces)
    assert backend._latent_workspace is not None and backend._latent_workspace.tokens == 8
    forms, cache = _forms(dtype, gen), _cache(cache_dtype, gen, k_scale)
    tables = torch.randperm(BLOCKS, generator=gen).view(2, 16).to(DEVICE)
    seq, lens = _rows()
    q = torch.randn(seq.numel(), HEADS, NOPE + ROPE, generator=gen).to(DEVICE, dtype)
    plan = backend._latent_plan(seq, lens, 2)
    assert [len(g.pieces) for g in plan.groups] == [4, 2] and plan.absorbed is not None
    args = (q, cache, tables, seq.to(DEVICE), lens.to(DEVICE), 0.3, forms, k_scale)
    got = backend.latent_prefix_attention(*args, plan=plan)
    assert_attention_close(got, REF.latent_prefix_attention(*args), dtype)
    assert pieces == [8, 8, 8, 3, 8, 5] and backend.host_plans == 0
    unplanned = backend.latent_prefix_attention(*args)  # plans at call time, once
    assert_attention_close(unplanned, got, dtype)
    assert backend.host_plans == 1


def test_workspace_size():
    shape = AttentionShape(16, 1, 576, 512, torch.bfloat16, values_in_keys=True,
                           expanded_dims=(192, 128))
    # latents, the GEMM's [H * 256], keys and padded values [H * 192] each: 10816 a token.
    assert LatentWorkspace.nbytes(shape, 8192) == 8192 * 10816 * 2
    assert LatentWorkspace.piece_tokens(shape, 1 << 17) == 8192
    assert LatentWorkspace.piece_tokens(shape, 5000) == 5000  # one request's prefix at most
    many_heads = AttentionShape(128, 1, 576, 512, torch.bfloat16, values_in_keys=True,
                                expanded_dims=(192, 128))  # V3 on one rank: within 256 MiB
    assert LatentWorkspace.piece_tokens(many_heads, 1 << 17) == (256 << 20) // 164992


def test_attention_context_chunk_planned_ahead(monkeypatch):
    """A chunk continuing a prompt beside a decode, through the attention context: the
    step's plans serve the expanded prefix (no plan in a layer) and the outputs and cache
    match the reference backend's."""
    dtype, layout, groups = torch.float16, KVLayout(block_size=BLOCK), single_process_groups()
    gen, pieces = torch.Generator().manual_seed(2), []
    backend = _backend(_shape(dtype, dtype), monkeypatch, pieces)
    monkeypatch.setattr(gpu_backend, "SMALL_DENSE_PAIRS", 0)
    backends = [REF, backend]
    tables = torch.arange(2 * 16).view(2, 16)
    caches = [[(torch.zeros(BLOCKS, BLOCK, 1, LATENT + ROPE, dtype=dtype, device=DEVICE), None)]
              for _ in backends]
    forms = _forms(dtype, gen)
    for seqs in ([PlannedSeq(0, 19, False), PlannedSeq(0, 6, False)],
                 [PlannedSeq(19, 12, False), PlannedSeq(6, 1, False)]):
        host = build_step_tokens(seqs, tables, layout, groups).metadata
        meta = type(host)(**{n: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x)
                             for n, x in vars(host).items()})
        t = host.rep_pos.numel()
        q = torch.randn(t, HEADS, NOPE + ROPE, generator=gen).to(DEVICE, dtype)
        k = torch.randn(t, 1, LATENT + ROPE, generator=gen).to(DEVICE, dtype)
        outs = [AttentionContext(meta, c, groups, b, plans=b.plan_step(host, "allgather"))
                .attention(0, q, k, None, 0.3, v_dim=LATENT, forms=forms)
                for b, c in zip(backends, caches)]
        torch.testing.assert_close(outs[1], outs[0], atol=TOL[dtype]["out"], rtol=0)
    assert pieces[-3:] == [8, 8, 3]  # the 12-token chunk over its 19 cached tokens
    assert backend.host_plans == 0
    assert torch.equal(caches[0][0][0], caches[1][0][0])


# end to end ----------------------------------------------------------------------------------
DOC = 40  # shared by the prompts: cached once, then hit
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    path = make_deepseek_checkpoint(tmp_path_factory.mktemp("deepseek-v2"), "deepseek-v2")
    doc = random_prompts([DOC], seed=3)[0]
    prompts = [doc + tail for tail in random_prompts([5, 21, 9], seed=4)]
    return path, prompts, hf_greedy(load_hf_model(path), prompts, NEW_TOKENS)


@pytest.mark.parametrize("expand_prefix", ["1", "0"])
def test_chunked_prompts_and_prefix_hits_match_transformers(deepseek, expand_prefix,
                                                            monkeypatch):
    """Chunks of 4 and 16 tokens over cached prefixes and prefix-cache hits (steps of 8 new
    tokens or more take the expanded form), with the prefix read expanded and absorbed."""
    from cpserve.attention import backend as backend_module

    path, prompts, reference = deepseek
    monkeypatch.setenv("CPSERVE_MLA_EXPANDED_MIN_TOKENS", "8")
    monkeypatch.setenv("CPSERVE_MLA_EXPANDED_PREFIX", expand_prefix)
    calls = []
    expanded = backend_module.TorchReferenceBackend.latent_prefix_attention
    monkeypatch.setattr(backend_module.TorchReferenceBackend, "latent_prefix_attention",
                        lambda self, *a, **kw: calls.append(1) or expanded(self, *a, **kw))
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    with LLM(str(path), device="cpu", block_size=4, max_num_batched_tokens=16,
             num_kv_blocks=256, enable_prefix_caching=True, seed=0) as llm:
        outputs = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0]
                   for p in prompts]  # one at a time: the later ones hit the document
        assert llm.engine.stats().prefix_cache_hits_total >= 2 * DOC // 4 * 4
        llm.engine.check_integrity()
    assert bool(calls) == (expand_prefix == "1")
    for out, (ref_tokens, ref_logprobs) in zip(outputs, reference):
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        ours = [completion.logprobs[i][t].logprob for i, t in enumerate(completion.token_ids)]
        assert torch.allclose(torch.tensor(ours), torch.tensor(ref_logprobs), atol=1e-4)
