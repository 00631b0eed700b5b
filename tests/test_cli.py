"""The `cpserve` command: flags, `generate`, and `bench serve` against a real server."""

from __future__ import annotations

import json

import pytest

from cpserve import LLM, SamplingParams
from cpserve.engine.args import EngineArgs
from cpserve.engine.async_engine import AsyncEngine
from cpserve.entrypoints.cli import build_parser, main
from cpserve.entrypoints.openai.api_server import ServerThread, build_app

SMALL = ["--max-model-len", "256", "--num-kv-blocks", "64"]


def test_generate_prints_the_offline_greedy_text(capsys):
    prompt = "The morning train"
    assert main(["generate", "--prompt", prompt, "--max-tokens", "8", "--temperature", "0",
                 "--ignore-eos", *SMALL]) == 0
    printed = capsys.readouterr().out
    with LLM(model="tiny", max_model_len=256, num_kv_blocks=64) as llm:
        expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8,
                                                       ignore_eos=True), use_tqdm=False)
    assert printed == expected[0].outputs[0].text + "\n"


def test_generate_several_prompts_and_completions(capsys):
    assert main(["generate", "--prompt", "a", "--prompt", "b", "-n", "2", "--max-tokens", "3",
                 "--ignore-eos", *SMALL]) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("---")]
    assert headers == [f"--- prompt {i}, completion {k} (length) ---"
                       for i in range(2) for k in range(2)]


def test_bad_sampling_or_engine_flags_exit_2_with_the_rule(capsys):
    assert main(["generate", "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["serve", "--block-size", "16", "--cp-kv-cache-interleave-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "cp_kv_cache_interleave_size=3" in err and "block_size=16" in err


def test_serve_takes_vllm_engine_flags_and_server_flags(monkeypatch):
    monkeypatch.setenv("CPSERVE_API_KEY", "from-env")
    args = build_parser().parse_args([
        "serve", "/models/llama", "-tp", "4", "-pcp", "2", "-dcp", "2",
        "--cp-kv-cache-interleave-size", "8", "--block-size", "32", "--max-model-len", "131072",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "16384", "--dtype", "bfloat16",
        "--device", "cpu", "--served-model-name", "llama", "llama-long"])
    engine_args = EngineArgs.from_cli_args(args)
    assert engine_args == EngineArgs(
        model="/models/llama", tensor_parallel_size=4, prefill_context_parallel_size=2,
        decode_context_parallel_size=2, cp_kv_cache_interleave_size=8, block_size=32,
        max_model_len=131072, max_num_seqs=8, max_num_batched_tokens=16384, dtype="bfloat16",
        device="cpu")
    assert (args.host, args.port) == ("127.0.0.1", 8000)  # loopback unless asked
    assert args.api_key == "from-env"
    assert args.served_model_name == ["llama", "llama-long"]
    assert build_parser().parse_args(["serve", "--api-key", "flag"]).api_key == "flag"
    assert build_parser().parse_args(["serve"]).model == "tiny"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["fly"])
    assert raised.value.code == 2


@pytest.fixture(scope="module")
def server():
    engine = AsyncEngine.from_engine_args(EngineArgs(model="tiny", max_model_len=256,
                                                     num_kv_blocks=64))
    app = build_app(engine, served_model_names=["tiny"])
    engine.start()
    thread = ServerThread(app).start()
    yield thread
    thread.stop()
    engine.shutdown()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_serve_against_the_server(server, tmp_path, capsys, endpoint):
    code = main(["bench", "serve", "--base-url", server.url, "--endpoint", endpoint,
                 "--num-prompts", "8", "--random-input-len", "16", "--random-output-len", "6",
                 "--ignore-eos", "--max-concurrency", "4", "--random-vocab-size", "1024",
                 "--save-result", "--result-dir", str(tmp_path), "--result-filename", "out.json", "--plot",
                 "--disable-tqdm"])
    assert code == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["total_output_tokens"] == 8 * 6
    for key in ("duration", "request_throughput", "output_throughput",
                "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms"):
        assert result[key] > 0, key
    assert list(tmp_path.glob("*.png"))
    assert "Successful requests:" in capsys.readouterr().out
