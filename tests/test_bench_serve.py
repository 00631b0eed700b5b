"""Tests of `cpserve bench serve`: workload generation, SSE parsing, metric math, the CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket

import numpy as np
import pytest

from cpserve.bench.datasets import (
    MIN_RANDOM_TOKEN_ID,
    SampleRequest,
    arrival_intervals,
    sample_random_requests,
)
from cpserve.bench.metrics import RequestOutput, calculate_metrics, format_result
from cpserve.bench.serve import (
    SSEDecoder,
    add_cli_args,
    build_payload,
    send_request,
    token_text,
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Workload


def test_token_id_prompts_have_exact_lengths_without_range():
    reqs = sample_random_requests(50, input_len=37, output_len=5, seed=3, vocab_size=1000)
    assert len(reqs) == 50
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == 37 == r.prompt_len
        assert r.max_tokens == 5
        assert all(MIN_RANDOM_TOKEN_ID <= t < 1000 for t in r.prompt)
    # Random, not one prompt repeated.
    assert len({tuple(r.prompt) for r in reqs}) == 50


def test_range_ratio_bounds_and_spread():
    reqs = sample_random_requests(2000, input_len=100, output_len=20, range_ratio=0.5, seed=0)
    ins = np.array([len(r.prompt) for r in reqs])
    outs = np.array([r.max_tokens for r in reqs])
    assert ins.min() >= 50 and ins.max() <= 150
    assert outs.min() >= 10 and outs.max() <= 30
    # Uniform over 101 values: 2000 draws reach both ends and centre near 100
    # (std of the mean ~0.65, so 3 is over 4 sigma).
    assert ins.min() <= 52 and ins.max() >= 148
    assert abs(ins.mean() - 100) < 3
    assert all(r.prompt_len == len(r.prompt) for r in reqs)


def test_shared_prefix_is_common_and_counted():
    reqs = sample_random_requests(20, input_len=16, output_len=4, prefix_len=24, seed=1)
    prefix = reqs[0].prompt[:24]
    for r in reqs:
        assert r.prompt[:24] == prefix
        assert len(r.prompt) == 24 + 16 == r.prompt_len
    assert len({tuple(r.prompt[24:]) for r in reqs}) == 20


def test_seed_makes_the_workload_reproducible():
    a = sample_random_requests(10, 64, 8, range_ratio=0.3, prefix_len=5, seed=7)
    b = sample_random_requests(10, 64, 8, range_ratio=0.3, prefix_len=5, seed=7)
    c = sample_random_requests(10, 64, 8, range_ratio=0.3, prefix_len=5, seed=8)
    assert a == b
    assert a != c


def test_chat_prompts_without_tokenizer_are_words():
    reqs = sample_random_requests(10, input_len=30, output_len=4, prefix_len=6, seed=2,
                                  as_text=True)
    first = reqs[0].prompt.split(" ")[:6]
    for r in reqs:
        words = r.prompt.split(" ")
        assert isinstance(r.prompt, str) and len(words) == 36 == r.prompt_len
        assert words[:6] == first


def test_bad_range_ratio_is_rejected():
    with pytest.raises(ValueError, match="range-ratio"):
        sample_random_requests(1, 10, 10, range_ratio=1.0)


def _train_tokenizer():
    """A real byte-level BPE tokenizer, trained here so the test needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog while prefill reads the prompt",
            "decode writes one token at a time and keys and values live in blocks"] * 50
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_tokenizer_prompts_reencode_to_the_planned_length():
    tokenizer = _train_tokenizer()
    reqs = sample_random_requests(20, input_len=50, output_len=4, range_ratio=0.2, prefix_len=10,
                                  seed=0, tokenizer=tokenizer)
    common = os.path.commonprefix([r.prompt for r in reqs])
    assert len(tokenizer.encode(common, add_special_tokens=False)) >= 10  # the shared prefix
    for r in reqs:
        assert isinstance(r.prompt, str)
        assert "\ufffd" not in r.prompt and "<s>" not in r.prompt and "</s>" not in r.prompt
        # The recorded length is the true one, and inside the planned range of 10 + [40, 60].
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
        assert 50 <= r.prompt_len <= 70


def test_poisson_arrivals():
    gaps = arrival_intervals(20001, request_rate=4.0, seed=5)
    assert gaps[0] == 0.0
    body = gaps[1:]
    # Exponential gaps: mean 1/rate, coefficient of variation 1. With 20000 samples the
    # standard error of either is under 1%, so 3% is a safe bound.
    assert abs(body.mean() - 0.25) < 0.25 * 0.03
    assert abs(body.std() / body.mean() - 1.0) < 0.03
    assert np.array_equal(gaps, arrival_intervals(20001, 4.0, seed=5))
    assert not np.array_equal(gaps, arrival_intervals(20001, 4.0, seed=6))


