"""The OpenAI-compatible server, end to end: a real uvicorn on a loopback port serving the demo
model `tiny`, driven by the official `openai` client (and raw HTTP where the wire format or an
error is the point).

One server serves the whole module. Tests run one after another, so each sees an idle engine
at its start; every test that starts requests leaves the engine idle again.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import openai
import pytest

import cpserve
from cpserve import LLM, SamplingParams
from cpserve.engine.args import EngineArgs
from cpserve.engine.async_engine import AsyncEngine
from cpserve.entrypoints.openai.api_server import ServerThread, build_app
from tests.prometheus import read_metric

ENGINE_ARGS = dict(model="tiny", max_model_len=512, num_kv_blocks=256, max_num_seqs=64)
MAX_MODEL_LEN = ENGINE_ARGS["max_model_len"]
PROMPTS = ["The morning train left the station", "A language model reads"]
# The demo model has random weights: outputs are gibberish with some U+FFFD (partial UTF-8
# tokens), and EOS may come at any time, so tests that need a length ask for ignore_eos.
NO_EOS = {"ignore_eos": True}


class Server:
    def __init__(self) -> None:
        self.engine = AsyncEngine.from_engine_args(EngineArgs(**ENGINE_ARGS))
        self.app = build_app(self.engine, served_model_names=["tiny", "tiny-alias"])
        self.engine.start()
        self.thread = ServerThread(self.app).start()
        self.url = self.thread.url
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                                    timeout=60)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                                  timeout=60)

    def metric(self, name: str) -> float:
        return read_metric(self.http, name)

    def check_integrity(self) -> None:
        asyncio.run(self.engine.check_integrity())

    def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Until no request runs or waits and no KV block is in use."""
        wait_until(lambda: self.metric("cpserve:num_requests_running") == 0
                   and self.metric("cpserve:num_requests_waiting") == 0
                   and self.metric("cpserve:kv_cache_usage_perc") == 0, timeout_s)

    def close(self) -> None:
        self.http.close()
        self.thread.stop()
        self.engine.shutdown()


def wait_until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    try:
        s.wait_idle()
        s.check_integrity()
    finally:
        s.close()


@pytest.fixture(scope="module")
def offline():
    with LLM(**ENGINE_ARGS) as llm:
        yield llm


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def good_request_works(server: Server) -> None:
    out = server.client.completions.create(model="tiny", prompt="hello", max_tokens=2,
                                           extra_body=NO_EOS)
    assert out.usage.completion_tokens == 2


# ---- basics -------------------------------------------------------------------------------


def test_models_health_version(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny", "tiny-alias"]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert server.http.get("/health").status_code == 200
    assert server.http.get("/version").json() == {"version": cpserve.__version__}


def test_greedy_completions_match_offline_llm(server, offline):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(PROMPTS, params, use_tqdm=False)]

    batch = server.client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=24,
                                             temperature=0, extra_body=NO_EOS)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == expected
    assert all(c.finish_reason == "length" for c in batch.choices)
    # The alias serves the same model, answers under the first name.
    single = server.client.completions.create(model="tiny-alias", prompt=PROMPTS[0],
                                              max_tokens=24, temperature=0, extra_body=NO_EOS)
    assert single.choices[0].text == expected[0] and single.model == "tiny"
    streamed = "".join(
        chunk.choices[0].text for chunk in server.client.completions.create(
            model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, stream=True,
            extra_body=NO_EOS))
    assert streamed == expected[1]
    # A prompt of token ids is the same request as its text.
    ids = offline.get_tokenizer().encode(PROMPTS[0])
    by_ids = server.client.completions.create(model="tiny", prompt=ids, max_tokens=24,
                                              temperature=0, extra_body=NO_EOS)
    assert by_ids.choices[0].text == expected[0]
    assert by_ids.usage.prompt_tokens == len(ids)


def test_stream_wire_format_and_usage(server):
    prompt = "A streamed request whose usage counts its cached prefix: " + "word " * 40
    num_tokens = len(server.engine.tokenizer.encode(prompt))
    cold = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=1)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["prompt_tokens"] == num_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7
    # Every full 16-token block but the one holding the last prompt token, which is computed.
    assert usage["prompt_tokens_details"]["cached_tokens"] == (num_tokens - 1) // 16 * 16 > 0
    text_chunks = chunks[:-1]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in text_chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])


