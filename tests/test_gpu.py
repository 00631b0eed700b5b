"""On a GPU, in bf16: cpserve against transformers, and every 2-GPU layout against one GPU.

Skipped without CUDA (CI has none); run on the lent GPUs with `python -m pytest tests/test_gpu.py`.

bf16 greedy decoding of two implementations may part ways where the top two tokens are
within rounding of each other. So tokens must agree up to the first position where the
reference's top-2 margin is below `NEAR_TIE`; up to there, logprobs must agree within
`LOGPROB_TOL` (bf16 keeps about 3 significant digits; logits here are O(1..10)).
"""

from __future__ import annotations

import pytest
import torch

from cpserve import LLM, SamplingParams
from tests.checkpoints import load_hf_model, make_checkpoint, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NEW_TOKENS = 32
PROMPT_LENGTHS = [1, 7, 33, 130, 600]
LOGPROB_TOL = 0.1
NEAR_TIE = 0.2


def hf_reference(path, prompts):
    model = load_hf_model(path, dtype=torch.bfloat16).cuda()
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                 min_new_tokens=NEW_TOKENS, eos_token_id=None)
            logits = model(out).logits[0, len(prompt) - 1:-1].float()
        logprobs = torch.log_softmax(logits, -1)
        top2 = logprobs.topk(2, dim=-1).values
        tokens = out[0, len(prompt):].tolist()
        chosen = logprobs.gather(1, torch.tensor(tokens, device="cuda")[:, None]).squeeze(1)
        results.append((tokens, chosen.tolist(), (top2[:, 0] - top2[:, 1]).tolist()))
    del model
    torch.cuda.empty_cache()
    return results


def ours(llm: LLM, prompts):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.check_integrity()
    result = []
    for o in outputs:
        c = o.outputs[0]
        result.append((c.token_ids, [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]))
    return result


def assert_agree(got, reference, what: str) -> int:
    """Returns how many tokens were compared before a near tie (for the record)."""
    compared = 0
    for (tokens, logprobs), (ref_tokens, ref_logprobs, margins) in zip(got, reference):
        for i, (t, r) in enumerate(zip(tokens, ref_tokens)):
            assert abs(logprobs[i] - ref_logprobs[i]) < LOGPROB_TOL or t != r, what
            if margins[i] < NEAR_TIE:
                break
            assert t == r, f"{what}: token {i} differs with a top-2 margin of {margins[i]:.3f}"
            compared += 1
    return compared


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("llama3-bf16"), "llama3", dtype=torch.bfloat16,
                           num_attention_heads=8, num_key_value_heads=1, hidden_size=256,
                           intermediate_size=512, max_position_embeddings=2048)
    prompts = random_prompts(PROMPT_LENGTHS)
    return path, prompts, hf_reference(path, prompts)


@pytest.mark.parametrize("block_size,max_batched", [(16, 8192), (16, 64), (1, 8192)])
def test_bf16_matches_transformers(checkpoint, block_size, max_batched):
    path, prompts, reference = checkpoint
    with LLM(str(path), dtype="bfloat16", block_size=block_size, num_kv_blocks=8192 // block_size,
             max_num_batched_tokens=max_batched) as llm:
        compared = assert_agree(ours(llm, prompts), reference, f"bs{block_size}")
    assert compared >= len(prompts) * 8  # the comparison is not vacuous


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("tp,pcp,dcp,exchange", [(2, 1, 1, "allgather"), (1, 2, 1, "allgather"),
                                                 (1, 2, 1, "ring"), (2, 1, 2, "allgather")])
def test_two_gpu_layouts_match_one_gpu(checkpoint, tp, pcp, dcp, exchange):
    path, prompts, reference = checkpoint
    common = dict(dtype="bfloat16", num_kv_blocks=512, max_num_batched_tokens=256,
                  enable_prefix_caching=False)
    with LLM(str(path), **common) as llm:
        single = ours(llm, prompts)
    single_ref = [(t, lp, m) for (t, lp), (_, _, m) in zip(single, reference)]
    with LLM(str(path), tensor_parallel_size=tp, prefill_context_parallel_size=pcp,
             decode_context_parallel_size=dcp, pcp_kv_exchange=exchange, **common) as llm:
        compared = assert_agree(ours(llm, prompts), single_ref, f"tp{tp} pcp{pcp} dcp{dcp}")
    assert compared >= len(prompts) * 8
