"""vLLM's flags, one by one: what each maps to in cpserve's config, or the start-up error that
names it (run in-process up to the point where the engine would be built)."""

from __future__ import annotations

import json
import logging

import pytest

from cpserve.config import ConfigError
from cpserve.engine.compilation import DEFAULT_CAPTURE_SIZES, decode_graph_buckets
from cpserve.engine.generation_defaults import read_sampling_defaults
from cpserve.entrypoints.cli import build_parser, vllm_spelling
from cpserve.entrypoints.openai.chat_template import load_chat_template
from cpserve.models.demo import ensure_tiny_model
from tests.serve_startup import startup

MIXED = '{"cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [4, 1, 2]}'


@pytest.fixture
def serve(monkeypatch, capsys):
    def run(*argv: str):
        return startup(["tiny", *argv], monkeypatch, capsys)
    return run


@pytest.mark.parametrize(("argv", "eager", "sizes"), [
    ([], False, None),
    (["--compilation-config", MIXED], False, (1, 2, 4)),
    (["--compilation_config", MIXED], False, (1, 2, 4)),  # vLLM's spelling in the tutorial
    (["-cc", '{"cudagraph_mode": "NONE"}'], True, None),
    (["-cc", '{"cudagraph_mode": "full_decode_only", "mode": 0}'], False, None),
    (["-O0"], True, None),
    (["-O", "3"], False, None),
    (["-O0", "-cc", '{"cudagraph_mode": "FULL_DECODE_ONLY"}'], False, None),  # explicit wins
    (["--enforce-eager", "-cc", MIXED], True, (1, 2, 4)),  # --enforce-eager wins over both
    (["--cudagraph-capture-sizes", "8", "2"], False, (2, 8)),
    (["-cc", '{"max_cudagraph_capture_size": 8}'], False, (1, 2, 4, 8)),
])
def test_graph_flags_map_onto_decode_cuda_graphs(serve, argv, eager, sizes):
    result = serve(*argv)
    assert result.role == "server", result.stderr
    assert result.config.enforce_eager is eager
    assert result.config.cudagraph_capture_sizes == sizes


def test_capture_sizes_are_the_decode_graph_buckets():
    assert decode_graph_buckets((1, 2, 4), max_num_seqs=256) == [1, 2, 4]
    assert decode_graph_buckets(None, max_num_seqs=20) == [1, 2, 4, 8, 16, 20]
    assert decode_graph_buckets(None, max_num_seqs=10_000) == list(DEFAULT_CAPTURE_SIZES)


@pytest.mark.parametrize(("argv", "message"), [
    (["--speculative-config", '{"num_speculative_tokens": 3, "method": "deepseek_mtp"}'],
     "--speculative-config is not supported yet"),
    (["--kv-transfer-config", '{"kv_connector": "MooncakeConnectorV1"}'],
     "--kv-transfer-config is not supported yet"),
    (["--kv-transfer-config", "{...}"], "argument --kv-transfer-config: not valid JSON"),
    (["-cc", "[1, 2]"], "argument --compilation-config/-cc: must be a JSON object"),
    (["-cc", '{"cudagraph_mode": "PIECEWISE"}'], "cudagraph_mode=PIECEWISE: cpserve captures "
                                                  "CUDA graphs of decode steps only"),
    (["-cc", '{"cudagraph_mode": "FULL_AND_PIECEWISE"}'], "cudagraph_mode=FULL_AND_PIECEWISE"),
    (["-cc", '{"cudagraph_mode": "FULL"}'], "supported: FULL_DECODE_ONLY (the default), NONE"),
    (["-cc", '{"cudagraph_mode": "SOMETIMES"}'], "is not one of vLLM's modes"),
    (["-cc", '{"level": 3}'], "level=3: cpserve does not torch.compile"),
    (["-cc", '{"splitting_ops": []}'], "--compilation-config key 'splitting_ops'"),
    (["-cc", '{"cudagraph_capture_sizes": [0]}'], "cudagraph_capture_sizes=[0]"),
    (["-O", "4"], "argument -O/--optimization-level: invalid choice"),
    (["--data-parallel-size", "2"], "--data-parallel-size 2: cpserve runs one engine replica"),
    (["--data-parallel-size-local", "2"], "--data-parallel-size-local 2"),
    (["--distributed-executor-backend", "ray"], "--distributed-executor-backend ray: cpserve "
                                                "has no Ray executor"),
    (["--distributed-executor-backend", "uni", "-tp", "2"], "uni runs one process"),
    (["--api-server-count", "2"], "--api-server-count 2"),
    (["--headless"], "--headless is for the nodes other than node 0"),
    (["--nnodes", "2", "--node-rank", "1", "-tp", "2"], "start this node with --headless"),
    (["--nnodes", "3", "-tp", "2"], "cannot be split evenly over --nnodes 3"),
    (["--nnodes", "2", "--node-rank", "2", "-tp", "2", "--headless"], "--node-rank 2"),
    (["--nnodes", "2", "-tp", "2", "--distributed-executor-backend", "external_launcher"],
     "--nnodes 2 starts ranks on several nodes itself"),
    (["--max-logprobs", "-2"], "--max-logprobs -2"),
    (["--tokenizer", "/no/such/dir"], "--tokenizer '/no/such/dir' is not a directory"),
    (["--generation-config", "/no/such/dir"], "--generation-config '/no/such/dir' has no "
                                              "generation_config.json"),
    (["--override-generation-config", '{"temperature": -1}'], "temperature must be >= 0"),
    (["--override-generation-config", '{"do_sample": true}'], "field 'do_sample'"),
    (["--chat-template", "no_such_template.jinja"], "--chat-template 'no_such_template.jinja' "
                                                    "looks like a file path"),
    (["--chat-template", "{% if %}"], "--chat-template is not a valid Jinja template"),
])
def test_what_cpserve_cannot_honour_stops_start_up_naming_the_flag(serve, argv, message):
    result = serve(*argv)
    assert result.code == 2, f"started as {result.role}"
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_process_layout_flags_that_cpserve_honours(serve):
    result = serve("-tp", "2", "--distributed-executor-backend", "mp", "--api-server-count", "1",
                   "--data-parallel-size", "1", "--data-parallel-size-local", "1",
                   "--data-parallel-start-rank", "0", "--data-parallel-address", "10.0.0.3",
                   "--data-parallel-rpc-port", "5980", "--nnodes", "2", "--master-addr",
                   "10.0.0.1", "--master-port", "7001", "--seed", "1024")
    assert result.role == "server", result.stderr
    launch = result.config.launch
    assert (launch.nnodes, launch.node_rank, launch.master_addr, launch.master_port) == (
        2, 0, "10.0.0.1", 7001)
    assert launch.executor_backend == "mp" and result.config.seed == 1024
    assert list(launch.local_ranks(result.config.parallel.world_size)) == [0]

    headless = serve("-tp", "4", "--nnodes", "2", "--node-rank", "1", "--headless",
                     "--master-addr", "10.0.0.1", "--master-port", "7001")
    assert headless.role == "headless", headless.stderr
    assert list(headless.launch.local_ranks(4)) == [2, 3]
    assert "node 1 of 2, headless: ranks 2-3 of 4, joining node 0 at 10.0.0.1:7001" in \
        headless.stderr


