"""Real `cpserve serve` and `cpserve proxy` processes for the disaggregation tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

STARTUP_TIMEOUT_S = 240


def metric(url: str, name: str) -> float:
    """The sum of a Prometheus series' samples (all labels) at `url`/metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kv_config(role: str, policy: str = "fail", **extra) -> str:
    config = {"kv_connector": "CpserveConnector", "kv_role": role, "kv_port": 0,
              "kv_load_failure_policy": policy}
    if extra:
        config["kv_connector_extra_config"] = extra
    return json.dumps(config)


class Process:
    """A cpserve command on a free port, its stderr kept in a file for failure messages."""

    def __init__(self, argv: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="cpserve-test-", suffix=".log")
        env = {**os.environ, "CPSERVE_DIST_TIMEOUT": os.environ.get("CPSERVE_DIST_TIMEOUT",
                                                                    "120")}
        self.proc = subprocess.Popen([sys.executable, "-m", "cpserve.entrypoints.cli", *argv,
                                      "--port", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=self.log, env=env)

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-6000:]

    def wait_healthy(self, deadline: float) -> None:
        while True:
            assert self.proc.poll() is None, f"{self.url} exited:\n{self.output()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{self.url} did not start:\n{self.output()}"
            time.sleep(0.2)

    def status(self) -> dict:
        response = httpx.get(f"{self.url}/kv_transfer/status", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def metric(self, name: str) -> float:
        return metric(self.url, name)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        stop_all(self)


def serve(*flags: str) -> Process:
    return Process(["serve", "tiny", "--max-model-len", "4096", *flags])


def proxy(prefill: list[Process], decode: list[Process], *flags: str) -> Process:
    return Process(["proxy", "--prefill", *[p.url for p in prefill],
                    "--decode", *[d.url for d in decode], *flags])


def start(*processes: Process) -> None:
    """Wait for processes started together (their start-ups overlap)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        for process in processes:
            process.wait_healthy(deadline)
    except BaseException:
        stop_all(*processes)
        raise


def stop_all(*processes: Process) -> None:
    """Interrupt them all at once (each shuts its ranks down), then wait."""
    for process in processes:
        if process.proc.poll() is None:
            process.proc.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.proc.wait(30)
        except subprocess.TimeoutExpired:
            process.proc.kill()
            process.proc.wait()
        process.log.close()


def wait_until_idle(*servers: Process, timeout_s: float = 20.0) -> list[dict]:
    """Statuses once no lease nor load is left (releases travel over sockets)."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = [s.status() for s in servers]
        if all(s["leases"] == 0 and s["loads"] == 0 for s in statuses):
            assert all(s["integrity"] == "ok" for s in statuses)
            return statuses
        assert time.monotonic() < deadline, statuses
        time.sleep(0.1)
