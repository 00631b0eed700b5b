"""MoE models under parallel layouts: the single-process tokens, with experts TP-sliced and
with expert parallelism (`enable_expert_parallel`: whole experts per rank, tokens gathered
over PCP and every expert's output all-reduced).

Qwen-MoE is GQA with 2 KV heads: tp 4 holds each head twice, so dcp 2 shards it. The ranks of
a layout start once (a module-scoped pool); each case loads its engine into them. Prompts of 3
tokens stay replicated while longer ones are split over PCP, so a step can mix both (the EP
gather pads to the rank with the most rows); with 32 tokens a step, the 45-token prompt
continues after a cached chunk.
"""

from __future__ import annotations

import pytest
import torch

from cpserve import LLM
from cpserve.config import ParallelConfig
from cpserve.distributed.worker_pool import WorkerPool
from cpserve.engine.worker import start_worker_pool
from cpserve.models.moe import MoE
from tests.checkpoints import (
    greedy_with_logprobs,
    make_checkpoint,
    make_deepseek_checkpoint,
)

LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (4, 1, 2)]
# (checkpoint, expert parallel); Qwen2-MoE has a gated shared expert, DeepSeek-V3 grouped
# routing with correction biases and a shared expert, over MLA.
CASES = [("qwen3-moe", False), ("qwen2-moe", False), ("qwen3-moe", True), ("qwen2-moe", True),
         ("deepseek-v3", True)]
PROMPT_LENGTHS = [3, 19, 45]
NEW_TOKENS = 6
# fp32; collectives and expert placement only change the order of sums.
LOGPROB_TOL = 1e-4
COMMON = dict(block_size=4, num_kv_blocks=256, enable_prefix_caching=False, seed=0,
              max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for kind in ("qwen2-moe", "qwen3-moe"):
        paths[kind] = str(make_checkpoint(tmp_path_factory.mktemp(kind), kind))
    paths["deepseek-v3"] = str(make_deepseek_checkpoint(tmp_path_factory.mktemp("ds"),
                                                        "deepseek-v3"))
    return paths


def _generate(llm: LLM) -> list[tuple[list[int], list[float]]]:
    return greedy_with_logprobs(llm, PROMPT_LENGTHS, NEW_TOKENS)


@pytest.fixture(scope="module")
def references(checkpoints):
    results = {}
    for kind, path in checkpoints.items():
        with LLM(path, **COMMON) as llm:
            results[kind] = _generate(llm)
    return results


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"tp{p[0]}-pcp{p[1]}-dcp{p[2]}")
def pool(request):
    tp, pcp, dcp = request.param
    with start_worker_pool(ParallelConfig(tp, pcp, dcp), "cpu") as pool:
        yield pool


@pytest.mark.parametrize("kind,expert_parallel", CASES,
                         ids=[f"{k}-{'ep' if ep else 'tp'}" for k, ep in CASES])
def test_same_tokens_as_one_process(pool: WorkerPool, checkpoints, references, kind,
                                    expert_parallel):
    p = pool.parallel
    with LLM(checkpoints[kind], worker_pool=pool, tensor_parallel_size=p.tp,
             prefill_context_parallel_size=p.pcp, decode_context_parallel_size=p.dcp,
             enable_expert_parallel=expert_parallel, **COMMON) as llm:
        moe = next(layer.mlp for layer in llm.engine.executor.runner.model.model.layers
                   if isinstance(layer.mlp, MoE))
        results = _generate(llm)
    experts = 16 if kind == "deepseek-v3" else 8
    # The driver's share: whole experts under EP, a TP slice of all of them otherwise.
    assert moe.experts.count == (experts // p.world_size if expert_parallel else experts)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results, references[kind]):
        assert tokens == ref_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs),
                              atol=LOGPROB_TOL)
