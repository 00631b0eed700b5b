"""Ranks started by torchrun (as on several nodes) give the same text as one process, offline
and through the server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

GENERATE = ["generate", "tiny", "--prompt", "Hello, world", "--max-tokens", "8",
            "--temperature", "0", "--device", "cpu", "--num-kv-blocks", "64",
            "--max-model-len", "1024"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TORCH_SHOW_CPP_STACKTRACES": "1"})
    # On failure show what the ranks printed, not torchrun's own report of it.
    ranks_said = [line for line in done.stderr.splitlines() if "torch/distributed/" not in line]
    assert done.returncode == 0, "\n".join(ranks_said)[-6000:]
    return done.stdout


@pytest.fixture(scope="module")
def single() -> str:
    """What one process prints."""
    return _run([sys.executable, "-m", "cpserve.entrypoints.cli", *GENERATE])


def test_torchrun_two_ranks_match_one_process(single):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    both = _run([torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                 "--master-port", str(_free_port()), "-m", "cpserve.entrypoints.cli",
                 *GENERATE, "-tp", "2"])
    assert single.strip() and both.strip() == single.strip()


def test_torchrun_serves_the_one_process_text(single):
    """Under torchrun the server's engine process is rank 0 (it inherits torchrun's
    environment) and rank 1 follows its plans; the API answers as one process does."""
    port = _free_port()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.Popen(
        [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
         str(_free_port()), "-m", "cpserve.entrypoints.cli", "serve", "tiny", "-tp", "2",
         "--device", "cpu", "--num-kv-blocks", "64", "--max-model-len", "1024", "--port",
         str(port), "--uvicorn-log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-6000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "prompt": "Hello, world", "max_tokens": 8, "temperature": 0}).json()
        assert out["choices"][0]["text"] + "\n" == single
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole launch stops
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError("the launch did not stop on Ctrl-C") from None