def test_trust_remote_code_is_accepted_with_a_notice(serve, caplog):
    with caplog.at_level(logging.WARNING):
        result = serve("--trust-remote-code")
    assert result.role == "server"
    notices = [r.getMessage() for r in caplog.records if "trust-remote-code" in r.getMessage()]
    assert notices == ["--trust-remote-code changes nothing: cpserve runs no code from "
                       "checkpoints (its model classes are built in)"]


def test_vllm_spellings_are_accepted():
    assert vllm_spelling(["--compilation_config", "{}", "--max_num_seqs=4", "-tp", "a_b"]) == [
        "--compilation-config", "{}", "--max-num-seqs=4", "-tp", "a_b"]
    args = build_parser().parse_args(vllm_spelling(["serve", "--enable_log_requests",
                                                    "--max_logprobs", "5"]))
    assert args.enable_log_requests and args.max_logprobs == 5
    assert not build_parser().parse_args(["serve", "--disable-log-requests"]).enable_log_requests


def test_help_is_grouped_as_vllms(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    sections = [line[:-1] for line in text.splitlines() if line and line[0] != " "
                and line.endswith(":")]
    assert sections == ["positional arguments", "options", "Frontend", "ModelConfig",
                        "LoadConfig", "ParallelConfig", "CacheConfig", "SchedulerConfig",
                        "CompilationConfig", "VllmConfig"]

    def section(title: str) -> str:
        return text.split(f"\n{title}:\n")[1].split("\n\n")[0]

    assert "--nnodes" in section("ParallelConfig") and "-tp" in section("ParallelConfig")
    assert "--max-num-batched-tokens" in section("SchedulerConfig")
    assert "--chat-template" in section("Frontend") and "--headless" in section("options")
    assert "--compilation-config JSON, -cc JSON" in section("VllmConfig")


# ---- generation config and chat template, as files ------------------------------------------


def _model_dir(tmp_path, generation_config: dict | None):
    """The tiny checkpoint with another generation_config.json (or none)."""
    model = tmp_path / "model"
    model.mkdir(parents=True)
    for f in ensure_tiny_model().iterdir():
        if f.name != "generation_config.json":
            (model / f.name).symlink_to(f)
    if generation_config is not None:
        (model / "generation_config.json").write_text(json.dumps(generation_config))
    return model


def test_generation_config_sources(tmp_path):
    model = _model_dir(tmp_path, {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": None,
                                  "repetition_penalty": 1.05, "max_new_tokens": 64,
                                  "do_sample": True, "eos_token_id": [1, 5]})
    expected = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05,
                "max_tokens": 64}
    assert read_sampling_defaults("auto", model) == expected
    assert read_sampling_defaults("vllm", model) == {}
    assert read_sampling_defaults("vllm", model, {"temperature": 0.5}) == {"temperature": 0.5}
    assert read_sampling_defaults("auto", model, {"temperature": 0.5}) == {
        **expected, "temperature": 0.5}
    other = _model_dir(tmp_path / "other", {"top_k": 5}).parent
    assert read_sampling_defaults(str(other / "model"), model) == {"top_k": 5}
    assert read_sampling_defaults("auto", _model_dir(tmp_path / "none", None)) == {}
    with pytest.raises(ConfigError, match="top_p"):
        read_sampling_defaults("auto", _model_dir(tmp_path / "bad", {"top_p": 0}))


def test_chat_template_from_a_file_or_inline(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(template)
    assert load_chat_template(str(path)) == template
    assert load_chat_template(template) == template
    assert load_chat_template("{{ bos_token }}\\n{% for m in messages %}x{% endfor %}") == \
        "{{ bos_token }}\n{% for m in messages %}x{% endfor %}"
    assert load_chat_template(None) is None