def test_burstiness_shapes_the_gaps_and_inf_sends_at_once():
    gaps = arrival_intervals(20001, request_rate=10.0, burstiness=4.0, seed=0)[1:]
    # Gamma with shape 4: same mean, coefficient of variation 1/sqrt(4).
    assert abs(gaps.mean() - 0.1) < 0.1 * 0.03
    assert abs(gaps.std() / gaps.mean() - 0.5) < 0.03
    assert np.array_equal(arrival_intervals(7, math.inf), np.zeros(7))
    with pytest.raises(ValueError):
        arrival_intervals(3, 0.0)


# ---------------------------------------------------------------------------------------------
# Wire


_STREAM = (
    b": keep-alive\r\n\r\n"
    b'data: {"choices":[{"text":"h\xc3\xa9"}]}\r\n\r\n'
    b"event: message\n"
    b"data: line one\n"
    b"data:line two\n\n"
    b"data: [DONE]\n\n"
)
_EVENTS = ['{"choices":[{"text":"hé"}]}', "line one\nline two", "[DONE]"]


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_sse_decoder_reassembles_events_split_anywhere(piece):
    decoder = SSEDecoder()
    events = []
    for i in range(0, len(_STREAM), piece):
        events += decoder.feed(_STREAM[i:i + piece])
    events += decoder.close()
    assert events == _EVENTS


def test_sse_decoder_flushes_an_unterminated_last_event():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b") == ["a"]
    assert decoder.close() == ["b"]
    assert decoder.close() == []


def test_token_text_rules():
    assert token_text({"choices": [{"text": "ab", "finish_reason": None}]}, chat=False) == "ab"
    # An empty completion chunk mid-stream is a token whose text is held back.
    assert token_text({"choices": [{"text": "", "finish_reason": None}]}, chat=False) == ""
    assert token_text({"choices": [{"text": "", "finish_reason": "length"}]}, chat=False) is None
    assert token_text({"choices": [], "usage": {"completion_tokens": 3}}, chat=False) is None
    role_only = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
    assert token_text(role_only, chat=True) is None
    assert token_text({"choices": [{"delta": {"content": "x"}}]}, chat=True) == "x"
    assert token_text({"choices": [{"delta": {"reasoning_content": "r"}}]}, chat=True) == "r"


def test_payloads():
    req = SampleRequest(prompt=[11, 12], prompt_len=2, max_tokens=9)
    p = build_payload(req, "m", chat=False, ignore_eos=True)
    assert p["prompt"] == [11, 12] and p["max_tokens"] == 9 and p["ignore_eos"] is True
    assert p["stream"] is True and p["stream_options"] == {"include_usage": True}
    assert "temperature" not in p
    c = build_payload(SampleRequest("hi there", 2, 3), "m", chat=True, temperature=0.0)
    assert c["messages"] == [{"role": "user", "content": "hi there"}]
    assert c["max_completion_tokens"] == 3 and c["temperature"] == 0.0
    assert "ignore_eos" not in c


def test_unreachable_server_is_recorded_as_a_failure():
    with socket.socket() as s:  # a port nobody listens on: bind, read it, close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await send_request(session, f"http://127.0.0.1:{port}/v1/completions", {},
                                      b'{"prompt": "x"}', chat=False, prompt_len=1)

    out = asyncio.run(go())
    assert not out.success
    assert "Connect" in out.error or "connect" in out.error


# ---------------------------------------------------------------------------------------------
# Metrics and output


def _recorded():
    return [
        RequestOutput(success=True, prompt_len=10, output_tokens=3, ttft=0.1, itl=[0.02, 0.03],
                      latency=0.15),
        RequestOutput(success=True, prompt_len=20, output_tokens=2, ttft=0.2, itl=[0.05],
                      latency=0.25),
        RequestOutput(success=True, prompt_len=5, output_tokens=1, ttft=0.3, latency=0.3),
        RequestOutput(success=False, prompt_len=7, error="HTTP 500: boom"),
    ]


