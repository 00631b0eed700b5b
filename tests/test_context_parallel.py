"""Every parallel layout gives the single-process tokens, and each rank holds its KV shard.

The ranks of a layout are started once per layout (a module-scoped worker pool) and every
case (interleave size, K/V exchange, chunked prefill) loads its engine into them.
"""

from __future__ import annotations

import pytest
import torch

from cpserve import LLM, SamplingParams
from cpserve.config import ParallelConfig
from cpserve.distributed.worker_pool import WorkerPool
from cpserve.engine.worker import start_worker_pool
from tests.checkpoints import greedy_with_logprobs, random_prompts
from tests.kv_placement import assert_each_rank_holds_its_shard

LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 4, 1), (2, 1, 2), (2, 2, 1), (2, 2, 2), (4, 1, 2), (4, 1, 4)]
BLOCK_SIZE = 4
# Shorter than the number of shards, around a block, several blocks, long enough to split.
PROMPT_LENGTHS = [1, 3, 7, 19, 45, 70]
MIN_SPLIT = 40  # --pcp-min-split-tokens of one case: 45 and 70 split, the others replicated
NEW_TOKENS = 12
# fp32; collectives only change the order of summation.
LOGPROB_TOL = 1e-4
COMMON = dict(block_size=BLOCK_SIZE, num_kv_blocks=512, max_model_len=256,
              enable_prefix_caching=False, seed=0)


def _generate(llm: LLM) -> list[tuple[list[int], list[float]]]:
    return greedy_with_logprobs(llm, PROMPT_LENGTHS, NEW_TOKENS)


@pytest.fixture(scope="module")
def reference():
    with LLM("tiny", **COMMON) as llm:
        return _generate(llm)


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda x: f"tp{x[0]}-pcp{x[1]}-dcp{x[2]}")
def pool(request):
    tp, pcp, dcp = request.param
    with start_worker_pool(ParallelConfig(tp, pcp, dcp), "cpu") as pool:
        yield pool


def _cases(pool: WorkerPool):
    """(interleave, exchange, max_num_batched_tokens): every value of each setting, and every
    pair of values of any two settings (a pairwise design: 4 runs instead of 8). Chunked
    runs schedule asynchronously (`test_same_tokens_as_one_process`); the last PCP case
    splits only chunks of at least MIN_SPLIT tokens, the shorter prompts run unsplit."""
    chunked, whole = 16, 8192
    if pool.parallel.pcp == 1:  # no PCP exchange happens
        return [(1, "allgather", whole), (1, "allgather", chunked),
                (BLOCK_SIZE, "allgather", whole), (BLOCK_SIZE, "allgather", chunked)]
    return [(1, "allgather", whole), (1, "ring", chunked),
            (BLOCK_SIZE, "allgather", chunked), (BLOCK_SIZE, "ring", whole)]


def _count_split_requests(llm: LLM) -> list[int]:
    """The new-token counts of the requests the driver's steps split over the PCP ranks (every
    rank decides from the same config), filled in as the engine runs."""
    runner, split = llm.engine.executor.runner, []
    is_split = runner._is_split

    def recording(request):
        if is_split(request):
            split.append(len(request.token_ids))
            return True
        return False

    runner._is_split = recording
    return split


def _llm(pool: WorkerPool, **overrides) -> LLM:
    p = pool.parallel
    return LLM("tiny", worker_pool=pool, tensor_parallel_size=p.tp,
               prefill_context_parallel_size=p.pcp, decode_context_parallel_size=p.dcp,
               **{**COMMON, **overrides})


def test_same_tokens_as_one_process(pool, reference):
    for interleave, exchange, max_batched in _cases(pool):
        case = f"interleave={interleave} exchange={exchange} max_num_batched_tokens={max_batched}"
        # Async scheduling where prompts are chunked: pending decode tokens broadcast to every
        # rank while chunks and PCP splits run beside them.
        overlap = max_batched < 8192
        case += f" async_scheduling={overlap}"
        min_split = MIN_SPLIT if (pool.parallel.pcp > 1 and exchange == "ring"
                                  and max_batched == 8192) else 0
        case += f" pcp_min_split_tokens={min_split}"
        with _llm(pool, cp_kv_cache_interleave_size=interleave, pcp_kv_exchange=exchange,
                  max_num_batched_tokens=max_batched, async_scheduling=overlap,
                  pcp_min_split_tokens=min_split) as llm:
            if min_split:
                splits = _count_split_requests(llm)
            results = _generate(llm)
        if min_split:  # the threshold decided which prefills were split
            assert sorted(splits) == [n for n in PROMPT_LENGTHS if n >= MIN_SPLIT], case
        for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results, reference):
            assert tokens == ref_tokens, case
            assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs),
                                  atol=LOGPROB_TOL), case


