"""A request the engine cannot complete fails alone: its HTTP call gets an error naming why,
and the server goes on serving everyone else.

The checkpoint has one poisoned token (`make_poisoned_checkpoint`): any prompt holding it
gives non-finite logits.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cpserve.engine.args import EngineArgs
from cpserve.engine.async_engine import AsyncEngine
from cpserve.entrypoints.openai.api_server import ServerThread, build_app
from tests.checkpoints import make_poisoned_checkpoint

POISON = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_poisoned_checkpoint(tmp_path_factory.mktemp("poisoned"), POISON)
    engine = AsyncEngine.from_engine_args(EngineArgs(model=str(path), max_model_len=256,
                                                     num_kv_blocks=64))
    engine.start()
    thread = ServerThread(build_app(engine, served_model_names=["poisoned"])).start()
    with httpx.Client(base_url=thread.url, timeout=60) as http:
        yield http, engine
    thread.stop()
    engine.shutdown()


def completion(http: httpx.Client, prompt: list[int], **extra) -> httpx.Response:
    return http.post("/v1/completions", json={"model": "poisoned", "prompt": prompt,
                                              "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                              **extra})


def test_a_failing_request_gets_an_error_and_the_others_their_answers(server):
    http, engine = server
    good = completion(http, [5, 6, 7])
    assert good.status_code == 200
    failed = completion(http, [5, POISON, 7])
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error["code"] == 500 and "not finite" in error["message"]
    # Streamed: the error arrives as an event, then [DONE].
    with http.stream("POST", "/v1/completions", json={
            "model": "poisoned", "prompt": [POISON, 9], "max_tokens": 4, "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "not finite" in json.loads(events[-2])["error"]["message"]
    assert http.get("/health").status_code == 200 and not engine.is_dead
    again = completion(http, [5, 6, 7])
    assert again.status_code == 200 and again.json()["choices"] == good.json()["choices"]
    asyncio.run(engine.check_integrity())
    assert engine.stats().kv_cache_usage == 0