def test_metric_math_on_recorded_timings():
    m = calculate_metrics(_recorded(), duration=2.0, percentiles=[50, 99, 99.9])
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["total_input_tokens"] == 35 and m["total_output_tokens"] == 6
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx(20.5)
    # TTFT over the three successes: 100, 200, 300 ms.
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p99_ttft_ms"] == pytest.approx(298.0)  # 200 + 0.98 * 100, linear interpolation
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt(20000 / 3))
    # TPOT only for requests with more than one token: (150-100)/2 = 25, (250-200)/1 = 50.
    assert m["mean_tpot_ms"] == pytest.approx(37.5)
    assert m["p50_tpot_ms"] == pytest.approx(37.5)
    # ITL: every gap of every success: 20, 30, 50 ms.
    assert m["mean_itl_ms"] == pytest.approx(100 / 3)
    assert m["median_itl_ms"] == pytest.approx(30.0)
    assert m["p99_itl_ms"] == pytest.approx(49.6)  # index 1.98: 30 + 0.98 * 20
    assert m["p99.9_itl_ms"] == pytest.approx(49.96)
    assert m["mean_e2el_ms"] == pytest.approx(700 / 3)
    # Per-request lists keep every request, failures included, in order.
    assert m["input_lens"] == [10, 20, 5, 7]
    assert m["output_lens"] == [3, 2, 1, 0]
    assert m["ttfts"] == [0.1, 0.2, 0.3, 0.0]
    assert m["itls"] == [[0.02, 0.03], [0.05], [], []]
    assert m["errors"] == ["", "", "", "HTTP 500: boom"]
    json.dumps(m)  # the result must be JSON-serialisable as it stands


def test_metrics_when_everything_failed():
    m = calculate_metrics([RequestOutput(error="x")], duration=1.0)
    assert m["completed"] == 0 and m["failed"] == 1
    assert m["mean_ttft_ms"] == 0.0 and m["p99_itl_ms"] == 0.0 and m["output_throughput"] == 0.0


def test_table_has_the_vllm_labels():
    m = calculate_metrics(_recorded(), duration=2.0)
    m.update(request_rate=math.inf, max_concurrency=4)
    lines = format_result(m).splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert "Successful requests:                     3         " in lines
    assert "Failed requests:                         1         " in lines
    assert "Maximum request concurrency:             4         " in lines
    assert "Total generated tokens:                  6         " in lines
    assert "Mean TTFT (ms):                          200.00    " in lines
    assert "P99 ITL (ms):                            49.60     " in lines
    assert "Median E2EL (ms):                        250.00    " in lines
    for title in ("Time to First Token", "Time per Output Token (excl. 1st token)",
                  "Inter-token Latency", "End-to-end Latency"):
        assert any(line.strip("-") == title and len(line) == 50 for line in lines)


def test_cli_defaults_and_endpoint_forms():
    args = _parse([])
    assert args.endpoint is None and args.num_prompts == 1000
    assert args.random_input_len == 1024 and args.random_output_len == 128
    assert args.random_range_ratio == 0.0 and args.random_prefix_len == 0
    assert math.isinf(args.request_rate) and args.max_concurrency is None
    assert args.result_dir == "." and not args.save_result
    assert _parse(["--endpoint", "chat"]).endpoint == "chat"
    assert _parse(["--endpoint", "/v1/chat/completions"]).endpoint == "chat"
    assert _parse(["--endpoint", "/v1/completions"]).endpoint == "completions"
    with pytest.raises(SystemExit):
        _parse(["--endpoint", "/v1/embeddings"])


def test_base_url_and_result_filename():
    from cpserve.bench.serve import _base_url, _result_stem

    assert _base_url(_parse(["--port", "9001"])) == "http://127.0.0.1:9001"
    assert _base_url(_parse(["--base-url", "http://h:8000/v1/"])) == "http://h:8000"
    result = {"model": "/models/Llama-3.1-8B/", "date": "20260101-120000"}
    args = _parse(["--request-rate", "4", "--max-concurrency", "8"])
    assert _result_stem(args, result) == "openai-4.0qps-concurrency8-Llama-3.1-8B-20260101-120000"
    assert _result_stem(_parse([]), result) == "openai-infqps-Llama-3.1-8B-20260101-120000"
    assert _result_stem(_parse(["--result-filename", "r.json"]), result) == "r"


# ---------------------------------------------------------------------------------------------
# End to end: our real server, the demo model, the benchmark through HTTP only

_API_KEY = "bench-test-key"


