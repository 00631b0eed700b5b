"""The server and its engine process live and die together, and nothing is left behind.

`cpserve serve` runs in a subprocess: the API process, its engine process (rank 0) and, with
`-tp 2`, the engine's rank 1. When the engine dies mid-request (here a rank is killed, as a
device failure would take it), the server tells every client and exits non-zero; when the
API process is killed, the engine goes too, and a rank goes with its engine (every child is
tied to its parent by a lifeline: `cpserve.child_process`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live children of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(entry), cmdline.decode(errors="replace")))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class ServeProcess:
    """`cpserve serve tiny -tp TP` on a free port, with its engine process (and rank 1)."""

    def __init__(self, tp: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cpserve.entrypoints.cli", "serve", "tiny", "--port",
             str(self.port), "-tp", str(tp), "--max-model-len", "256", "--num-kv-blocks", "64",
             "--uvicorn-log-level", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        (self.engine_pid, _), = [c for c in children(self.proc.pid) if "core_process" in c[1]]
        self.rank_pids = [pid for pid, cmd in children(self.engine_pid) if "local_ranks" in cmd]
        assert len(self.rank_pids) == tp - 1

    def close(self) -> str:
        for pid in (self.proc.pid, self.engine_pid, *self.rank_pids):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        return self.proc.stdout.read().decode()


def wait_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if alive(p)]
        time.sleep(0.05)


def test_engine_death_fails_requests_and_exits_nonzero():
    server = ServeProcess(tp=2)
    try:
        body = {"prompt": "The morning train", "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        events = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                          timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        os.kill(server.rank_pids[0], signal.SIGKILL)
        died_at = time.monotonic()
        # A few tokens, then an error event in OpenAI's shape, then the end of the stream.
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "engine" in error["message"]
        assert "Traceback" not in events[-2]
        assert 3 <= len(events) - 2 < 200

        assert httpx.get(f"{server.url}/health").status_code == 503
        refused = httpx.post(f"{server.url}/v1/completions",
                             json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == 503

        assert server.proc.wait(timeout=10) != 0
        assert time.monotonic() - died_at < 10
        wait_gone([server.engine_pid], 5)  # no orphans
    finally:
        output = server.close()
    assert "rank 1" in output  # the cause is in the server log


def test_a_killed_server_takes_its_engine_with_it():
    server = ServeProcess(tp=1)
    try:
        os.kill(server.proc.pid, signal.SIGKILL)  # nothing of it runs: no cleanup code
        wait_gone([server.engine_pid], 10)
    finally:
        server.close()


def test_every_generation_dies_with_its_parent():
    """A process that starts a child that starts a child (the server, its engine, a rank):
    killing the first takes the others at once."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.lifeline_child", json.dumps(
        {"depth": 2, "lifeline_fd": 0})], stdout=subprocess.PIPE, stdin=subprocess.PIPE,
        text=True)
    try:
        pids = {}
        while len(pids) < 3:
            _, depth, pid = proc.stdout.readline().split()
            pids[int(depth)] = int(pid)
        assert pids[2] == proc.pid and all(alive(p) for p in pids.values())
        os.kill(proc.pid, signal.SIGKILL)
        wait_gone([pids[1], pids[0]], 5)
    finally:
        proc.kill()
        proc.wait()
