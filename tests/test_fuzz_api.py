"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis over
hypothesis): over a thousand generated requests, valid and not, against the real server.
None may get a 5xx, and afterwards the server still serves, with no KV block leaked.

Examples are derandomized, so CI runs the same cases every time; the server is small
(max_model_len 48, 4 sequences at once) so that the valid requests that do generate stay
cheap.
"""

from __future__ import annotations

import asyncio
import collections
import warnings

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from cpserve.engine.args import EngineArgs
from cpserve.engine.async_engine import AsyncEngine
from cpserve.entrypoints.openai.api_server import ServerThread, build_app

# Generated requests per operation; operations without inputs (GET /health, ...) have one.
EXAMPLES = {"/v1/completions": 450, "/v1/chat/completions": 300, "/tokenize": 150,
            "/detokenize": 150}


@pytest.fixture(scope="module")
def server():
    engine = AsyncEngine.from_engine_args(EngineArgs(model="tiny", max_model_len=48,
                                                     num_kv_blocks=16, max_num_seqs=4))
    app = build_app(engine, served_model_names=["tiny"])
    engine.start()
    thread = ServerThread(app).start()
    yield app, thread.url, engine
    thread.stop()
    engine.shutdown()


def test_generated_requests_never_get_a_server_error(server):
    app, url, engine = server
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a duplicate operation id in the schema
        schema = schemathesis.openapi.from_dict(app.openapi())
    statuses: collections.Counter = collections.Counter()
    server_errors = []
    def fuzz(operation) -> None:
        @settings(max_examples=EXAMPLES.get(operation.path, 5), deadline=None, database=None,
                  derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(operation.as_strategy())
        def send(case):
            response = case.call(base_url=url, timeout=30)
            statuses[operation.method.upper(), operation.path, response.status_code] += 1
            if response.status_code >= 500:
                server_errors.append((case.as_curl_command(), response.text[:300]))

        send()

    for result in schema.get_all_operations():
        fuzz(result.ok())
    total = sum(statuses.values())
    assert not server_errors, server_errors[:3]
    assert total >= 1000, statuses
    # Every endpoint answered something, and some generated bodies were valid.
    assert statuses["POST", "/v1/completions", 200] > 0, statuses
    assert statuses["POST", "/tokenize", 200] > 0, statuses

    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "still there",
                                                "max_tokens": 3, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    asyncio.run(engine.check_integrity())
    assert engine.stats().kv_cache_usage == 0 and engine.stats().num_running == 0
