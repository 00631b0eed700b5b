"""Bad input gets a clear error and disturbs no other request."""

from __future__ import annotations

import pytest

from cpserve import LLM, SamplingParams
from cpserve.config import ConfigError


@pytest.fixture(scope="module")
def llm():
    with LLM("tiny", max_model_len=64, num_kv_blocks=64) as llm:
        yield llm


def test_bad_requests_are_refused_and_others_continue(llm):
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate("a good prompt", greedy, use_tqdm=False)[0].outputs[0].token_ids

    engine.add_request("good", "a good prompt", greedy)
    engine.step()  # the good request is running when the bad ones arrive
    bad = [
        (list(range(10, 80)), greedy, r"70 tokens.*max_model_len is 64"),
        ("", greedy, "empty"),
        ([5, 1024], greedy, r"token id 1024 is outside the vocabulary \[0, 1024\)"),
        ([5, -1], greedy, "token id -1"),
    ]
    for prompt, params, message in bad:
        with pytest.raises(ValueError, match=message):
            engine.add_request("bad", prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert list(outputs) == ["good"]
    assert outputs["good"].outputs[0].token_ids == expected
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


def test_stop_strings_and_running_text_is_never_taken_back(llm):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("stop here", greedy, use_tqdm=False)[0].outputs[0].text
    stop = full[10:13]
    engine = llm.engine
    engine.add_request("s", "stop here", SamplingParams(temperature=0, max_tokens=24,
                                                        ignore_eos=True, stop=[stop]))
    seen = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            assert text.startswith(seen)  # cumulative text only grows
            seen = text
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert seen == full[: full.index(stop)]
