"""Prefill-decode disaggregation through real servers: a prefill instance, a decode instance
of another layout, `cpserve proxy` in front, the model with one KV head (so DCP applies).

For each pair of layouts, 20 requests through the proxy (completions and chat, streamed and
not, prompts up to 2k tokens) give the greedy text the prefill instance gives when it serves
them alone, as one colocated server; afterwards neither instance holds a block. The pair is
started once for the module's tests; in one pair the decode instance also speculates.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from cpserve.entrypoints.openai.api_server import ServerThread
from cpserve.entrypoints.proxy import Proxy, build_proxy_app
from tests.checkpoints import random_prompts
from tests.disagg_servers import kv_config, metric, serve, start, stop_all, wait_until_idle

I16 = ["--cp-kv-cache-interleave-size", "16"]  # = --block-size: KV moves across layouts
NGRAM = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}'
PAIRS = {
    "pcp2-to-tp2dcp2": (["-pcp", "2", *I16], ["-tp", "2", "-dcp", "2", *I16]),
    # The decode instance speculating too (issue 13 with 14): the same greedy text.
    "tp2-to-pcp2-ngram": (["-tp", "2", *I16], ["-pcp", "2", *I16, "--speculative-config",
                                                 NGRAM]),
    # Equal layouts: blocks move as they are, any interleave (here 1).
    "equal-tp2dcp2": (["-tp", "2", "-dcp", "2"], ["-tp", "2", "-dcp", "2"]),
}
MAX_TOKENS = 8
TEXTS = ["The morning train left the station", "A language model reads a sequence",
         "When the prompt is very long, one device is not enough.", "Hello, world",
         "The conductor walked through the carriage", "Decode is limited by memory",
         "Most of the passengers were reading,", "Prefill is limited by compute;"]


@pytest.fixture(scope="module", params=list(PAIRS))
def deployment(request):
    prefill_flags, decode_flags = PAIRS[request.param]
    prefill = serve(*prefill_flags, "--kv-transfer-config", kv_config("kv_producer"))
    decode = serve(*decode_flags, "--kv-transfer-config", kv_config("kv_consumer"))
    start(prefill, decode)
    # The proxy's app in this process (test_disaggregation_failures runs `cpserve proxy`).
    front = ServerThread(build_proxy_app(Proxy([prefill.url], [decode.url]))).start()
    yield prefill, decode, front, "--speculative-config" in decode_flags
    front.stop()
    stop_all(decode, prefill)


def _requests() -> list[tuple[str, dict]]:
    """20 (endpoint, body) pairs: every kind of request the proxy passes on."""
    long_a, long_b, mid_a, mid_b = random_prompts([2000, 1900, 300, 150], seed=11)
    common = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0}
    out = [("completions", {**common, "prompt": p, "ignore_eos": True})
           for p in (long_a, long_b, mid_a, mid_b)]
    out += [("completions", {**common, "prompt": t}) for t in TEXTS]
    out += [("chat", {**common, "messages": [{"role": "user", "content": t}]})
            for t in TEXTS[:6]]
    out += [("chat", {**common, "messages": [
        {"role": "system", "content": TEXTS[6]}, {"role": "user", "content": TEXTS[7]},
        {"role": "assistant", "content": TEXTS[0]}, {"role": "user", "content": TEXTS[1]}]})]
    out += [("completions", {**common, "prompt": TEXTS[2] * 40})]  # about 600 tokens of text
    assert len(out) == 20
    return out


def _ask(url: str, endpoint: str, body: dict, stream: bool) -> tuple[str, str]:
    """(text, finish_reason) with the official client, streamed or not."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                           timeout=300)
    body = dict(body)
    model, extra = body.pop("model"), {}
    if "ignore_eos" in body:
        extra["extra_body"] = {"ignore_eos": body.pop("ignore_eos")}
    if endpoint == "completions":
        if not stream:
            choice = client.completions.create(model=model, **body, **extra).choices[0]
            return choice.text, choice.finish_reason
        chunks = list(client.completions.create(model=model, stream=True, **body, **extra))
        return "".join(c.choices[0].text for c in chunks if c.choices), next(
            c.choices[0].finish_reason for c in reversed(chunks) if c.choices)
    if not stream:
        choice = client.chat.completions.create(model=model, **body, **extra).choices[0]
        return choice.message.content, choice.finish_reason
    chunks = list(client.chat.completions.create(model=model, stream=True, **body, **extra))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), next(
        c.choices[0].finish_reason for c in reversed(chunks) if c.choices)


