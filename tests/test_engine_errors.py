"""Bad input gets a clear error and disturbs no other request."""

from __future__ import annotations

import time

import pytest

from cpserve import LLM, SamplingParams
from cpserve.config import ConfigError
from cpserve.engine.output_processor import OutputProcessor, RequestOutputKind


@pytest.fixture(scope="module")
def llm():
    with LLM("tiny", max_model_len=64, num_kv_blocks=64) as llm:
        yield llm


def test_bad_requests_are_refused_and_others_continue(llm):
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate("a good prompt", greedy, use_tqdm=False)[0].outputs[0].token_ids

    good_ids = llm.get_tokenizer().encode("a good prompt")
    engine.add_request("good", good_ids, greedy)
    tokens = engine.step().outputs[0].new_token_ids  # it is running when the bad ones come
    bad = [
        (list(range(10, 80)), r"70 tokens.*max_model_len is 64"),
        ("", "empty"),
        ([5, 1024], r"token id 1024 is outside the vocabulary \[0, 1024\)"),
        ([5, -1], "token id -1"),
    ]
    for prompt, message in bad:
        with pytest.raises(ValueError, match=message):  # the front end refuses it...
            llm.generate(prompt, greedy, use_tqdm=False)
        if isinstance(prompt, list):  # ...and so does the core, sent it anyway
            with pytest.raises(ValueError, match=message):
                engine.add_request("bad", prompt, greedy)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", good_ids, greedy)
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            assert out.request_id == "good"
            tokens += out.new_token_ids
    assert tokens == expected
    engine.check_integrity()
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.5, "temperature must be >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("max_tokens", 0, "max_tokens must be an integer >= 1"),
    ("top_k", -2, "top_k"),
    ("min_p", 2.0, "min_p"),
    ("n", 0, "n must be"),
])
def test_invalid_sampling_params(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_a_bad_prompt_in_a_batch_queues_nothing(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    llm.engine.check_integrity()


def test_unknown_model_path(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        LLM(str(tmp_path / "no-such-model"))


def test_stop_strings_end_streams_where_the_final_text_ends(llm):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("stop here", greedy, use_tqdm=False)[0].outputs[0].text
    stop = full[10:13]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    final = llm.generate("stop here", params, use_tqdm=False)[0].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == stop
    assert final.text == full[: full.index(stop)]

    # Streamed: the core's news through a DELTA front end; the deltas add up to the same text
    # and the stop string's first characters were never sent before it was known.
    engine, tok = llm.engine, llm.get_tokenizer()
    ids = tok.encode("stop here")
    processor = OutputProcessor(tok)
    processor.add("s", "stop here", ids, params, RequestOutputKind.DELTA, time.time())
    engine.add_request("s", ids, params)
    deltas = []
    while engine.has_unfinished_requests():
        processed = processor.process(engine.step())
        engine.abort_request(processed.stopped)
        deltas += [o.outputs[0] for o in processed.outputs]
    assert "".join(d.text for d in deltas) == final.text
    assert [d.finish_reason for d in deltas][-1] == "stop" and len(processor) == 0
    assert sum(len(d.token_ids) for d in deltas) == len(final.token_ids)
    engine.check_integrity()


# ---- KV capacity: refused at start-up ------------------------------------------------------


def test_max_model_len_beyond_the_kv_cache_is_refused_at_start_up():
    # 8 blocks of 16 tokens = 128 tokens of KV against tiny's 4096 positions.
    with pytest.raises(ConfigError) as raised:
        LLM("tiny", num_kv_blocks=8)
    message = str(raised.value)
    for part in ("max_model_len=4096", "holds 128 tokens", "--max-model-len",
                 "--num-kv-blocks", "--kv-cache-memory", "--gpu-memory-utilization"):
        assert part in message
    with LLM("tiny", num_kv_blocks=8, max_model_len=128) as llm:  # what fits is accepted
        out = llm.generate({"prompt_token_ids": list(range(10, 130))},
                           SamplingParams(max_tokens=200, ignore_eos=True), use_tqdm=False)
        assert out[0].outputs[0].finish_reason == "length"
        assert len(out[0].prompt_token_ids) + len(out[0].outputs[0].token_ids) == 128


def test_a_kv_budget_smaller_than_one_block_is_refused_not_rounded_up():
    with pytest.raises(ConfigError, match="holds 0 tokens"):
        LLM("tiny", kv_cache_memory=1e-9, max_model_len=16)


# ---- a request whose logits are not finite fails alone --------------------------------------

POISON = 1000  # token id whose embedding row is infinite in the poisoned checkpoint


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def poisoned(tmp_path_factory, request):
    """Synchronous steps, and async scheduling (the failure is found while the request's
    next step is already queued)."""
    from tests.checkpoints import make_poisoned_checkpoint

    path = make_poisoned_checkpoint(tmp_path_factory.mktemp("poisoned"), POISON)
    with LLM(str(path), num_kv_blocks=64, max_model_len=256,
             async_scheduling=request.param) as llm:
        yield llm


@pytest.mark.parametrize("prompt_logprobs", [None, 2])
def test_non_finite_logits_fail_only_their_request(poisoned, prompt_logprobs):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                            prompt_logprobs=prompt_logprobs)
    good = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": list(range(20, 40))}]
    alone = poisoned.generate(good, params, use_tqdm=False)
    together = poisoned.generate([good[0], {"prompt_token_ids": [5, POISON, 7]}, good[1]],
                                 params, use_tqdm=False)
    failed = together[1].outputs[0]
    assert failed.finish_reason == "error" and "not finite" in failed.error
    for ok, ref in zip([together[0], together[2]], alone):
        assert ok.outputs[0].finish_reason == "length" and ok.outputs[0].error is None
        assert ok.outputs[0].token_ids == ref.outputs[0].token_ids
    poisoned.engine.check_integrity()
    assert poisoned.engine.kv.pool.num_free == poisoned.engine.kv.pool.num_blocks


# ---- prompt logprobs: logits in slices of a fixed budget -------------------------------------


def test_prompt_logprobs_logits_are_computed_in_bounded_slices(llm, monkeypatch):
    from cpserve.engine import model_runner

    prompt = {"prompt_token_ids": list(range(10, 60))}
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=3)
    whole = llm.generate(prompt, params, use_tqdm=False)[0]

    rows_per_call = []
    model = llm.engine.executor.runner.model
    original = model.compute_logits
    monkeypatch.setattr(model, "compute_logits",
                        lambda hidden: rows_per_call.append(hidden.shape[0]) or original(hidden))
    monkeypatch.setattr(model_runner, "LOGITS_SLICE_BYTES", 7 * 4 * 1024)  # 7 rows of 1024
    sliced = llm.generate(prompt, params, use_tqdm=False)[0]
    assert max(rows_per_call) == 7 and sum(rows_per_call) >= 50
    assert sliced.outputs[0].token_ids == whole.outputs[0].token_ids
    assert len(sliced.prompt_logprobs) == 50
    # fp32; a GEMM over fewer rows may sum in another order.
    for a, b in zip(sliced.prompt_logprobs[1:], whole.prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)


def test_a_huge_text_prompt_is_refused_without_tokenizing_it_whole(llm):
    text = "The morning train left the station. " * 280_000  # 10 MB, ~2.8M tokens
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"at least \d+ tokens, but max_model_len is 64"):
        llm.generate(text, SamplingParams(), use_tqdm=False)
    assert time.monotonic() - started < 1.0  # tokenizing it whole takes about 10 s here
    assert not llm.engine.has_unfinished_requests()


