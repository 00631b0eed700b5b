"""A server started the vLLM way: sampling defaults from generation_config.json, --tokenizer,
--chat-template, --max-logprobs, repetition_penalty, and Prometheus metrics with vLLM's names,
labels and buckets (parsed with prometheus_client's own parser)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cpserve import LLM, SamplingParams
from cpserve.engine.args import EngineArgs
from cpserve.engine.async_engine import AsyncEngine
from cpserve.engine.sampler import Sampler, SamplingRow
from cpserve.entrypoints.openai.api_server import ServerThread, build_app
from cpserve.entrypoints.openai.metrics import (
    REQUEST_LATENCY_BUCKETS,
    TOKEN_LATENCY_BUCKETS,
    TTFT_BUCKETS,
)
from cpserve.models.demo import ensure_tiny_model
from tests.checkpoints import load_hf_model

MAX_MODEL_LEN = 256
MAX_NEW_TOKENS = 6  # the generation config's cap on every request
NAME = "deepseek_v3"  # --served-model-name: the metrics' model_name label
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
PROMPT = "The morning train left the station"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tiny's weights and config without its tokenizer (so only --tokenizer can supply one),
    and a generation config that makes unset temperatures greedy."""
    model = tmp_path_factory.mktemp("model")
    tiny = ensure_tiny_model()
    for name in ("config.json", "model.safetensors"):
        (model / name).symlink_to(tiny / name)
    (model / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [1, 5], "temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS}))
    return model


def engine_args(model_dir, **kwargs) -> EngineArgs:
    return EngineArgs(model=str(model_dir), tokenizer=str(ensure_tiny_model()),
                      max_model_len=MAX_MODEL_LEN, num_kv_blocks=64,
                      enable_prefix_caching=False, **kwargs)


@pytest.fixture(scope="module")
def offline(model_dir):
    with LLM(**vars(engine_args(model_dir))) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(model_dir):
    engine = AsyncEngine.from_engine_args(engine_args(model_dir, max_logprobs=3))
    app = build_app(engine, served_model_names=[NAME], chat_template=TEMPLATE)
    engine.start()
    thread = ServerThread(app).start()
    client = openai.OpenAI(base_url=f"{thread.url}/v1", api_key="unused", max_retries=0,
                           timeout=60)
    yield thread, client
    thread.stop()
    engine.shutdown()


def offline_text(offline: LLM, **params) -> str:
    out = offline.generate(PROMPT, SamplingParams(**params), use_tqdm=False)
    return out[0].outputs[0].text


def test_generation_config_defaults_fill_unset_fields(server, offline):
    _, client = server
    greedy = offline_text(offline, temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    assert offline.get_default_sampling_params() == SamplingParams(temperature=0.0,
                                                                   max_tokens=MAX_NEW_TOKENS)
    unset = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=None,
                                      extra_body={"ignore_eos": True})
    assert unset.choices[0].text == greedy  # temperature 0 and max_new_tokens from the file
    capped = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=50,
                                       extra_body={"ignore_eos": True})
    assert capped.usage.completion_tokens == MAX_NEW_TOKENS  # a cap, as in vLLM
    fewer = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=3,
                                      extra_body={"ignore_eos": True})
    assert fewer.usage.completion_tokens == 3
    sampled = client.completions.create(model=NAME, prompt=PROMPT, temperature=1.0, seed=7,
                                        extra_body={"ignore_eos": True})
    assert sampled.choices[0].text == offline_text(offline, temperature=1.0, seed=7,
                                                   max_tokens=MAX_NEW_TOKENS, ignore_eos=True)


