"""The reference deployments' vLLM command lines (../shared/reference/) run under `cpserve serve`.

Each command line is the document's, with the model replaced by `tiny` and the sizes scaled
to two CPU cores: same flags, smaller numbers (tp 16 -> 2, dcp 8 -> 2, block size and
interleave 128 -> 16, 136000-token contexts -> 1024), and the host kept on loopback. A
command either starts and serves one completion (the same greedy text as one process), or
stops at start-up with a message naming a flag it cannot honour:

- flags that other issues implement (OTHER_ISSUES) may do either, so this test stays true as
  they land; until then argparse refuses them, which counts only if it names nothing else;
- --speculative-config and --kv-transfer-config are refused as "not supported yet", so the
  full tutorial commands stop; without the refused flags, they must start and serve.

Two "nodes" on one machine (the tutorial's two prefill nodes, `--nnodes 2`, two ranks each)
give the same greedy text as one process, and the headless node exits when node 0 stops.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

from cpserve import LLM, SamplingParams
from tests.serve_startup import startup

PROMPT = "The morning train left the station"
MAX_TOKENS = 8
STARTUP_TIMEOUT_S = 120

# Flags whose features other issues build (quantization, fp8 KV, MoE, chunked-prefill knobs).
OTHER_ISSUES = {"--quantization", "--kv-cache-dtype", "--enable-expert-parallel",
                "--enable-chunked-prefill", "--no-enable-chunked-prefill",
                "--long-prefill-token-threshold"}
# Flags parsed and refused by this release, with the message's start.
REFUSED = {"--speculative-config": "--speculative-config is not supported yet",
           "--kv-transfer-config": "--kv-transfer-config"}
_NO_VALUE = {"--enable-expert-parallel", "--enable-chunked-prefill",
             "--no-enable-chunked-prefill", "--headless", "--enforce-eager",
             "--no-enable-prefix-caching", "--trust-remote-code"}

SPECULATIVE = '{"num_speculative_tokens": 3, "method":"deepseek_mtp"}'


def _kv_transfer(role: str, port: str, engine_id: str) -> str:
    return json.dumps({
        "kv_connector": "MooncakeConnectorV1", "kv_role": role, "kv_port": port,
        "engine_id": engine_id,
        "kv_connector_module_path": "vllm_ascend.distributed.mooncake_connector",
        "kv_connector_extra_config": {"use_ascend_direct": True,
                                      "prefill": {"dp_size": 1, "tp_size": 16},
                                      "decode": {"dp_size": 1, "tp_size": 16}}})


# 000, the context parallel guide: its online example, and the one for KV transfer (whose
# `{...}` is the guide's own placeholder, not JSON).
GUIDE_ONLINE = ["--tensor-parallel-size", "2", "--decode-context-parallel-size", "2",
                "--prefill-context-parallel-size", "2"]
GUIDE_KV_TRANSFER = [*GUIDE_ONLINE, "--cp-kv-cache-interleave-size", "16",
                     "--kv-transfer-config", "{...}"]


def tutorial_prefill_node(node_rank: int, master_port: int, port: int) -> list[str]:
    """002, the 128k tutorial: a prefill node (node 0 serves, node 1 is headless)."""
    return [
        "--host", "127.0.0.1", "--port", str(port),
        "--decode-context-parallel-size", "2", "--prefill-context-parallel-size", "2",
        "--cp-kv-cache-interleave-size", "16", "--tensor-parallel-size", "2",
        "--enable-expert-parallel", "--quantization", "ascend", "--enforce-eager",
        "--served-model-name", "deepseek_v3", "--seed", "1024", "--no-enable-chunked-prefill",
        "--no-enable-prefix-caching", "--max-num-seqs", "1", "--max-model-len", "1024",
        "--max-num-batched-tokens", "1024", "--block-size", "16", "--trust-remote-code",
        "--gpu-memory-utilization", "0.8", "--nnodes", "2", "--node-rank", str(node_rank),
        *(["--headless"] if node_rank else []),
        "--master-addr", "127.0.0.1", "--master-port", str(master_port),
        "--speculative-config", SPECULATIVE,
        "--kv-transfer-config", _kv_transfer("kv_producer", "30000", str(node_rank)),
    ]


def tutorial_decode_node(port: int) -> list[str]:
    """002, the 128k tutorial: the decode node (note vLLM's --compilation_config spelling)."""
    return [
        "--host", "127.0.0.1", "--port", str(port), "--api-server-count", "1",
        "--data-parallel-size", "1", "--data-parallel-size-local", "1",
        "--data-parallel-start-rank", "0", "--data-parallel-address", "127.0.0.1",
        "--data-parallel-rpc-port", "5980", "--decode-context-parallel-size", "1",
        "--tensor-parallel-size", "2", "--enable-expert-parallel", "--quantization", "ascend",
        "--no-enable-prefix-caching", "--distributed-executor-backend", "mp",
        "--served-model-name", "deepseek_v3", "--seed", "1024", "--max-model-len", "1024",
        "--max-num-batched-tokens", "16", "--enable-chunked-prefill", "--max-num-seqs", "4",
        "--trust-remote-code", "--gpu-memory-utilization", "0.96",
        "--speculative-config", SPECULATIVE,
        "--compilation_config",
        '{"cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes":[1,2,4]}',
        "--kv-transfer-config", _kv_transfer("kv_consumer", "30200", "3"),
    ]


def without(argv: list[str], flags: set[str]) -> list[str]:
    """`argv` minus `flags` and their values."""
    out, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        if arg.split("=")[0] in flags:
            skip_value = arg not in _NO_VALUE and "=" not in arg
            continue
        out.append(arg)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    served: str | None  # the completion's text, if the command started
    stderr: str  # what it printed when it stopped at start-up


def _cpserve(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "CPSERVE_DIST_TIMEOUT": os.environ.get("CPSERVE_DIST_TIMEOUT", "120")}
    return subprocess.Popen([sys.executable, "-m", "cpserve.entrypoints.cli", "serve", "tiny",
                             *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)


def _port_of(argv: list[str]) -> int:
    return int(argv[argv.index("--port") + 1])


def _model_of(argv: list[str]) -> str:
    return argv[argv.index("--served-model-name") + 1] if "--served-model-name" in argv else "tiny"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_one(proc: subprocess.Popen, argv: list[str], others=()) -> Outcome:
    """Wait until the server answers /health, then ask it for one greedy completion."""
    url = f"http://127.0.0.1:{_port_of(argv)}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            return Outcome(None, proc.stderr.read())
        for other in others:
            assert other.poll() is None, other.stderr.read()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server neither started nor stopped"
        time.sleep(0.2)
    response = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": _model_of(argv), "prompt": PROMPT, "max_tokens": MAX_TOKENS,
        "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return Outcome(response.json()["choices"][0]["text"], "")


def launch(argv: list[str]) -> Outcome:
    proc = _cpserve(argv)
    try:
        return _serve_one(proc, argv)
    finally:
        _stop(proc)


def assert_refusal_names_a_flag(stderr: str, argv: list[str], allowed: set[str]) -> None:
    """Stopped at start-up with a message that names a flag of `allowed` given in `argv`.

    argparse's own refusal lists every unknown flag: each must be one that another issue adds.
    """
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    assert "Traceback" not in stderr, stderr
    if "unrecognized arguments:" in stderr:
        listed = stderr.split("unrecognized arguments:")[1].split()
        unknown = {a.split("=")[0] for a in listed if a.startswith("--")}
        assert unknown and unknown <= OTHER_ISSUES, stderr
        return
    named = [flag for flag in allowed & given if flag in stderr]
    assert named, f"the refusal names none of {sorted(allowed & given)}:\n{stderr}"


@pytest.fixture(scope="module")
def one_process_text() -> str:
    with LLM("tiny", max_model_len=1024) as llm:
        out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                  ignore_eos=True), use_tqdm=False)
    return out[0].outputs[0].text