def test_greedy_output_through_the_proxy_equals_one_colocated_server(deployment):
    prefill, decode, front, speculates = deployment
    requests = _requests()
    with ThreadPoolExecutor(8) as pool:
        # The prefill instance serving each request by itself: the colocated reference.
        refs = list(pool.map(lambda r: _ask(prefill.url, *r, stream=False), requests))
        got = list(pool.map(lambda ir: _ask(front.url, *ir[1], stream=ir[0] % 2 == 1),
                            enumerate(requests)))
    for i, (ref, answer) in enumerate(zip(refs, got)):
        assert answer == ref, f"request {i} ({requests[i][0]}, stream={i % 2 == 1})"
    p_status, d_status = wait_until_idle(prefill, decode)
    assert p_status["stats"]["leases_granted_total"] >= len(requests)
    assert d_status["stats"]["loads_done_total"] >= len(requests)
    assert d_status["stats"]["loads_failed_total"] == 0
    received = decode.metric("cpserve:kv_transfer_received_bytes_total")
    assert received > 2000 * 512  # at least the 2k prompt's KV: 4 layers x 16 x 2 x 4 bytes
    assert prefill.metric("cpserve:kv_transfer_sent_bytes_total") == received
    assert decode.metric("cpserve:kv_transfer_load_seconds_count") >= len(requests)
    assert metric(front.url, "cpserve:proxy_requests_total") >= 2 * len(requests)
    if speculates:  # drafts verified over pulled KV, counted by the decode instance
        assert decode.metric("vllm:spec_decode_num_draft_tokens_total") > 0


def test_vllm_proxy_protocol_and_a_repeated_prefix_prefilled_once(deployment):
    """The two calls exactly as vLLM's toy_proxy_server.py makes them (null fields, its
    headers, min_tokens put back as null), for two prompts that share 1k tokens: the
    prefill instance computes the shared blocks once."""
    prefill, decode, _, _ = deployment
    shared, tail_a, tail_b = random_prompts([1024, 40, 50], seed=12)
    headers = {"Authorization": "Bearer None", "X-Request-Id": "vllm-proxy-request"}
    hits_before = prefill.metric("vllm:prefix_cache_hits_total")
    for tail in (tail_a, tail_b):
        body = {"model": "tiny", "prompt": shared + tail, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}
        ref = httpx.post(f"{prefill.url}/v1/completions", json=body, timeout=300).json()
        to_prefill = {**body, "stream": False, "max_tokens": 1, "kv_transfer_params": {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}}
        answer = httpx.post(f"{prefill.url}/v1/completions", json=to_prefill,
                            headers=headers, timeout=300)
        assert answer.status_code == 200, answer.text
        params = answer.json()["kv_transfer_params"]
        assert params["do_remote_prefill"] and params["remote_block_ids"]
        to_decode = {**body, "kv_transfer_params": params, "min_tokens": None,
                     "min_completion_tokens": None}
        got = httpx.post(f"{decode.url}/v1/completions", json=to_decode, headers=headers,
                         timeout=300)
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == ref["choices"][0]["text"]
    # Of the 2 references and the 2 prefill calls, all but the first found the shared 1024
    # tokens cached (a whole number of virtual blocks in every layout here).
    assert prefill.metric("vllm:prefix_cache_hits_total") - hits_before >= 3 * 1024
    wait_until_idle(prefill, decode)
