"""DeepSeek (MLA + MoE) under every parallel layout of up to 4 ranks: the single-process tokens,
and each rank holding exactly its shard of the latent cache.

MLA layouts: `dcp` divides `tp` (the latent is replicated over TP ranks, DCP shards it). The
tiny model has 4 heads, so tp is 1, 2 or 4. The ranks of a layout start once (a module-scoped
worker pool) and each case loads its engine into them. Every other layout runs steps of 16
new tokens or more in MLA's expanded form (only latents exchanged and cached; the prefix read
expanded without DCP, absorbed with it: attention/sharded.py), the others absorbed throughout.
"""

from __future__ import annotations

import os

import pytest
import torch

from cpserve import LLM
from cpserve.config import ParallelConfig
from cpserve.distributed.worker_pool import WorkerPool
from cpserve.engine.worker import start_worker_pool
from tests.checkpoints import (
    add_mtp_modules,
    greedy_with_logprobs,
    make_deepseek_checkpoint,
    make_successor_checkpoint,
    random_prompts,
)
from tests.kv_placement import assert_each_rank_holds_its_shard

LAYOUTS = [(2, 1, 1), (2, 1, 2), (4, 1, 1), (4, 1, 2), (4, 1, 4),
           (1, 2, 1), (1, 3, 1), (1, 4, 1), (2, 2, 1), (2, 2, 2)]
BLOCK_SIZE = 4
# Shorter than the number of shards, several blocks, long enough to split and to be chunked.
PROMPT_LENGTHS = [3, 19, 45]
NEW_TOKENS = 6
CHUNKED, WHOLE = 32, 8192  # max_num_batched_tokens: 45 = 32 + 13 continues after a prefix
# fp32; TP splits sums over heads and expert columns, collectives change their order.
LOGPROB_TOL = 1e-4
COMMON = dict(block_size=BLOCK_SIZE, num_kv_blocks=256, enable_prefix_caching=False, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # V3: q_lora, YaRN with both scales, noaux_tc routing with correction biases.
    return str(make_deepseek_checkpoint(tmp_path_factory.mktemp("deepseek-v3"), "deepseek-v3"))


def _generate(llm: LLM) -> list[tuple[list[int], list[float]]]:
    return greedy_with_logprobs(llm, PROMPT_LENGTHS, NEW_TOKENS)


@pytest.fixture(scope="module")
def reference(checkpoint):
    with LLM(checkpoint, max_num_batched_tokens=WHOLE, **COMMON) as llm:
        return _generate(llm)


EXPANDED_MIN_TOKENS = "16"


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"tp{p[0]}-pcp{p[1]}-dcp{p[2]}")
def pool(request):
    tp, pcp, dcp = request.param
    # Set before the ranks start (they read it from their environment), and for the driver.
    expanded = LAYOUTS.index(request.param) % 2 == 1
    saved = os.environ.get("CPSERVE_MLA_EXPANDED_MIN_TOKENS")
    os.environ["CPSERVE_MLA_EXPANDED_MIN_TOKENS"] = EXPANDED_MIN_TOKENS if expanded else "1000000"
    try:
        with start_worker_pool(ParallelConfig(tp, pcp, dcp), "cpu") as pool:
            yield pool
    finally:
        if saved is None:
            os.environ.pop("CPSERVE_MLA_EXPANDED_MIN_TOKENS")
        else:
            os.environ["CPSERVE_MLA_EXPANDED_MIN_TOKENS"] = saved


def _cases(pool: WorkerPool) -> list[tuple[int, str, int]]:
    """(interleave, exchange, max_num_batched_tokens), two per layout. Layouts alternate
    between two complementary pairs, so that across the PCP layouts every pair of values of
    any two settings occurs (and across the others, every interleave/chunking pair)."""
    p = pool.parallel
    flip = LAYOUTS.index((p.tp, p.pcp, p.dcp)) % 2
    if p.pcp == 1:
        pairs = [[(1, "allgather", CHUNKED), (BLOCK_SIZE, "allgather", WHOLE)],
                 [(1, "allgather", WHOLE), (BLOCK_SIZE, "allgather", CHUNKED)]]
    else:
        pairs = [[(1, "allgather", CHUNKED), (BLOCK_SIZE, "ring", WHOLE)],
                 [(1, "ring", WHOLE), (BLOCK_SIZE, "allgather", CHUNKED)]]
    return pairs[flip]


