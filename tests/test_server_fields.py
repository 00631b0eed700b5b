"""The request fields of the OpenAI-compatible server: the ones implemented (logit_bias,
prompt_logprobs, echo over a cached prefix, seeds), the neutral values of unimplemented ones,
and what the server shows of itself. The same fixtures as test_server.py (a server of
its own for this module)."""

from __future__ import annotations

import time

import pytest

from cpserve import SamplingParams
from tests import test_server
from tests.test_server import MAX_MODEL_LEN, MESSAGES, NO_EOS, PROMPTS, good_request_works

# test_server.py's fixtures: module-scoped, so this module gets a server of its own.
server = test_server.server
offline = test_server.offline


def test_echo_scores_every_prompt_token_when_the_prefix_is_cached(server):
    """lm-evaluation-harness scores choices that share the question: the second request hits
    the prefix cache, and must still get a logprob for every prompt token (it once got one)."""
    question = "Question: which of these words ends the sentence best? " * 3
    for choice in ("Answer: the station", "Answer: the library"):
        body = {"model": "tiny", "prompt": question + choice, "max_tokens": 0, "echo": True,
                "logprobs": 1}
        lp = server.http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
        num_tokens = len(server.engine.tokenizer.encode(question + choice))
        assert len(lp["token_logprobs"]) == num_tokens > 32
        assert lp["token_logprobs"][0] is None
        assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])


def test_seed_at_the_top_of_its_range_with_n(server):
    out = server.client.completions.create(model="tiny", prompt="seeded", n=2, max_tokens=3,
                                           seed=2**64 - 1, extra_body=NO_EOS)
    assert len(out.choices) == 2


def test_logit_bias_steers_greedy_tokens(server):
    token = 42
    out = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5,
                                           temperature=0, logit_bias={str(token): 100},
                                           extra_body=NO_EOS)
    assert out.choices[0].text == server.engine.tokenizer.decode([token] * 5)
    chat = server.client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, logit_bias={token: 100},
        extra_body=NO_EOS)
    assert chat.choices[0].message.content == server.engine.tokenizer.decode([token] * 3)


def test_prompt_logprobs_in_the_body_as_vllm_returns_them(server, offline):
    prompt = "The prompt whose every token is scored, as vLLM's extension does"
    expected = offline.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2),
                                use_tqdm=False)[0].prompt_logprobs
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}
    got = server.http.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
    assert len(got) == len(expected) and got[0] is None and expected[0] is None
    for ours, theirs in zip(got[1:], expected[1:]):
        assert {int(t) for t in ours} == set(theirs)
        assert all(abs(ours[str(t)]["logprob"] - lp.logprob) < 1e-5
                   and ours[str(t)]["rank"] == lp.rank for t, lp in theirs.items())
    chat = server.http.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0}).json()
    rendered = server.http.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert len(chat["prompt_logprobs"]) == rendered


def test_neutral_values_of_unimplemented_fields_are_accepted(server):
    out = server.client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=2, response_format={"type": "text"},
        tool_choice="none", presence_penalty=0, frequency_penalty=0, user="u-1",
        extra_body=NO_EOS)
    # An assistant reply sent back as the openai client returns it (refusal, tool_calls,
    # function_call, audio and annotations all empty).
    history = [*MESSAGES, out.choices[0].message.model_dump(), {"role": "user", "content": "?"}]
    again = server.client.chat.completions.create(model="tiny", messages=history, max_tokens=2,
                                                  extra_body=NO_EOS)
    assert again.usage.completion_tokens == 2


def test_huge_text_prompt_is_refused_before_it_is_tokenized_whole(server):
    text = "The morning train left the station. " * 280_000  # 10 MB: ~10 s to tokenize here
    started = time.monotonic()
    response = server.http.post("/v1/completions", json={"model": "tiny", "prompt": text})
    assert time.monotonic() - started < 3.0
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and "at least" in error["message"]
    assert f"maximum context length is {MAX_MODEL_LEN}" in error["message"]
    good_request_works(server)


def test_models_root_is_no_server_path_and_ping_answers(server):
    response = server.http.get("/v1/models")
    assert [m["root"] for m in response.json()["data"]] == ["tiny", "tiny"]
    assert server.engine.config.model.path not in response.text
    assert server.http.get("/ping").status_code == 200
    assert server.http.post("/ping").status_code == 200


REFUSED_COMPLETIONS = [
    # Fields cpserve does not implement are refused by name, never ignored.
    ({"prompt": "x", "response_format": {"type": "json_object"}}, "response_format"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {}}},
     "response_format"),
    ({"prompt": "x", "guided_json": {"type": "object"}}, "guided_json"),
    ({"prompt": "x", "guided_regex": "a+"}, "guided_regex"),
    ({"prompt": "x", "guided_choice": ["a", "b"]}, "guided_choice"),
    ({"prompt": "x", "guided_grammar": "root ::= x"}, "guided_grammar"),
    ({"prompt": "x", "structured_outputs": {"json": {}}}, "structured_outputs"),
    ({"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ({"prompt": "x", "stream_options": {"continuous_usage_stats": True}},
     "continuous_usage_stats"),
    # logit_bias: token ids of the vocabulary, biases in [-100, 100], at most 1024 entries.
    ({"prompt": "x", "logit_bias": {"5000": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    # Every list and count is bounded.
    ({"prompt": "x", "stop": ["s"] * 65}, "stop"),
    ({"prompt": "x", "stop": "s" * 1025}, "stop"),
    ({"prompt": "x", "stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"prompt": ["x"] * 4097}, "--max-waiting-requests 4096"),
]
REFUSED_CHATS = [
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": MESSAGES, "tool_choice": "required"}, "tool_choice"),
    ({"messages": MESSAGES, "guided_json": {}}, "guided_json"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]},
     "tool_calls"),
    ({"messages": [{"role": "user", "content": "x", "weight": 1}]}, "weight"),
    ({"messages": MESSAGES, "logit_bias": {"-1": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "x"}] * 8193}, "messages"),
]


@pytest.mark.parametrize("path,body,mentions",
                         [("/v1/completions", b, m) for b, m in REFUSED_COMPLETIONS]
                         + [("/v1/chat/completions", b, m) for b, m in REFUSED_CHATS])
def test_unsupported_fields_and_bounds_are_400_naming_them(server, path, body, mentions):
    response = server.http.post(path, json={"model": "tiny", **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 400 and mentions in error["message"]
