"""Single-process cpserve against transformers' DeepseekV2/V3ForCausalLM on random checkpoints.

The checkpoints (tests/checkpoints.py) cover: V2 without q_lora and group-limited greedy
routing with a routed scaling factor; V2 without q_lora with a kv_a bias (q and kv_a
projections apart); V2 with q_lora, greedy routing and YaRN (mscale differing
from mscale_all_dim, so both the rope factor and the softmax scale matter); V3 with q_lora,
noaux_tc routing with random correction biases, norm_topk_prob and YaRN; V3 rotating halves
(`rope_interleave=false`) with attention biases (q_a_proj, kv_a_proj_with_mqa, o_proj).
MLA runs absorbed, and (`-expanded`) with every prefill step in the expanded form (its own
tokens, and the cached prefix of a chunk: tests/test_mla_expanded_prefix.py).
"""

from __future__ import annotations

import pytest
import torch

from cpserve import LLM, SamplingParams
from tests.checkpoints import hf_greedy, load_hf_model, make_deepseek_checkpoint, random_prompts

NEW_TOKENS = 32
PROMPT_LENGTHS = [1, 5, 17, 40, 3, 64]
# fp32 end to end; the absorbed attention and the expert loop only reorder sums.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module",
                params=["deepseek-v2", "deepseek-v2-bias", "deepseek-v2-qlora", "deepseek-v3",
                        "deepseek-v3-halves"])
def checkpoint(request, tmp_path_factory):
    path = make_deepseek_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    prompts = random_prompts(PROMPT_LENGTHS)
    reference = hf_greedy(load_hf_model(path), prompts, NEW_TOKENS)
    return path, prompts, reference


@pytest.mark.parametrize("block_size,max_batched,expanded", [
    (16, 8192, False), (1, 8, False), (16, 8192, True), (1, 8, True)],
    ids=["bs16", "bs1-chunked", "bs16-expanded", "bs1-chunked-expanded"])
def test_greedy_matches_transformers(checkpoint, block_size, max_batched, expanded,
                                     monkeypatch):
    path, prompts, reference = checkpoint
    monkeypatch.setenv("CPSERVE_MLA_EXPANDED_MIN_TOKENS", "1" if expanded else "1000000")
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    with LLM(str(path), block_size=block_size, max_num_batched_tokens=max_batched,
             num_kv_blocks=4096 // block_size, enable_prefix_caching=False) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        llm.engine.check_integrity()
    for out, (ref_tokens, ref_logprobs) in zip(outputs, reference):
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        ours = [completion.logprobs[i][t].logprob for i, t in enumerate(completion.token_ids)]
        assert torch.allclose(torch.tensor(ours), torch.tensor(ref_logprobs), atol=LOGPROB_TOL)
