"""FP8 under every kind of parallel layout: each gives the single-process tokens.

Block-FP8 weights (TP slices of 128 x 128 blocks and their scales), the FP8 KV cache (scales
measured on all ranks together, K/V quantized on whichever shard holds them) and DeepSeek's
latent cache in FP8 (MLA + MoE, experts dequantized at load). The ranks of a layout start once
(a module-scoped worker pool) and every case loads its engine into them. The PCP layouts run
MLA's steps of 16 new tokens or more in the expanded form (the FP8 latents exchanged and
cached, up-projected for the step's own part), the references absorbed throughout.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from cpserve import LLM
from cpserve.config import ParallelConfig
from cpserve.engine.worker import start_worker_pool
from tests.checkpoints import greedy_with_logprobs
from tests.fp8_checkpoints import make_fp8_pair

# tp 2 with dcp 2 (the one KV head's copies become shards), pcp 2, and all three.
LAYOUTS = [(2, 1, 2), (1, 2, 1), (2, 2, 2)]
BLOCK_SIZE = 4
PROMPT_LENGTHS = [3, 19, 45]
NEW_TOKENS = 6
# fp32; collectives and TP only change the order of summation.
LOGPROB_TOL = 1e-4
# With an FP8 cache that reorder can flip a K/V element within an fp32 ulp of an e4m3 rounding
# boundary to the next e4m3 value (2^-4 relative on it): deepseek's seed-0 checkpoint under
# PCP moves one logprob by 2e-4 so (other seeds: 2e-6). A cache read with a wrong scale or a
# wrong value moves them by far more (0.006 on average for e4m3 against bf16 itself).
FP8_KV_LOGPROB_TOL = 1e-3
COMMON = dict(block_size=BLOCK_SIZE, num_kv_blocks=256, enable_prefix_caching=False, seed=0)
# (model, kv_cache_dtype, engine settings): the FP8 cache with chunked prefill and the ring
# exchange, so that chunks read FP8 K/V other ranks wrote; --quantization fp8 of a bf16
# checkpoint (a row-parallel shard's per-channel scales are those of the whole rows).
CASES = [("llama", "auto", {}),
         ("llama", "fp8", dict(max_num_batched_tokens=32, pcp_kv_exchange="ring",
                               cp_kv_cache_interleave_size=BLOCK_SIZE)),
         ("deepseek", "fp8", dict(max_num_batched_tokens=32)),
         ("llama-bf16", "auto", dict(quantization="fp8"))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    llama, llama_bf16 = make_fp8_pair(tmp_path_factory.mktemp("llama"), "llama3", "block")
    return {"llama": str(llama), "llama-bf16": str(llama_bf16),
            "deepseek": str(make_fp8_pair(tmp_path_factory.mktemp("ds"), "deepseek-v3",
                                          "block")[0])}


def _generate(llm: LLM) -> list[tuple[list[int], list[float]]]:
    return greedy_with_logprobs(llm, PROMPT_LENGTHS, NEW_TOKENS)


@contextlib.contextmanager
def _mla_expanded_min_tokens(value: str):
    """CPSERVE_MLA_EXPANDED_MIN_TOKENS for the driver and for ranks started meanwhile."""
    saved = os.environ.get("CPSERVE_MLA_EXPANDED_MIN_TOKENS")
    os.environ["CPSERVE_MLA_EXPANDED_MIN_TOKENS"] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CPSERVE_MLA_EXPANDED_MIN_TOKENS")
        else:
            os.environ["CPSERVE_MLA_EXPANDED_MIN_TOKENS"] = saved


@pytest.fixture(scope="module")
def references(checkpoints):
    """One process, whole prompts, for each (model, kv_cache_dtype); MLA absorbed."""
    results = {}
    with _mla_expanded_min_tokens("1000000"):
        for model, kv_dtype, settings in CASES:
            quantization = settings.get("quantization")
            with LLM(checkpoints[model], kv_cache_dtype=kv_dtype, quantization=quantization,
                     **COMMON) as llm:
                results[model, kv_dtype] = _generate(llm)
    return results


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"tp{p[0]}-pcp{p[1]}-dcp{p[2]}")
def pool(request):
    tp, pcp, dcp = request.param
    with _mla_expanded_min_tokens("16" if pcp > 1 else "1000000"):
        with start_worker_pool(ParallelConfig(tp, pcp, dcp), "cpu") as pool:
            yield pool


def test_same_tokens_as_one_process(pool, checkpoints, references):
    p = pool.parallel
    for model, kv_dtype, settings in CASES:
        case = f"{model} kv_cache_dtype={kv_dtype} {settings}"
        with LLM(checkpoints[model], worker_pool=pool, tensor_parallel_size=p.tp,
                 prefill_context_parallel_size=p.pcp, decode_context_parallel_size=p.dcp,
                 kv_cache_dtype=kv_dtype, **{**COMMON, **settings}) as llm:
            if kv_dtype == "fp8":
                assert llm.engine.executor.runner.kv_spec.dtype == torch.float8_e4m3fn
            results = _generate(llm)
        for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results,
                                                                  references[model, kv_dtype]):
            assert tokens == ref_tokens, case
            tol = FP8_KV_LOGPROB_TOL if kv_dtype == "fp8" else LOGPROB_TOL
            assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs),
                                  atol=tol), case
