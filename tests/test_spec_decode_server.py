"""Speculative decoding behind the OpenAI server: streamed and whole completions give the text
of speculation off (several tokens per step reach the client as one delta), and /metrics
carries vLLM's spec_decode counters with the server's labels (prometheus_client's parser)."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cpserve import LLM, SamplingParams
from cpserve.engine.args import EngineArgs
from cpserve.engine.async_engine import AsyncEngine
from cpserve.entrypoints.openai.api_server import ServerThread, build_app

ARGS = dict(model="tiny", max_model_len=256, num_kv_blocks=128, block_size=4)
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
PROMPTS = ["The morning train left the station", "A language model reads a sequence"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server():
    engine = AsyncEngine.from_engine_args(EngineArgs(**ARGS, speculative_config=SPEC))
    app = build_app(engine, served_model_names=["tiny"])
    engine.start()
    thread = ServerThread(app).start()
    client = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0,
                           timeout=60)
    try:
        yield thread.url, client
    finally:
        thread.stop()
        engine.shutdown()


@pytest.fixture(scope="module")
def plain_texts():
    with LLM(**ARGS) as llm:
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                       ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def test_streamed_and_whole_completions_equal_speculation_off(server, plain_texts):
    url, client = server
    for prompt, expected in zip(PROMPTS, plain_texts):
        whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                          temperature=0, extra_body={"ignore_eos": True})
        assert whole.choices[0].text == expected
        assert whole.usage.completion_tokens == MAX_TOKENS
        chunks = list(client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        # Fewer content chunks than tokens: accepted drafts arrive together.
        assert len([c for c in chunks if c.choices and c.choices[0].text]) < MAX_TOKENS


def test_metrics_carry_vllms_spec_decode_counters(server):
    url, client = server
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                              temperature=0, extra_body={"ignore_eos": True})
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(
        f"{url}/metrics").text)}
    labels = {"model_name": "tiny", "engine": "0"}

    def counter(name: str) -> float:
        family = families[name]
        assert family.type == "counter"
        (sample,) = [s for s in family.samples if s.name == f"{name}_total"]
        assert sample.labels == labels
        return sample.value

    drafts = counter("vllm:spec_decode_num_drafts")
    draft_tokens = counter("vllm:spec_decode_num_draft_tokens")
    accepted = counter("vllm:spec_decode_num_accepted_tokens")
    per_position = families["vllm:spec_decode_num_accepted_tokens_per_pos"]
    by_position = {s.labels["position"]: s.value for s in per_position.samples
                   if s.name.endswith("_total")}
    assert all({**labels, "position": p}.items() == s.labels.items()
               for p, s in zip(by_position, per_position.samples))
    assert sorted(by_position) == ["0", "1", "2"]
    assert 0 < accepted == sum(by_position.values()) <= draft_tokens <= 3 * drafts
