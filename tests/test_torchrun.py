"""Ranks started by torchrun (as on several nodes) give the same text as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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


def test_torchrun_two_ranks_match_one_process():
    single = _run([sys.executable, "-m", "cpserve.entrypoints.cli", *GENERATE])
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    both = _run([torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                 "--master-port", str(_free_port()), "-m", "cpserve.entrypoints.cli",
                 *GENERATE, "-tp", "2"])
    assert single.strip() and both.strip() == single.strip()
