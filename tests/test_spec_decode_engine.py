"""Speculative decoding through the whole engine, one process (the parallel layouts are in
tests/test_context_parallel.py and tests/test_deepseek_context_parallel.py).

N-gram drafts on the demo model, whose greedy output soon repeats itself, so drafts are
often right; MTP on a DeepSeek-V3 checkpoint given MTP modules: random ones (drafts are
wrong: correctness must not suffer) and constructed ones (drafts are right: they must be
accepted). Every case compares with speculation off.
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
from tests.test_spec_decode import _chi_square_sf

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
MTP = {"method": "deepseek_mtp", "num_speculative_tokens": 3}
# Chunked (16-token steps), with prefix caching on, small blocks.
COMMON = dict(block_size=4, num_kv_blocks=512, max_model_len=256, max_num_batched_tokens=16,
              enable_prefix_caching=True, seed=0)
DOC = random_prompts([37], seed=3)[0]
# A shared document (prefix-cache hits for the later prompts), prompts that repeat
# themselves (n-gram matches from the first step) and one of a single token.
PROMPTS = [DOC + q for q in random_prompts([5, 12], seed=4)] + \
    [p + p[:9] for p in random_prompts([20, 3], seed=5)] + [[17]]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def generate(llm: LLM, prompts, params):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.check_integrity()
    return outputs


def tokens_of(outputs) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def tiny_reference():
    with LLM("tiny", **COMMON) as llm:
        return tokens_of(generate(llm, PROMPTS, GREEDY))


@pytest.fixture(scope="module")
def ngram_llm():
    with LLM("tiny", speculative_config=NGRAM, **COMMON) as llm:
        yield llm


def test_ngram_greedy_tokens_equal_speculation_off_and_drafts_are_accepted(ngram_llm,
                                                                          tiny_reference):
    first = generate(ngram_llm, PROMPTS[:1], GREEDY)  # caches the shared document
    outputs = first + generate(ngram_llm, PROMPTS[1:], GREEDY)
    assert tokens_of(outputs) == tiny_reference
    stats = ngram_llm.engine.stats()
    spec = stats.spec_decode
    assert spec.num_accepted_tokens > 0 and spec.num_draft_tokens > spec.num_accepted_tokens
    assert sum(o.num_draft_tokens for o in outputs) == spec.num_draft_tokens
    assert sum(o.num_accepted_tokens for o in outputs) == spec.num_accepted_tokens
    per_position = spec.accepted_per_position  # a draft follows only accepted ones
    assert per_position[0] > 0 and per_position == sorted(per_position, reverse=True)
    assert stats.prefix_cache_hits_total > 0  # the shared document was reused
    assert ngram_llm.engine.kv.pool.num_free == ngram_llm.engine.kv.pool.num_blocks


def test_stops_inside_an_accepted_run_end_the_output_where_speculation_off_does(ngram_llm):
    prompt = PROMPTS[2]
    with LLM("tiny", **COMMON) as plain:
        full = generate(plain, [prompt], GREEDY)[0].outputs[0]
        # A stop string ending mid-output, and a max_tokens cut: both may fall inside a run.
        stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
        cases = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 7)]
        cases.append(SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]))
        cases.append(SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                    stop_token_ids=[full.token_ids[9]]))
        expected = [generate(plain, [prompt], p)[0].outputs[0] for p in cases]
    for params, want in zip(cases, expected):
        got = generate(ngram_llm, [prompt], params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason), params


def test_seeded_sampling_is_reproducible_and_n_completions_differ(ngram_llm):
    params = SamplingParams(n=3, temperature=0.8, seed=1234, max_tokens=12, ignore_eos=True)
    first = tokens_of(generate(ngram_llm, PROMPTS[2:4], params))
    again = tokens_of(generate(ngram_llm, PROMPTS[3:4] + PROMPTS[2:3], params))
    assert first == [again[1], again[0]]  # neither run nor batch changes a seeded request
    assert len({tuple(t) for t in first[0]}) == 3


def test_abort_and_preemption_free_every_block(tiny_reference):
    # Room for about two requests at a time: the others are preempted and recomputed.
    with LLM("tiny", speculative_config=NGRAM, **{**COMMON, "num_kv_blocks": 40,
                                                  "max_model_len": 160}) as llm:
        assert tokens_of(generate(llm, PROMPTS, GREEDY)) == tiny_reference
        assert llm.engine.stats().num_preemptions_total > 0
        engine = llm.engine
        engine.add_request("gone", PROMPTS[2], GREEDY)  # the core's own: one sequence
        request = engine.requests["gone"]
        while not request.num_draft_tokens:  # until a step has verified drafts
            engine.step()
        assert request.spec_token_ids and not request.is_finished  # drafts for the next one
        engine.abort_request(["gone"])
        engine.check_integrity()
        assert engine.kv.pool.num_free == engine.kv.pool.num_blocks


# The sampled distribution, speculation on and off -------------------------------------------
SMALL_VOCAB = 16


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A 16-token model, and a prompt of its own greedy continuation: prompt lookup then
    drafts what the model finds likely, so many drafts are accepted and many are not."""
    path = str(make_checkpoint(tmp_path_factory.mktemp("vocab16"), "llama3",
                               vocab_size=SMALL_VOCAB, initializer_range=0.3))
    with LLM(path, **COMMON) as llm:
        greedy = generate(llm, [[3, 5, 7]], SamplingParams(temperature=0, max_tokens=12,
                                                           ignore_eos=True))
    return path, [3, 5, 7] + greedy[0].outputs[0].token_ids