def test_n_completions_of_several_prompts(server):
    out = server.client.completions.create(model="tiny", prompt=PROMPTS, n=3, max_tokens=5,
                                           temperature=1.0, seed=7, extra_body=NO_EOS)
    assert sorted(c.index for c in out.choices) == list(range(6))
    assert out.usage.completion_tokens == 6 * 5
    prompt_lens = [len(server.engine.tokenizer.encode(p)) for p in PROMPTS]
    assert out.usage.prompt_tokens == sum(prompt_lens)
    # Three samples of one prompt differ from each other (1024-token vocabulary, 5 tokens).
    assert len({c.text for c in out.choices if c.index < 3}) == 3

    chunks = list(server.client.completions.create(
        model="tiny", prompt=PROMPTS, n=3, max_tokens=5, temperature=1.0, seed=7, stream=True,
        extra_body=NO_EOS))
    streamed: dict[int, str] = {}
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == set(range(6))
    # Same seed, same samples, streamed or not.
    assert streamed == {c.index: c.text for c in out.choices}


def test_seeded_sampling_repeats(server):
    def sample(seed: int) -> str:
        return server.client.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=1.0, top_p=0.95,
            seed=seed, extra_body={**NO_EOS, "top_k": 50}).choices[0].text

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)

    def chat(seed: int) -> str:
        return server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
            temperature=1.0, seed=seed, extra_body=NO_EOS).choices[0].message.content

    assert chat(5) == chat(5)


# ---- logprobs and echo --------------------------------------------------------------------


def test_completion_logprobs(server):
    out = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6,
                                           temperature=0, logprobs=3, extra_body=NO_EOS)
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        # Top 3 plus the chosen token; greedy, so the chosen one is the most likely.
        assert 3 <= len(top) <= 4 and top[token] == logprob == max(top.values())
    offsets = lp.text_offset
    assert offsets[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp.tokens))

    streamed = []
    for chunk in server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6,
                                                  temperature=0, logprobs=3, stream=True,
                                                  extra_body=NO_EOS):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.append(chunk.choices[0].logprobs)
    assert sum((c.tokens for c in streamed), []) == lp.tokens
    assert sum((c.token_logprobs for c in streamed), []) == pytest.approx(lp.token_logprobs,
                                                                          abs=1e-5)
    assert sum((c.text_offset for c in streamed), []) == offsets


def test_echo_scores_the_prompt(server, offline):
    """What lm-evaluation-harness sends for loglikelihood: echo, logprobs, max_tokens 0 or 1."""
    ids = server.engine.tokenizer.encode(PROMPTS[0])
    one = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1,
                                           temperature=0, echo=True, logprobs=1,
                                           extra_body=NO_EOS).choices[0]
    assert one.text.startswith(PROMPTS[0]) and len(one.text) > len(PROMPTS[0])
    lp = one.logprobs
    assert len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])

    # The same token, generated offline, and then scored as part of a longer prompt.
    offline_params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logprobs=0)
    generated = offline.generate(PROMPTS[0], offline_params, use_tqdm=False)[0].outputs[0]
    token_id = generated.token_ids[0]
    assert lp.token_logprobs[-1] == pytest.approx(generated.logprobs[0][token_id].logprob,
                                                  abs=1e-4)
    scored = server.client.completions.create(model="tiny", prompt=ids + [token_id],
                                              max_tokens=0, echo=True, logprobs=0).choices[0]
    assert scored.finish_reason == "length"
    assert scored.logprobs.tokens == lp.tokens
    assert scored.logprobs.token_logprobs[0] is None
    # Prefill and decode compute the last logprob in different kernels: fp32 rounding only.
    assert scored.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-3)

    zero = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=0,
                                            echo=True)
    assert zero.choices[0].text == PROMPTS[0] and zero.choices[0].logprobs is None
    assert zero.usage.completion_tokens == 0


def test_echo_streams_the_prompt_first(server):
    chunks = list(server.client.completions.create(model="tiny", prompt=PROMPTS[1], echo=True,
                                                   max_tokens=4, stream=True, temperature=0,
                                                   extra_body=NO_EOS))
    assert chunks[0].choices[0].text.startswith(PROMPTS[1])
    plain = server.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4,
                                             temperature=0, extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in chunks) == PROMPTS[1] + plain.choices[0].text


# ---- stop strings -------------------------------------------------------------------------


