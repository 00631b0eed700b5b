"""On a GPU, in bf16: cpserve against transformers, and every 2-GPU layout against one GPU.

Skipped without CUDA (CI has none); run on the lent GPUs with `python -m pytest tests/test_gpu.py`.

Two checks, both needed in bf16:
- teacher-forced: the same token sequence (prompt plus the reference's greedy output) is fed
  as a prompt, and every position's logprob must agree within `LOGPROB_TOL` (bf16 keeps about
  3 significant digits; logprobs here are about -7). This covers prefill, chunked prefill and
  every parallel layout, whatever the random model's near ties.
- greedy decode: bf16 implementations may part ways where the top two tokens are within
  rounding of each other, so tokens must agree up to the first position where the reference's
  top-2 margin is below `NEAR_TIE`.
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
    """Per prompt: greedy tokens, their logprobs, the top-2 margins, and the teacher-forced
    logprob of every token of prompt + output after the first."""
    model = load_hf_model(path, dtype=torch.bfloat16).cuda()
    results = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                 min_new_tokens=NEW_TOKENS, eos_token_id=None)
            all_logprobs = torch.log_softmax(model(out).logits[0, :-1].float(), -1)
        forced = all_logprobs.gather(1, out[0, 1:, None]).squeeze(1)
        logprobs = all_logprobs[len(prompt) - 1:]
        top2 = logprobs.topk(2, dim=-1).values
        tokens = out[0, len(prompt):].tolist()
        results.append((tokens, forced[len(prompt) - 1:].tolist(),
                        (top2[:, 0] - top2[:, 1]).tolist(), out[0].tolist(), forced.tolist()))
    del model
    torch.cuda.empty_cache()
    return results


def teacher_forced(llm: LLM, sequences) -> list[list[float]]:
    """Logprob of every token after the first, fed as one prompt."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    return [[o.prompt_logprobs[i][t].logprob for i, t in enumerate(s) if i > 0]
            for o, s in zip(outputs, sequences)]


def assert_close(got: list[list[float]], expected: list[list[float]], what: str) -> None:
    for ours_, theirs in zip(got, expected):
        diff = (torch.tensor(ours_) - torch.tensor(theirs)).abs().max().item()
        assert diff < LOGPROB_TOL, f"{what}: teacher-forced logprobs differ by {diff:.3f}"


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
    for (tokens, logprobs), (ref_tokens, ref_logprobs, margins, *_) in zip(got, reference):
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


# Budgets: one chunk; chunks of 32 over the cache (the Triton kernel's planned tiles); chunks
# of 256 (the prefix gathered for cuDNN); pages of one token.
@pytest.mark.parametrize("block_size,max_batched", [(16, 8192), (16, 64), (16, 512), (1, 8192)])
def test_bf16_matches_transformers(checkpoint, block_size, max_batched):
    path, prompts, reference = checkpoint
    with LLM(str(path), dtype="bfloat16", block_size=block_size, num_kv_blocks=8192 // block_size,
             max_num_batched_tokens=max_batched) as llm:
        assert_close(teacher_forced(llm, [r[3] for r in reference]), [r[4] for r in reference],
                     f"bs{block_size}")
        compared = assert_agree(ours(llm, prompts), reference, f"bs{block_size}")
    assert compared >= 10  # the greedy comparison is not vacuous


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("tp,pcp,dcp,exchange", [(2, 1, 1, "allgather"), (1, 2, 1, "allgather"),
                                                 (1, 2, 1, "ring"), (2, 1, 2, "allgather")])
def test_two_gpu_layouts_match_one_gpu(checkpoint, tp, pcp, dcp, exchange):
    path, prompts, reference = checkpoint
    common = dict(dtype="bfloat16", num_kv_blocks=512, max_num_batched_tokens=256,
                  enable_prefix_caching=False)
    sequences = [r[3] for r in reference]
    with LLM(str(path), **common) as llm:
        single = ours(llm, prompts)
        single_forced = teacher_forced(llm, sequences)
    single_ref = [(t, lp, m) for (t, lp), (_, _, m, *_) in zip(single, reference)]
    what = f"tp{tp} pcp{pcp} dcp{dcp} {exchange}"
    with LLM(str(path), tensor_parallel_size=tp, prefill_context_parallel_size=pcp,
             decode_context_parallel_size=dcp, pcp_kv_exchange=exchange, **common) as llm:
        assert_close(teacher_forced(llm, sequences), single_forced, what)
        compared = assert_agree(ours(llm, prompts), single_ref, what)
    assert compared >= 10