def test_sampled_distribution_is_the_same_with_speculation(small_vocab_model):
    """800 requests of 5 tokens, speculation on and off: at each position, a two-sample
    chi-square test that the tokens there follow one distribution (alpha 1e-3 each). This
    catches, for instance, a verifier that keeps one token too many after a rejection. The
    engine's seed is fixed, so is the outcome."""
    path, prompt = small_vocab_model
    num, length = 800, 5
    runs = []
    for spec in (None, NGRAM):
        with LLM(path, speculative_config=spec, max_num_seqs=256,
                 **{**COMMON, "max_num_batched_tokens": 2048}) as llm:
            params = SamplingParams(temperature=1.0, max_tokens=length, ignore_eos=True)
            outputs = generate(llm, [prompt] * num, params)
            runs.append(torch.tensor([o.outputs[0].token_ids for o in outputs]))
            stats = llm.engine.stats().spec_decode
    assert stats.num_drafts > num and num // 4 < stats.num_accepted_tokens < \
        stats.num_draft_tokens // 2
    for position in range(length):
        a = torch.bincount(runs[0][:, position], minlength=SMALL_VOCAB).tolist()
        b = torch.bincount(runs[1][:, position], minlength=SMALL_VOCAB).tolist()
        statistic, dof = _two_sample_chi_square(a, b)
        assert dof >= 5, (a, b)
        assert _chi_square_sf(statistic, dof) > 1e-3, (position, a, b)


def _two_sample_chi_square(a: list[int], b: list[int]) -> tuple[float, int]:
    """Homogeneity of two equal-size samples; cells with fewer than 10 in all pooled."""
    cells, pooled = [], [0, 0]
    for x, y in zip(a, b):
        if x + y < 10:
            pooled = [pooled[0] + x, pooled[1] + y]
        else:
            cells.append((x, y))
    if sum(pooled):
        cells.append(tuple(pooled))
    return sum((x - y) ** 2 / (x + y) for x, y in cells), len(cells) - 1


# MTP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    return add_mtp_modules(make_deepseek_checkpoint(tmp_path_factory.mktemp("v3-mtp"),
                                                    "deepseek-v3"))


def test_mtp_drafts_from_random_modules_change_no_token(mtp_checkpoint):
    prompts = PROMPTS[:4]
    with LLM(str(mtp_checkpoint), **COMMON) as llm:
        reference = tokens_of(generate(llm, prompts, GREEDY))
    with LLM(str(mtp_checkpoint), speculative_config=MTP, **COMMON) as llm:
        assert len(llm.engine.executor.runner.kv_caches) == 3  # 2 layers + 1 MTP module
        assert tokens_of(generate(llm, prompts, GREEDY)) == reference
        assert llm.engine.stats().spec_decode.num_draft_tokens > 0


def test_mtp_drafts_that_are_right_are_accepted(mtp_checkpoint, tmp_path):
    path, succ = make_successor_checkpoint(tmp_path / "succ", mtp_checkpoint)
    with LLM(str(path), speculative_config=MTP, **COMMON) as llm:
        assert_successor_drafts_accepted(llm, succ, PROMPTS[:4])


def assert_successor_drafts_accepted(llm: LLM, succ: torch.Tensor, prompts) -> None:
    """13 greedy tokens each, every draft accepted: 1 token from the prefill, then 3 steps
    of 3 accepted drafts and the token after them."""
    params = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    outputs = generate(llm, prompts, params)
    for prompt, out in zip(prompts, outputs):
        expected, token = [], prompt[-1]
        for _ in range(13):
            token = int(succ[token])
            expected.append(token)
        assert out.outputs[0].token_ids == expected
    spec = llm.engine.stats().spec_decode
    assert spec.num_accepted_tokens == spec.num_draft_tokens == len(prompts) * 9
    assert spec.accepted_per_position == [3 * len(prompts)] * 3


# With an FP8 KV cache (--kv-cache-dtype fp8) ------------------------------------------------
def test_ngram_verification_over_an_fp8_cache_gives_its_tokens():
    """Verification steps attend to the FP8 cache with its scales: speculation changes no
    token of the FP8 engine's own, and drafts are accepted."""
    fp8 = dict(COMMON, kv_cache_dtype="fp8")
    with LLM("tiny", **fp8) as llm:
        reference = tokens_of(generate(llm, PROMPTS[2:5], GREEDY))
    with LLM("tiny", speculative_config=NGRAM, **fp8) as llm:
        assert llm.engine.executor.runner.kv_scales is not None
        assert tokens_of(generate(llm, PROMPTS[2:5], GREEDY)) == reference
        assert llm.engine.stats().spec_decode.num_accepted_tokens > 0


def test_mtp_with_an_fp8_cache_is_refused_at_start_up_naming_both_flags(mtp_checkpoint):
    from cpserve.config import ConfigError

    with pytest.raises(ConfigError, match="--speculative-config method 'deepseek_mtp' cannot "
                                          "run with --kv-cache-dtype fp8"):
        LLM(str(mtp_checkpoint), speculative_config=MTP, kv_cache_dtype="fp8", **COMMON)
