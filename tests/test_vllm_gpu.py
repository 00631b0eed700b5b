"""On GPUs: vLLM's graph flags set cpserve's decode CUDA graphs, and a two-node launch runs over
NCCL. Skipped without CUDA (CI has none); on the lent machines:

    python -m pytest -q tests/test_vllm_gpu.py     # one GPU for the first, two for the second
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cpserve import LLM, SamplingParams
from tests.checkpoints import random_prompts
from tests.test_vllm_commands import MAX_TOKENS, PROMPT, _serve_one, _stop, free_port

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def test_capture_sizes_are_the_decode_graph_buckets_and_none_means_eager():
    prompts = random_prompts([5, 9, 13])
    common = dict(device="cuda", num_kv_blocks=64, max_model_len=256)
    with LLM("tiny", enforce_eager=True, **common) as eager:
        one_ref, three_ref = _tokens(eager, prompts[:1]), _tokens(eager, prompts)
    with LLM("tiny", compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY",
                                         "cudagraph_capture_sizes": [1, 2]}, **common) as llm:
        graphs = llm.engine.executor.runner.graphs
        assert graphs is not None and graphs.buckets == [1, 2]
        assert _tokens(llm, prompts[:1]) == one_ref  # decodes of one request: bucket 1
        assert _tokens(llm, prompts) == three_ref  # three at once: above the last bucket
        assert set(graphs.graphs) == {(1, 1, 0), (2, 1, 0)}  # every bucket at start-up
        assert {key[0] for key, n in graphs.replays.items() if n} == {1}
    for flags in ({"compilation_config": {"cudagraph_mode": "NONE"}}, {"optimization_level": 0}):
        with LLM("tiny", **flags, **common) as llm:
            assert llm.engine.executor.runner.graphs is None


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_nodes_one_gpu_each_over_nccl():
    """Two "nodes" on one host, each seeing one GPU (as on two machines of one GPU each)."""
    with LLM("tiny", device="cuda", max_model_len=1024, num_kv_blocks=256) as llm:
        expected = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                       ignore_eos=True), use_tqdm=False)
    port, master = free_port(), free_port()
    common = ["-m", "cpserve.entrypoints.cli", "serve", "tiny", "-tp", "2", "--device", "cuda",
              "--max-model-len", "1024", "--num-kv-blocks", "256", "--nnodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(master)]
    node0_argv = ["--node-rank", "0", "--port", str(port)]

    def node(gpu: int, argv: list[str]) -> subprocess.Popen:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
        return subprocess.Popen([sys.executable, *common, *argv], env=env, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    node1 = node(1, ["--node-rank", "1", "--headless"])
    node0 = node(0, node0_argv)
    try:
        outcome = _serve_one(node0, node0_argv, others=[node1])
        assert outcome.served == expected[0].outputs[0].text, outcome.stderr
        _stop(node0)
        assert node1.wait(60) == 0, node1.stderr.read()
    finally:
        _stop(node0)
        _stop(node1)