@pytest.mark.parametrize("interleave", [1, BLOCK_SIZE])
def test_each_rank_holds_exactly_its_shard(pool, interleave):
    with _llm(pool, cp_kv_cache_interleave_size=interleave) as llm:
        assert_each_rank_holds_its_shard(llm, BLOCK_SIZE, interleave)


# Prefix caching under every layout ------------------------------------------------------------
DOC = random_prompts([53], seed=7)[0]
QUESTIONS = random_prompts([2, 9, 17], seed=8)
SHARED_PROMPTS = [DOC + q for q in QUESTIONS]


def _generate_shared(llm: LLM, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.check_integrity()
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def shared_reference():
    with LLM("tiny", **COMMON) as llm:  # prefix caching off
        return _generate_shared(llm, SHARED_PROMPTS)


def test_prefix_cache_same_tokens_and_hits(pool, shared_reference):
    with _llm(pool, enable_prefix_caching=True, max_num_batched_tokens=32) as llm:
        # Across batches: the document is cached by the first request, hit by the others.
        assert _generate_shared(llm, SHARED_PROMPTS[:1]) == shared_reference[:1]
        assert _generate_shared(llm, SHARED_PROMPTS[1:]) == shared_reference[1:]
        stats = llm.engine.stats()
        block = BLOCK_SIZE * pool.parallel.pcp * pool.parallel.dcp
        assert stats.prefix_cache_hits_total >= 2 * (len(DOC) // block) * block
        # In one batch, and again (everything now cached up to the last full block).
        assert _generate_shared(llm, SHARED_PROMPTS) == shared_reference
        assert llm.engine.stats().prefix_cache_hits_total > stats.prefix_cache_hits_total


def test_prefix_cache_eviction_under_block_pressure(pool, shared_reference):
    # Room for about two requests: cached blocks of finished ones must be evicted and reused.
    virtual_block = BLOCK_SIZE * pool.parallel.pcp * pool.parallel.dcp
    blocks = 2 * -(-(len(SHARED_PROMPTS[2]) + 6) // virtual_block)
    with _llm(pool, enable_prefix_caching=True, num_kv_blocks=blocks,
              max_model_len=blocks * virtual_block) as llm:
        for _ in range(2):
            for prompt, expected in zip(SHARED_PROMPTS, shared_reference):
                assert _generate_shared(llm, [prompt]) == [expected]
            unrelated = random_prompts([40, 41], seed=9)
            _generate_shared(llm, unrelated)
        assert llm.engine.kv.pool.num_free == blocks


# Speculative decoding (n-gram) under every layout -----------------------------------------------
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}


def test_speculative_ngram_same_tokens_as_one_process(pool, reference, shared_reference):
    """Drafts verified over the sharded KV (per-query visible lengths on each shard), chunked
    prompts, interleave 1 or a block by layout, and prefix-cache hits: the single-process
    tokens and logprobs, speculation off."""
    p = pool.parallel
    interleave = BLOCK_SIZE if LAYOUTS.index((p.tp, p.pcp, p.dcp)) % 2 else 1
    with _llm(pool, speculative_config=NGRAM, enable_prefix_caching=True,
              max_num_batched_tokens=16, cp_kv_cache_interleave_size=interleave) as llm:
        results = _generate(llm)
        # In one batch the later prompts find the document's blocks the first one computed.
        assert _generate_shared(llm, SHARED_PROMPTS) == shared_reference
        stats = llm.engine.stats()
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results, reference):
        assert tokens == ref_tokens, f"interleave={interleave}"
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs),
                              atol=LOGPROB_TOL)
    assert stats.spec_decode.num_accepted_tokens > 0 and stats.prefix_cache_hits_total > 0


# Prompt logprobs with the prefix cache on: every prompt token, as transformers computes it ----


@pytest.fixture(scope="module")
def hf_prompt_logprobs():
    from cpserve.models.demo import ensure_tiny_model
    from tests.checkpoints import load_hf_model

    model = load_hf_model(ensure_tiny_model())
    result = []
    for prompt in SHARED_PROMPTS:
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0].float()
        logprobs = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None])
        result.append(logprobs.squeeze(1).tolist())
    return result


def test_prompt_logprobs_with_prefix_cache_match_transformers(pool, hf_prompt_logprobs):
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=1)
    with _llm(pool, enable_prefix_caching=True, max_num_batched_tokens=32) as llm:
        _generate_shared(llm, SHARED_PROMPTS[:1])  # caches the document's blocks
        outputs = llm.generate([{"prompt_token_ids": p} for p in SHARED_PROMPTS], params,
                               use_tqdm=False)
        llm.engine.check_integrity()
    for out, prompt, expected in zip(outputs, SHARED_PROMPTS, hf_prompt_logprobs):
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        ours = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
        assert torch.allclose(torch.tensor(ours), torch.tensor(expected), atol=LOGPROB_TOL)
