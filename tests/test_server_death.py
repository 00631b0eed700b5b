"""When the engine dies mid-request, the server tells everyone and the process exits non-zero.

`cpserve serve` runs in a subprocess whose `LLMEngine.step` raises after a few steps, as a
device failure would.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time

import httpx

FAULTY_SERVER = textwrap.dedent("""
    import sys
    from cpserve.engine.llm_engine import LLMEngine
    from cpserve.entrypoints.cli import main

    real_step = LLMEngine.step
    num_steps = 0

    def step_then_fail(self):
        global num_steps
        num_steps += 1
        if num_steps > 5:
            raise RuntimeError("injected fault: the device fell off the bus")
        return real_step(self)

    LLMEngine.step = step_then_fail
    sys.exit(main(["serve", "tiny", "--port", sys.argv[1], "--max-model-len", "256",
                   "--num-kv-blocks", "64", "--uvicorn-log-level", "warning"]))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engine_death_fails_requests_and_exits_nonzero():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", FAULTY_SERVER, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)

        body = {"prompt": "The morning train", "max_tokens": 100, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        died_at = time.monotonic()
        # A few tokens, then an error event in OpenAI's shape, then the end of the stream.
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "engine" in error["message"]
        assert "Traceback" not in events[-2] and "injected" not in events[-2]
        assert 1 <= len(events) - 2 < 100

        assert httpx.get(f"{url}/health").status_code == 503
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == 503

        returncode = proc.wait(timeout=10)
        assert returncode != 0
        assert time.monotonic() - died_at < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read().decode()
    assert "injected fault" in output  # the cause is in the server log
