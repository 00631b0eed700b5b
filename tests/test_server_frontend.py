"""What the API front end in its own process gives a client: HTTP and tokenizing never delay
the engine's steps, and every step reaches a stream as an event of its own.

One server for the module: a tiny checkpoint whose context is long enough (640k tokens) that a
4 MB prompt is tokenized whole before it is refused, as a long-context server must do.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from cpserve.engine.args import EngineArgs
from cpserve.engine.async_engine import AsyncEngine
from cpserve.entrypoints.openai.api_server import ServerThread, build_app
from tests.checkpoints import make_checkpoint

MAX_MODEL_LEN = 640 * 1024
# 4 MB and 1.1M tokens: seconds of tokenizing, since no head of it can be refused early (16
# characters a token are allowed). The 10 MB prompt costs the same, 2.5 times longer.
HUGE_PROMPT = "The morning train left the station. " * 112_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # KV of 64 bytes a token (1 layer, 1 KV head of 8), so the context's KV is 40 MiB.
    path = make_checkpoint(tmp_path_factory.mktemp("long"), "qwen2", num_hidden_layers=1,
                           hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=32, max_position_embeddings=MAX_MODEL_LEN)
    engine = AsyncEngine.from_engine_args(EngineArgs(
        model=str(path), max_model_len=MAX_MODEL_LEN, num_kv_blocks=MAX_MODEL_LEN // 16,
        max_num_seqs=64))
    engine.start()
    thread = ServerThread(build_app(engine, served_model_names=["long"])).start()
    yield thread.url, engine
    thread.stop()
    engine.shutdown()


async def _stream(client: httpx.AsyncClient, body: dict) -> list[dict]:
    async with client.stream("POST", "/v1/completions", json={"model": "long", "stream": True,
                                                               **body}) as response:
        assert response.status_code == 200
        return [json.loads(line[6:]) async for line in response.aiter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def test_a_huge_prompt_does_not_delay_a_small_request(server):
    """One process tokenized the huge prompt in the thread the small one waited for, beside
    the engine loop in the same interpreter: with a 10 MB prompt, the small request took 7 s
    instead of 0.1 s (here, 4 MB: about 3 s on two idle cores)."""
    url, _ = server
    small = {"prompt": "hello", "max_tokens": 8, "ignore_eos": True}

    async def run() -> tuple[float, float, httpx.Response, bool]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            started = time.monotonic()
            await _stream(client, small)
            alone = time.monotonic() - started
            huge = asyncio.ensure_future(client.post("/v1/completions", json={
                "model": "long", "prompt": HUGE_PROMPT, "max_tokens": 1}))
            await asyncio.sleep(0.5)  # sent, and being tokenized
            started = time.monotonic()
            events = await _stream(client, small)
            beside = time.monotonic() - started
            huge_still_running = not huge.done()
            assert len(events) >= 1 and events[-1]["choices"][0]["finish_reason"] == "length"
            return alone, beside, await huge, huge_still_running

    alone, beside, huge, overlapped = asyncio.run(run())
    assert huge.status_code == 400  # tokenized whole: the count is exact
    assert "1120002 tokens" in huge.json()["error"]["message"]
    assert overlapped, "the huge prompt finished before the small request: nothing was tested"
    assert beside < max(1.5, 5 * alone), (alone, beside)


def test_every_step_sends_each_stream_one_event(server):
    """64 streams at once, each token a letter (logit_bias), so every step gives every stream
    new text: each stream gets one event per token. One process sent them in bursts (97 to
    118 events for 128 tokens at this concurrency, 8 to 21 for 32 on a GPU)."""
    url, engine = server
    letters = [engine.tokenizer.encode(c, add_special_tokens=False) for c in "ABCDEFGHIJKLMN"]
    assert all(len(ids) == 1 for ids in letters)
    bias = {str(ids[0]): 100 for ids in letters}
    num_tokens = 32

    async def run() -> list[list[dict]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(_stream(client, {
                "prompt": f"stream {i}", "max_tokens": num_tokens, "ignore_eos": True,
                "temperature": 1.0, "seed": i, "logit_bias": bias}) for i in range(64)))

    for events in asyncio.run(run()):
        texts = [e["choices"][0]["text"] for e in events]
        assert len(texts) == num_tokens and all(len(t) == 1 for t in texts), texts
        assert events[-1]["choices"][0]["finish_reason"] == "length"