def _llm(pool: WorkerPool, checkpoint: str, **overrides) -> LLM:
    p = pool.parallel
    return LLM(checkpoint, worker_pool=pool, tensor_parallel_size=p.tp,
               prefill_context_parallel_size=p.pcp, decode_context_parallel_size=p.dcp,
               **{**COMMON, **overrides})


def test_same_tokens_as_one_process(pool, checkpoint, reference):
    for interleave, exchange, max_batched in _cases(pool):
        case = f"interleave={interleave} exchange={exchange} max_num_batched_tokens={max_batched}"
        with _llm(pool, checkpoint, cp_kv_cache_interleave_size=interleave,
                  pcp_kv_exchange=exchange, max_num_batched_tokens=max_batched) as llm:
            results = _generate(llm)
        for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results, reference):
            assert tokens == ref_tokens, case
            assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs),
                                  atol=LOGPROB_TOL), case


def test_each_rank_holds_its_shard_of_the_latent(pool, checkpoint):
    """With C = pcp * dcp shards each rank holds 1/C of a request's tokens (so with dcp = d
    and pcp = 1, 1/d); TP ranks outside one DCP group hold the same tokens (replicas)."""
    num_tokens = 37
    with _llm(pool, checkpoint) as llm:
        held = assert_each_rank_holds_its_shard(llm, BLOCK_SIZE, 1, num_tokens)
    shards = pool.parallel.pcp * pool.parallel.dcp
    for rank, count in enumerate(held):
        assert abs(count - num_tokens / shards) < 1, f"rank {rank} holds {count}"


# Speculative decoding with the checkpoint's MTP module, under every layout ------------------------
MTP = {"method": "deepseek_mtp", "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def mtp_checkpoint(checkpoint, tmp_path_factory):
    """The same model with a random MTP module added (its main weights unchanged)."""
    import shutil

    path = tmp_path_factory.mktemp("deepseek-v3-mtp") / "model"
    shutil.copytree(checkpoint, path)
    return add_mtp_modules(path)


def test_speculative_mtp_same_tokens_as_one_process(pool, mtp_checkpoint, reference):
    """MTP drafts (random module: mostly wrong) verified over the sharded latent cache, the
    module's own cache sharded alike; chunked prompts, then the same prompts again as
    prefix-cache hits: the single-process tokens and logprobs, speculation off."""
    p = pool.parallel
    interleave = BLOCK_SIZE if LAYOUTS.index((p.tp, p.pcp, p.dcp)) % 2 else 1
    with _llm(pool, str(mtp_checkpoint), speculative_config=MTP, enable_prefix_caching=True,
              max_num_batched_tokens=CHUNKED, cp_kv_cache_interleave_size=interleave) as llm:
        runs = [_generate(llm), _generate(llm)]
        stats = llm.engine.stats()
    for results in runs:
        for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results, reference):
            assert tokens == ref_tokens, f"interleave={interleave}"
            assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs),
                                  atol=LOGPROB_TOL)
    assert stats.spec_decode.num_draft_tokens > 0 and stats.prefix_cache_hits_total > 0


def test_speculative_mtp_right_drafts_are_accepted_across_pcp(pool, mtp_checkpoint, tmp_path):
    """Drafts that are right (a constructed model, tests/checkpoints.py) are all accepted when
    the prompts' last chunks are split over the PCP ranks (the drafting row gathered)."""
    from tests.test_spec_decode_engine import assert_successor_drafts_accepted

    if pool.parallel.pcp == 1:
        pytest.skip("the split case needs PCP; layouts without it run the test above")
    path, succ = make_successor_checkpoint(tmp_path / "succ", mtp_checkpoint)
    with _llm(pool, str(path), speculative_config=MTP) as llm:
        assert_successor_drafts_accepted(llm, succ, random_prompts(PROMPT_LENGTHS))