def test_repetition_penalty_matches_transformers(server, offline):
    """The demo model repeats itself under greedy decoding: a penalty changes the tokens,
    exactly as transformers' repetition_penalty does."""
    _, client = server
    prompt_ids = offline.get_tokenizer().encode(PROMPT)
    hf = load_hf_model(ensure_tiny_model())
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():  # the mask given: generate() would take BOS (id 0 = pad) for padding
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=MAX_NEW_TOKENS, repetition_penalty=1.5,
                          pad_token_id=0, eos_token_id=None)
    expected = out[0, len(prompt_ids):].tolist()
    plain = offline.generate({"prompt_token_ids": prompt_ids}, SamplingParams(
        temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    penalized = offline.generate({"prompt_token_ids": prompt_ids}, SamplingParams(
        temperature=0, max_tokens=MAX_NEW_TOKENS, ignore_eos=True, repetition_penalty=1.5),
        use_tqdm=False)
    assert penalized[0].outputs[0].token_ids == expected
    assert plain[0].outputs[0].token_ids != expected
    served = client.completions.create(model=NAME, prompt=prompt_ids, temperature=0,
                                       extra_body={"ignore_eos": True,
                                                   "repetition_penalty": 1.5})
    assert served.choices[0].text == penalized[0].outputs[0].text


def test_repetition_penalty_rule():
    """Seen tokens: a positive logit is divided by the penalty, a negative one multiplied;
    the logprobs stay those of the raw logits."""
    logits = torch.tensor([[2.0, 0.1, 1.5, -3.0],    # 2.0 -> 1.0: token 2 wins
                           [-0.5, -0.8, -5.0, -5.0]])  # -0.5 -> -1.0: token 1 wins
    params = SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=0)
    rows = [SamplingRow(params, None, [], prompt_token_ids=[0]),
            SamplingRow(params, None, [0], prompt_token_ids=[3])]
    tokens = Sampler(0)(logits, rows)
    assert [t.token_id for t in tokens] == [2, 1]
    raw = torch.log_softmax(logits, -1)
    assert [t.logprob for t in tokens] == pytest.approx([raw[0, 2].item(), raw[1, 1].item()])


def test_tokenizer_and_chat_template_flags(server, offline):
    thread, _ = server
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    got = httpx.post(f"{thread.url}/tokenize", json={"messages": messages,
                                                     "add_generation_prompt": False}).json()
    rendered = "[user] hi\n[assistant] yo\n"
    assert got["tokens"] == offline.get_tokenizer().encode(rendered, add_special_tokens=False)


def test_max_logprobs_bounds_requests(server):
    _, client = server
    ok = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, logprobs=3)
    assert len(ok.choices[0].logprobs.top_logprobs[0]) >= 3
    for call in (lambda: client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2,
                                                   logprobs=4),
                 lambda: client.chat.completions.create(
                     model=NAME, messages=[{"role": "user", "content": "x"}], logprobs=True,
                     top_logprobs=4)):
        with pytest.raises(openai.BadRequestError) as raised:
            call()
        assert "logprobs=4" in str(raised.value) and "--max-logprobs" in str(raised.value)


# ---- metrics -----------------------------------------------------------------------------

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
COUNTERS = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
            "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:request_success")
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
              "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
              "vllm:request_inference_time_seconds", "vllm:request_prompt_tokens",
              "vllm:request_generation_tokens", "vllm:iteration_tokens_total")


def scrape(url: str) -> dict:
    """Family name -> (type, {(sample name, frozen labels): value})."""
    text = httpx.get(f"{url}/metrics").text
    return {f.name: (f.type, {(s.name, frozenset(s.labels.items())): s.value for s in f.samples})
            for f in text_string_to_metric_families(text)}


def value(families: dict, family: str, sample: str, **labels) -> float:
    labels = {"model_name": NAME, "engine": "0", **labels}
    return families[family][1][(sample, frozenset(labels.items()))]


def buckets(families: dict, family: str) -> list[float]:
    return sorted(float(dict(key[1])["le"]) for key in families[family][1]
                  if key[0].endswith("_bucket") and dict(key[1])["le"] != "+Inf")


def success_total(families: dict, reason: str) -> float:
    return value(families, "vllm:request_success", "vllm:request_success_total",
                 finished_reason=reason)


def wait_for(url: str, predicate, what: str) -> dict:
    deadline = time.monotonic() + 10
    while not predicate(families := scrape(url)):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return families


