"""The server's guards, on a strict server of its own: API key (401), body size (413), bounded
waiting queue (503), and max_tokens cut to the context window."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from cpserve.engine.args import EngineArgs
from cpserve.engine.async_engine import AsyncEngine
from cpserve.entrypoints.openai.api_server import ServerThread, build_app
from tests.prometheus import read_metric

KEY = "s3cret-key"
MAX_MODEL_LEN = 1024
BODY_LIMIT = 8192
# One request runs at a time and one may wait: a third is refused.
ENGINE_ARGS = EngineArgs(model="tiny", max_model_len=MAX_MODEL_LEN, num_kv_blocks=128,
                         max_num_seqs=1, max_waiting_requests=1)


class StrictServer:
    def __init__(self) -> None:
        self.engine = AsyncEngine.from_engine_args(ENGINE_ARGS)
        app = build_app(self.engine, served_model_names=["tiny"], api_key=KEY,
                        max_request_body_bytes=BODY_LIMIT)
        self.engine.start()
        self.thread = ServerThread(app).start()
        self.url = self.thread.url
        self.http = httpx.Client(base_url=self.url, timeout=60,
                                 headers={"Authorization": f"Bearer {KEY}"})
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0,
                                    timeout=60)

    def metric(self, name: str) -> float:
        return read_metric(self.http, name)

    def wait_for(self, name: str, value: float, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} never became {value}"
            time.sleep(0.01)

    def good_request_works(self) -> None:
        out = self.client.completions.create(model="tiny", prompt="hello", max_tokens=2,
                                             extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 2


@pytest.fixture(scope="module")
def server():
    s = StrictServer()
    yield s
    try:
        s.wait_for("cpserve:num_requests_running", 0)
        s.wait_for("cpserve:kv_cache_usage_perc", 0)
        asyncio.run(s.engine.check_integrity())
    finally:
        s.http.close()
        s.thread.stop()
        s.engine.shutdown()


def assert_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


# ---- API key ------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Bearer {KEY}x"},
                                     {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}])
def test_missing_or_wrong_key_is_401(server, headers):
    with httpx.Client(base_url=server.url, headers=headers) as anonymous:
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/v1/models"), ("POST", "/tokenize")):
            response = anonymous.request(method, path, json={"model": "tiny", "prompt": "x"})
            assert "API key" in assert_error(response, 401)["message"]
    server.good_request_works()


def test_openai_client_with_wrong_key(server):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert raised.value.status_code == 401
    assert [m.id for m in server.client.models.list().data] == ["tiny"]


def test_probes_need_no_key(server):
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get("/health").status_code == 200
        assert "cpserve:num_requests_running" in anonymous.get("/metrics").text
        assert anonymous.get("/version").status_code == 200


# ---- body size ----------------------------------------------------------------------------


def test_body_over_the_limit_is_413(server):
    big = {"model": "tiny", "prompt": "x" * BODY_LIMIT}
    error = assert_error(server.http.post("/v1/completions", json=big), 413)
    assert str(BODY_LIMIT) in error["message"]

    def chunks():  # no Content-Length: the limit holds while reading
        for _ in range(BODY_LIMIT // 1000 + 1):
            yield b" " * 1000

    assert_error(server.http.post("/v1/completions", content=chunks(),
                                  headers={"content-type": "application/json"}), 413)
    with pytest.raises(openai.APIStatusError) as raised:
        server.client.completions.create(model="tiny", prompt="word " * BODY_LIMIT)
    assert raised.value.status_code == 413
    server.good_request_works()


# ---- queue bound ----------------------------------------------------------------------------


def test_full_waiting_queue_is_503(server):
    long_body = {"model": "tiny", "prompt": "The morning train", "max_tokens": 900,
                 "ignore_eos": True, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=long_body) as running:
        lines = running.iter_lines()  # held: dropping the iterator would close the stream
        assert next(line for line in lines if line.startswith("data: "))
        # Second request: waits behind the first (max_num_seqs=1).
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(server.client.completions.create, model="tiny",
                                  prompt="hello", max_tokens=3, extra_body={"ignore_eos": True})
            server.wait_for("cpserve:num_requests_waiting", 1)
            with pytest.raises(openai.APIStatusError) as raised:
                server.client.completions.create(model="tiny", prompt="third", max_tokens=3)
            assert raised.value.status_code == 503
            assert raised.value.body["code"] == 503 and "busy" in raised.value.message
            assert server.metric("cpserve:num_requests_running") == 1
            running.close()  # hang up: the first request goes, the waiting one runs
            assert waiting.result(timeout=30).usage.completion_tokens == 3
    server.wait_for("cpserve:num_requests_running", 0)
    server.good_request_works()


def test_a_call_bigger_than_the_whole_queue_is_400_even_when_idle(server):
    # max_waiting_requests=1: two prompts could never be queued at once. Once, an idle
    # queue took any call: 100,000 prompts got in and starved every other client.
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=1)
    assert "--max-waiting-requests 1" in raised.value.message
    assert server.metric("cpserve:num_requests_waiting") == 0
    server.good_request_works()


# ---- max_tokens and the context window ----------------------------------------------------


def test_chat_without_max_tokens_may_fill_the_context(server):
    messages = [{"role": "user", "content": "The morning train left the station. " * 100}]
    out = server.client.chat.completions.create(model="tiny", messages=messages,
                                                extra_body={"ignore_eos": True})
    assert 0 < out.usage.completion_tokens == MAX_MODEL_LEN - out.usage.prompt_tokens
    assert out.choices[0].finish_reason == "length"


def test_max_tokens_beyond_the_context_is_refused_as_vllm_does(server):
    prompt = [100] * (MAX_MODEL_LEN - 3)
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.completions.create(model="tiny", prompt=prompt, max_tokens=50)
    assert raised.value.body["param"] == "max_tokens"
    assert f"maximum context length is {MAX_MODEL_LEN}" in raised.value.message
    assert f"(50 > {MAX_MODEL_LEN} - {MAX_MODEL_LEN - 3})" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=MAX_MODEL_LEN)
    assert raised.value.body["param"] == "max_completion_tokens"
    out = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.completions.create(model="tiny", prompt=[100] * MAX_MODEL_LEN)
    assert str(MAX_MODEL_LEN) in raised.value.message