def test_stop_strings(server):
    full = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40,
                                            temperature=0, logprobs=0, extra_body=NO_EOS)
    tokens = full.choices[0].logprobs.tokens
    full = full.choices[0].text

    # A two-character stop string across a token boundary, first seen there: the stream must
    # hold back its first character until the next token shows whether the stop matched.
    def boundary_ok(j: int) -> bool:
        b = len("".join(tokens[:j]))
        return (full.startswith("".join(tokens[:j + 1])) and "\ufffd" not in tokens[j]
                and full.find(full[b - 1:b + 1]) == b - 1)

    start = len("".join(tokens[:next(j for j in range(2, len(tokens) - 1) if boundary_ok(j))])) - 1
    stop = full[start:start + 2]
    out = server.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40,
                                           temperature=0, stop=[stop, "never appears"],
                                           extra_body=NO_EOS).choices[0]
    assert out.text == full[:start]
    assert out.finish_reason == "stop" and out.model_extra["stop_reason"] == stop

    chunks = list(server.client.completions.create(model="tiny", prompt=PROMPTS[0],
                                                   max_tokens=40, temperature=0, stop=stop,
                                                   stream=True, extra_body=NO_EOS))
    assert "".join(c.choices[0].text for c in chunks) == full[:start]
    assert chunks[-1].choices[0].finish_reason == "stop"

    kept = server.client.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop,
        extra_body={**NO_EOS, "include_stop_str_in_output": True}).choices[0]
    assert kept.text == full[:start + 2]


# ---- chat ---------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Tell me about the train."}]


def test_chat_renders_the_template_once(server):
    tok = server.engine.tokenizer
    ids = server.http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert ids == tok.encode(rendered, add_special_tokens=False)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id

    chat = server.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10,
                                                 temperature=0, extra_body=NO_EOS)
    completion = server.client.completions.create(model="tiny", prompt=ids, max_tokens=10,
                                                  temperature=0, extra_body=NO_EOS)
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == completion.choices[0].text
    assert chat.usage.prompt_tokens == len(ids) and chat.usage.completion_tokens == 10
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")

    parts = [{"role": "system", "content": [{"type": "text", "text": "You are brief."}]},
             MESSAGES[1]]
    as_parts = server.client.chat.completions.create(model="tiny", messages=parts, max_tokens=10,
                                                     temperature=0, extra_body=NO_EOS)
    assert as_parts.choices[0].message.content == choice.message.content


def test_chat_stream(server):
    full = server.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                                 n=2, temperature=0, extra_body=NO_EOS)
    chunks = list(server.client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, n=2, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=NO_EOS))
    texts = {0: "", 1: ""}
    reasons, roles = {}, {0: [], 1: []}
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk"
        for c in chunk.choices:
            roles[c.index].append(c.delta.role)
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in full.choices}
    # The role comes once, in each choice's first chunk, with its first token's text (vLLM:
    # a client timing the first chunk measures the prefill, not an empty role chunk).
    assert all(r[0] == "assistant" and set(r[1:]) <= {None} for r in roles.values())
    first = {c.index: c.delta.content for chunk in reversed(chunks[:-1]) for c in chunk.choices}
    assert all(first[k] and texts[k].startswith(first[k]) for k in (0, 1))
    assert reasons == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_chat_logprobs(server):
    out = server.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5,
                                                temperature=0, logprobs=True, top_logprobs=2,
                                                extra_body=NO_EOS)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob == entry.logprob >= entry.top_logprobs[1].logprob
        assert entry.bytes == list(entry.token.encode())
    without = server.client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                    max_tokens=5, temperature=0,
                                                    extra_body=NO_EOS)
    assert without.choices[0].logprobs is None
    streamed = []
    for chunk in server.client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
            top_logprobs=2, stream=True, extra_body=NO_EOS):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed.extend(chunk.choices[0].logprobs.content)
    assert [e.token for e in streamed] == [e.token for e in content]


def test_tokenize_detokenize(server):
    tok = server.engine.tokenizer
    out = server.http.post("/tokenize", json={"model": "tiny", "prompt": PROMPTS[0]}).json()
    assert out == {"count": len(out["tokens"]), "max_model_len": MAX_MODEL_LEN,
                   "tokens": tok.encode(PROMPTS[0])}
    plain = server.http.post("/tokenize", json={"prompt": PROMPTS[0],
                                                "add_special_tokens": False}).json()
    assert plain["tokens"] == out["tokens"][1:]
    back = server.http.post("/detokenize", json={"tokens": out["tokens"]}).json()
    assert back == {"prompt": PROMPTS[0]}


# ---- errors -------------------------------------------------------------------------------

BAD_COMPLETIONS = [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "n": 65}, "n"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, 5000]}, "5000"),
    ({"prompt": [1, -3]}, "prompt"),
    ({"prompt": "x", "stop_token_ids": [99999]}, "stop_token_ids"),
    ({}, "prompt"),
]