@pytest.fixture(scope="module")
def cpserve_server():
    """`cpserve serve tiny` in its own process on a free loopback port, with an API key."""
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpserve.entrypoints.cli", "serve", "tiny", "--device", "cpu",
         "--host", "127.0.0.1", "--port", str(port), "--api-key", _API_KEY,
         "--uvicorn-log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"cpserve serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("cpserve serve did not become healthy in 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_e2e_completions_with_token_id_prompts(cpserve_server, tmp_path, capsys, monkeypatch):
    from cpserve.bench.serve import main

    monkeypatch.setenv("OPENAI_API_KEY", _API_KEY)  # the key comes from the environment here
    argv = ["--base-url", cpserve_server, "--num-prompts", "12", "--random-input-len", "32",
            "--random-output-len", "8", "--random-range-ratio", "0.25", "--random-prefix-len", "8",
            "--random-vocab-size", "1000", "--ignore-eos", "--max-concurrency", "4",
            "--seed", "3", "--metric-percentiles", "50,99", "--save-result", "--plot",
            "--result-dir", str(tmp_path), "--disable-tqdm"]
    result = main(_parse(argv))
    planned = sample_random_requests(12, 32, 8, 0.25, 8, seed=3, vocab_size=1000)

    saved = list(tmp_path.glob("openai-infqps-concurrency4-tiny-*.json"))
    assert len(saved) == 1 and saved[0].with_suffix(".png").stat().st_size > 10_000
    data = json.loads(saved[0].read_text())
    assert data["backend"] == "openai" and data["model"] == "tiny"
    assert data["endpoint"] == "/v1/completions" and data["base_url"] == cpserve_server
    assert data["request_rate"] == "inf" and data["max_concurrency"] == 4
    assert data["num_prompts"] == 12 and data["completed"] == 12 and data["failed"] == 0
    assert data["errors"] == [""] * 12
    # Token-id prompts: the server counts exactly what was sent; ignore_eos: exactly max_tokens.
    assert data["input_lens"] == [r.prompt_len for r in planned]
    assert data["output_lens"] == [r.max_tokens for r in planned]
    assert data["total_input_tokens"] == sum(r.prompt_len for r in planned)
    assert data["total_output_tokens"] == sum(r.max_tokens for r in planned)
    assert all(t > 0 for t in data["ttfts"])
    # Token chunks may carry several tokens (the server holds back partial characters), so a
    # request has at most max_tokens - 1 gaps, and all of them are positive or zero.
    for gaps, r in zip(data["itls"], planned):
        assert 0 < len(gaps) <= r.max_tokens - 1 and min(gaps) >= 0
    for stat in ("mean", "median", "std", "p50", "p99"):
        for metric in ("ttft", "tpot", "itl", "e2el"):
            assert data[f"{stat}_{metric}_ms"] >= 0
    assert 0 < data["mean_ttft_ms"] < data["mean_e2el_ms"] <= data["p99_e2el_ms"]
    assert data["mean_tpot_ms"] > 0 and data["mean_itl_ms"] > 0
    assert data["request_throughput"] == pytest.approx(12 / data["duration"])
    assert data["output_throughput"] == pytest.approx(data["total_output_tokens"] / data["duration"])
    assert {k: v for k, v in result.items() if k != "request_rate"} == {
        k: v for k, v in data.items() if k != "request_rate"}
    table = capsys.readouterr().out
    assert "Successful requests:                     12" in table
    assert "P50 TTFT (ms):" in table and "P99 E2EL (ms):" in table


def test_e2e_chat_with_tokenizer_and_poisson_arrivals(cpserve_server, tmp_path):
    from transformers import AutoTokenizer

    from cpserve.bench.serve import main
    from cpserve.models.demo import resolve_model_path

    tokenizer_path = str(resolve_model_path("tiny"))
    argv = ["--base-url", cpserve_server + "/v1", "--endpoint", "/v1/chat/completions",
            "--model", "tiny", "--api-key", _API_KEY, "--tokenizer", tokenizer_path,
            "--num-prompts", "10", "--random-input-len", "40", "--random-output-len", "6",
            "--ignore-eos", "--request-rate", "20", "--save-result", "--result-dir",
            str(tmp_path), "--result-filename", "chat.json", "--disable-tqdm"]
    data = main(_parse(argv))
    assert json.loads((tmp_path / "chat.json").read_text())["completed"] == 10
    assert data["completed"] == 10 and data["endpoint"] == "/v1/chat/completions"
    assert data["tokenizer_id"] == tokenizer_path and data["request_rate"] == 20.0
    assert data["output_lens"] == [6] * 10
    # The server counts the chat template around each prompt of exactly 40 tokens of text.
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    planned = sample_random_requests(10, 40, 6, seed=0, tokenizer=tokenizer)
    assert [r.prompt_len for r in planned] == [40] * 10
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}],
                                              add_generation_prompt=True, tokenize=False)
                for r in planned]
    assert data["input_lens"] == [len(tokenizer.encode(t, add_special_tokens=False))
                                  for t in rendered]
    assert all(n > 40 for n in data["input_lens"])


def test_e2e_wrong_key_fails_every_request_and_says_why(cpserve_server, capsys):
    from cpserve.bench.serve import main

    argv = ["--base-url", cpserve_server, "--model", "tiny", "--api-key", "wrong",
            "--num-prompts", "3", "--random-input-len", "8", "--random-output-len", "2",
            "--random-vocab-size", "1000", "--disable-tqdm"]
    data = main(_parse(argv))
    assert data["completed"] == 0 and data["failed"] == 3
    assert all(e.startswith("HTTP 401") for e in data["errors"])
    assert "the first error: HTTP 401" in capsys.readouterr().out