def test_token_ids_in_sampling_params_are_checked_against_the_vocabulary(llm):
    for params in (SamplingParams(logit_bias={1024: 1.0}), SamplingParams(stop_token_ids=[5000])):
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 1024\)"):
            llm.generate("hello", params, use_tqdm=False)
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 1024\)"):
            llm.engine.add_request("bad-ids", [5, 6], params)
    assert not llm.engine.has_unfinished_requests()


def test_seeds_at_the_top_of_the_range_work_for_n_completions(llm):
    params = SamplingParams(seed=2**64 - 1, n=3, max_tokens=4, ignore_eos=True)
    out = llm.generate("seeded", params, use_tqdm=False)[0]
    again = llm.generate("seeded", params, use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in again.outputs]


def test_max_model_len_beyond_the_model_positions_is_refused(tmp_path, monkeypatch):
    import json

    from cpserve.config import ALLOW_LONG_ENV, ModelConfig

    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1024,
            "max_position_embeddings": 4096}
    cases = [({}, 4096), ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 4096),
             ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 2048}}, 8192),
             ({"rope_scaling": {"type": "linear", "factor": 2.0}}, 8192)]
    for extra, longest in cases:
        (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
        assert ModelConfig.from_pretrained(tmp_path, max_model_len=longest).max_model_len == longest
        with pytest.raises(ConfigError, match=rf"max_model_len={longest + 1} is longer than the "
                                              rf"{longest} positions.*{ALLOW_LONG_ENV}=1"):
            ModelConfig.from_pretrained(tmp_path, max_model_len=longest + 1)
    monkeypatch.setenv(ALLOW_LONG_ENV, "1")  # the user's explicit choice, as in vLLM
    assert ModelConfig.from_pretrained(tmp_path, max_model_len=10**5).max_model_len == 10**5


def test_kv_cache_memory_help_states_the_default_the_code_uses():
    import argparse

    from cpserve.engine.args import EngineArgs
    from cpserve.engine.kv_sizing import CPU_DEFAULT_KV_GIB

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    (action,) = [a for a in parser._actions if "--kv-cache-memory" in a.option_strings]
    assert f"CPU default: {CPU_DEFAULT_KV_GIB} GiB" in action.help