@pytest.mark.parametrize("body,mentions", BAD_COMPLETIONS)
def test_invalid_completion_request_is_400(server, body, mentions):
    response = server.http.post("/v1/completions", json={"model": "tiny", **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == 400 and error["type"] == "BadRequestError"
    assert mentions in error["message"]


def test_prompt_too_long_names_the_limit(server):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.completions.create(model="tiny", prompt=[1] * (MAX_MODEL_LEN + 5))
    assert str(MAX_MODEL_LEN) in raised.value.message
    assert str(MAX_MODEL_LEN + 5) in raised.value.message
    assert raised.value.body["code"] == 400
    good_request_works(server)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"prompt": "x", "temperature": NaN}',
                                 b'{"prompt": "x", "top_k": 1e400}', b"\xff\xfe"])
def test_malformed_bodies_are_400(server, raw):
    response = server.http.post("/v1/completions", content=raw,
                                headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == 400
    assert "Traceback" not in response.text


BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "chat template"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
]


@pytest.mark.parametrize("body,mentions", BAD_CHATS)
def test_invalid_chat_request_is_400(server, body, mentions):
    response = server.http.post("/v1/chat/completions", json={"model": "tiny", **body})
    assert response.status_code == 400
    assert mentions in response.json()["error"]["message"]


def test_unknown_model_and_route_are_404(server):
    with pytest.raises(openai.NotFoundError) as raised:
        server.client.completions.create(model="gpt-5", prompt="x", max_tokens=1)
    assert raised.value.body["param"] == "model" and "gpt-5" in raised.value.message
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-5", messages=MESSAGES)
    response = server.http.get("/v1/nothing-here")
    assert response.status_code == 404 and response.json()["error"]["code"] == 404
    assert server.http.get("/v1/completions").status_code == 405
    good_request_works(server)


# ---- hang-ups and load --------------------------------------------------------------------


def _long_body(stream: bool) -> dict:
    return {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True,
            "stream": stream}


def test_client_hangup_during_stream_frees_kv(server):
    generated_before = server.metric("cpserve:generation_tokens_total")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=_long_body(True)) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            # Stats are refreshed before outputs are delivered: no waiting needed.
            assert server.metric("cpserve:num_requests_running") == 1
            assert server.metric("cpserve:kv_cache_usage_perc") > 0
    # The connection is closed; the request must go at once, long before its 400 tokens.
    server.wait_idle(timeout_s=3)
    assert server.metric("cpserve:generation_tokens_total") - generated_before < 400
    server.check_integrity()
    good_request_works(server)


def test_client_hangup_while_waiting_for_a_full_response(server):
    generated_before = server.metric("cpserve:generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/completions", json=_long_body(False), timeout=0.3)
    server.wait_idle(timeout_s=3)
    assert server.metric("cpserve:generation_tokens_total") - generated_before < 400
    server.check_integrity()


def test_64_concurrent_streams(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        if i % 2:
            stream = await client.completions.create(
                model="tiny", prompt=f"{PROMPTS[i % 2]} {i}", max_tokens=16, stream=True,
                seed=i, extra_body=NO_EOS)
            text, reason = "", None
            async for chunk in stream:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            return text, reason
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=16,
            stream=True, seed=i, extra_body=NO_EOS)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run_all() -> list:
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    generated_before = server.metric("cpserve:generation_tokens_total")
    results = asyncio.run(run_all())
    assert [reason for _, reason in results] == ["length"] * 64
    assert server.metric("cpserve:generation_tokens_total") - generated_before == 64 * 16
    server.wait_idle()
    server.check_integrity()


def test_metrics(server):
    text = server.http.get("/metrics").text
    for name in ("cpserve:num_requests_running", "cpserve:num_requests_waiting",
                 "cpserve:kv_cache_usage_perc", "cpserve:prompt_tokens_total",
                 "cpserve:generation_tokens_total", "cpserve:num_preemptions_total",
                 "cpserve:time_to_first_token_seconds_bucket",
                 "cpserve:inter_token_latency_seconds_bucket",
                 "cpserve:e2e_request_latency_seconds_bucket"):
        assert f"\n{name}" in text, name
    names = ("e2e_request_latency_seconds_count", "time_to_first_token_seconds_count",
             "inter_token_latency_seconds_count")
    before = {n: server.metric(f"cpserve:{n}") for n in names}
    for i in range(3):  # one after another: each step gives each request one token
        server.client.completions.create(model="tiny", prompt=f"counted {i}", max_tokens=6,
                                         extra_body=NO_EOS)
    delta = {n: server.metric(f"cpserve:{n}") - before[n] for n in names}
    assert delta == {"e2e_request_latency_seconds_count": 3,
                     "time_to_first_token_seconds_count": 3,
                     "inter_token_latency_seconds_count": 3 * 5}
    assert 0 < server.metric("cpserve:time_to_first_token_seconds_sum") < math.inf
