"""Speculative decoding on a GPU: the Triton kernels, CUDA graphs of verification steps and the
MTP drafter, against speculation off. Skipped without CUDA (CI has none); on the lent GPU:
`python -m pytest -q tests/test_gpu_spec_decode.py tests/test_spec_kernels.py`.

fp32 models, so that the graphed verification steps (tiled paged kernel, q rows a request)
and the eager decode steps of the reference differ only in summation order and greedy
tokens must agree exactly, as on CPU.
"""

from __future__ import annotations

import pytest
import torch

from cpserve import LLM, SamplingParams
from tests.checkpoints import (
    add_mtp_modules,
    make_checkpoint,
    make_deepseek_checkpoint,
    make_successor_checkpoint,
    random_prompts,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
MTP = {"method": "deepseek_mtp", "num_speculative_tokens": 3}
# max_model_len within the 512 positions of the tiny DeepSeek checkpoints (config.py refuses
# more).
COMMON = dict(dtype="float32", num_kv_blocks=1024, max_model_len=512, block_size=16,
              max_num_batched_tokens=128, max_num_seqs=8)
# Repeating prompts (n-gram drafts from the first step), chunked ones, and a batch of 8.
PROMPTS = [p + p for p in random_prompts([30, 200, 9, 60, 17, 90, 3, 45])]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def greedy(llm: LLM, prompts) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    llm.engine.check_integrity()
    return [o.outputs[0].token_ids for o in outputs]


def verification_graphs(llm: LLM) -> list:
    """Graphs of verification steps (q > 1 rows a request) that steps replayed (all of them
    are captured at start-up)."""
    graphs = llm.engine.executor.runner.graphs
    return [key for key, n in graphs.replays.items() if key[1] > 1 and n]


def test_ngram_with_verification_graphs_gives_the_tokens_of_speculation_off(tmp_path):
    path = str(make_checkpoint(tmp_path / "llama", "llama3", num_attention_heads=8,
                               num_key_value_heads=2, hidden_size=256, intermediate_size=512,
                               max_position_embeddings=2048))
    with LLM(path, enforce_eager=True, **COMMON) as llm:
        reference = greedy(llm, PROMPTS)
    with LLM(path, speculative_config=NGRAM, **COMMON) as llm:
        assert greedy(llm, PROMPTS) == reference
        assert verification_graphs(llm), "no verification step replayed a graph"
        assert llm.engine.stats().spec_decode.num_accepted_tokens > 0


def test_mtp_on_gpu_gives_the_tokens_of_speculation_off_and_accepts_right_drafts(tmp_path):
    mtp = add_mtp_modules(make_deepseek_checkpoint(tmp_path / "v3", "deepseek-v3"))
    with LLM(str(mtp), enforce_eager=True, **COMMON) as llm:
        reference = greedy(llm, PROMPTS)
    with LLM(str(mtp), speculative_config=MTP, **COMMON) as llm:
        assert greedy(llm, PROMPTS) == reference
        assert verification_graphs(llm)
    path, succ = make_successor_checkpoint(tmp_path / "succ", mtp)
    with LLM(str(path), speculative_config=MTP, **COMMON) as llm:
        tokens = greedy(llm, PROMPTS[:4])
        spec = llm.engine.stats().spec_decode
    for prompt, out in zip(PROMPTS[:4], tokens):
        expected, token = [], prompt[-1]
        for _ in range(len(out)):
            token = int(succ[token])
            expected.append(token)
        assert out == expected
    assert spec.num_accepted_tokens == spec.num_draft_tokens > 0