def _full_commands() -> dict[str, list[str]]:
    port, master = free_port(), free_port()
    return {
        "guide-kv-transfer": GUIDE_KV_TRANSFER,
        "tutorial-prefill-node-0": tutorial_prefill_node(0, master, port),
        "tutorial-prefill-node-1": tutorial_prefill_node(1, master, port),
        "tutorial-decode-node": tutorial_decode_node(port),
    }


@pytest.mark.parametrize("name", list(_full_commands()))
def test_full_command_stops_naming_a_flag_it_cannot_honour(name, monkeypatch, capsys):
    argv = _full_commands()[name]
    result = startup(["tiny", *argv], monkeypatch, capsys)
    # Each of these carries --speculative-config or --kv-transfer-config: none may start.
    assert result.code == 2, f"started as {result.role}"
    assert_refusal_names_a_flag(result.stderr, argv, OTHER_ISSUES | set(REFUSED))


@pytest.mark.parametrize("name", ["guide-online", "guide-kv-transfer", "tutorial-decode-node"])
def test_command_without_refused_flags_serves_the_one_process_text(name, one_process_text):
    argv = {"guide-online": GUIDE_ONLINE,
            "guide-kv-transfer": without(GUIDE_KV_TRANSFER, set(REFUSED)),
            "tutorial-decode-node": without(tutorial_decode_node(0), OTHER_ISSUES | set(REFUSED)),
            }[name]
    if "--port" not in argv:
        argv = [*argv, "--port", str(free_port())]
    else:
        argv[argv.index("--port") + 1] = str(free_port())
    outcome = launch(argv)
    assert outcome.served == one_process_text, outcome.stderr


def test_two_prefill_nodes_serve_the_one_process_text_and_node_1_exits_with_node_0(
        one_process_text):
    port, master = free_port(), free_port()
    drop = OTHER_ISSUES | set(REFUSED)
    node1_argv = without(tutorial_prefill_node(1, master, port), drop)
    node0_argv = without(tutorial_prefill_node(0, master, port), drop)
    node1 = _cpserve(node1_argv)  # first, as a scheduler may start nodes in any order
    node0 = _cpserve(node0_argv)
    try:
        outcome = _serve_one(node0, node0_argv, others=[node1])
        assert outcome.served == one_process_text, outcome.stderr
        _stop(node0)
        assert node1.wait(30) == 0, node1.stderr.read()
    finally:
        _stop(node0)
        _stop(node1)