def test_metrics_have_vllms_names_labels_and_buckets(server):
    thread, client = server

    def idle(m: dict) -> bool:
        return value(m, "vllm:num_requests_running", "vllm:num_requests_running") == 0

    def delta(family: str, sample: str, **labels) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    before = wait_for(thread.url, idle, "the server never went idle")
    one = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4,
                                    extra_body={"ignore_eos": True})
    two = client.completions.create(model=NAME, prompt="Hello", max_tokens=3, n=2,
                                    extra_body={"ignore_eos": True})
    after = wait_for(thread.url, idle, "the server never went idle")

    # Two requests (one of them with n=2), not three completions.
    assert delta("vllm:request_success", "vllm:request_success_total",
                 finished_reason="length") == 2
    assert delta("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 2
    assert delta("vllm:request_generation_tokens", "vllm:request_generation_tokens_sum") == 4 + 6
    assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == 4 + 6
    assert delta("vllm:prompt_tokens", "vllm:prompt_tokens_total") == (
        one.usage.prompt_tokens + two.usage.prompt_tokens)
    # Tokens computed by the steps: each completion's prompt (no prefix caching here), then
    # each generated token but the last.
    assert delta("vllm:iteration_tokens_total", "vllm:iteration_tokens_total_sum") == (
        (one.usage.prompt_tokens + 4 - 1) + 2 * (two.usage.prompt_tokens + 3 - 1))

    # A client that leaves mid-stream: its request ends as "abort".
    aborted_before = success_total(after, "abort")
    with httpx.stream("POST", f"{thread.url}/v1/completions", timeout=60, json={
            "model": NAME, "prompt": PROMPT, "max_tokens": MAX_NEW_TOKENS, "stream": True,
            "ignore_eos": True, "temperature": 0}) as response:
        next(response.iter_lines())
    m = wait_for(thread.url, lambda m: success_total(m, "abort") == aborted_before + 1,
                 "the abandoned stream was never counted as aborted")

    for name in GAUGES:
        assert m[name][0] == "gauge", name
        assert value(m, name, name) >= 0
    for name in COUNTERS:
        assert m[name][0] == "counter", name
    for name in HISTOGRAMS:
        assert m[name][0] == "histogram", name
        assert value(m, name, f"{name}_count") > 0, name
    for name, (_, samples) in m.items():  # every vllm: sample carries vLLM's labels
        if name.startswith("vllm:"):
            for _, labels in samples:
                assert {"model_name": NAME, "engine": "0"}.items() <= dict(labels).items()
    assert buckets(m, "vllm:time_to_first_token_seconds") == list(TTFT_BUCKETS)
    assert buckets(m, "vllm:inter_token_latency_seconds") == list(TOKEN_LATENCY_BUCKETS)
    assert buckets(m, "vllm:e2e_request_latency_seconds") == list(REQUEST_LATENCY_BUCKETS)
    assert buckets(m, "vllm:request_queue_time_seconds") == list(REQUEST_LATENCY_BUCKETS)
    assert buckets(m, "vllm:request_prompt_tokens") == [1, 2, 5, 10, 20, 50, 100, 200]
    assert {dict(labels)["finished_reason"] for sample, labels in m["vllm:request_success"][1]
            } == {"stop", "length", "abort"}

    # Names vLLM deprecated that its example Grafana dashboard reads: the same data.
    assert value(m, "vllm:gpu_cache_usage_perc", "vllm:gpu_cache_usage_perc") == value(
        m, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc")
    assert buckets(m, "vllm:time_per_output_token_seconds") == list(TOKEN_LATENCY_BUCKETS)
    assert value(m, "vllm:time_per_output_token_seconds",
                 "vllm:time_per_output_token_seconds_count") == value(
        m, "vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count")
    # The previous release's names, unlabelled, still written for this release.
    generated = value(m, "vllm:generation_tokens", "vllm:generation_tokens_total")
    assert m["cpserve:generation_tokens"][1][("cpserve:generation_tokens_total",
                                              frozenset())] == generated
    assert m["cpserve:request_success"][1][("cpserve:request_success_total", frozenset(
        {("finished_reason", "abort")}))] == success_total(m, "abort")
