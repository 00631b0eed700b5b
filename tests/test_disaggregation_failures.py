"""What goes wrong between a prefill and a decode instance ends as kv_load_failure_policy
says (a decode instance with "fail", one with "recompute"), and leaks no block on either
side: the prefill instance unreachable, its lease expired, the prefill instance killed in
the middle of a transfer, the decode instance killed likewise, a client hanging up on the
proxy (`cpserve proxy`, a process here) before, during and after the transfer.

One rank per instance, so five processes start quickly; prefill instances send at most
0.25 MB/s, so a 1k-token prompt's KV (0.5 MB) takes two seconds to move: time to kill one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest

from tests.checkpoints import random_prompts
from tests.disagg_servers import kv_config, proxy, serve, start, stop_all, wait_until_idle

SLOW = dict(kv_lease_duration=3, max_send_mb_per_s=0.25, kv_io_timeout=10)
BODY = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def servers():
    made = {
        "prefill": serve("--kv-transfer-config", kv_config("kv_producer", **SLOW)),
        "doomed_prefill": serve("--kv-transfer-config", kv_config(
            "kv_producer", **{**SLOW, "kv_lease_duration": 120})),
        "fail": serve("--kv-transfer-config", kv_config("kv_consumer", "fail")),
        "recompute": serve("--kv-transfer-config", kv_config("kv_consumer", "recompute")),
    }
    start(*made.values())
    made["proxy"] = proxy([made["prefill"]], [made["recompute"]])
    start(made["proxy"])
    yield made
    stop_all(*made.values())


def _complete(url: str, prompt: list[int], **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={**BODY, "prompt": prompt, **extra},
                      timeout=120)


def _prefill(server, prompt: list[int]) -> dict:
    answer = _complete(server.url, prompt, max_tokens=1,
                       kv_transfer_params={"do_remote_decode": True})
    assert answer.status_code == 200, answer.text
    return answer.json()["kv_transfer_params"]


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def _error(response: httpx.Response) -> str:
    assert response.status_code == 500, response.text
    return response.json()["error"]["message"]


def _when_loading(*servers, timeout_s: float = 60.0) -> None:
    """Wait until each decode server has a load in flight."""
    deadline = time.monotonic() + timeout_s
    while not all(s.status()["loads"] for s in servers):
        assert time.monotonic() < deadline, "no transfer started"
        time.sleep(0.02)


def test_unreachable_prefill_instance(servers):
    prefill, fail, recompute = servers["prefill"], servers["fail"], servers["recompute"]
    (prompt,) = random_prompts([60], seed=21)
    reference = _text(_complete(prefill.url, prompt))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    params = {**_prefill(prefill, prompt), "remote_port": closed}
    assert "could not be reached" in _error(_complete(fail.url, prompt,
                                                      kv_transfer_params=params))
    assert _text(_complete(recompute.url, prompt, kv_transfer_params=params)) == reference
    wait_until_idle(fail, recompute)
    wait_until_idle(prefill)  # its lease, never pulled, expires


def test_expired_lease(servers):
    prefill, fail, recompute = servers["prefill"], servers["fail"], servers["recompute"]
    (prompt,) = random_prompts([60], seed=22)
    reference = _text(_complete(prefill.url, prompt))
    expired_before = prefill.status()["stats"]["leases_expired_total"]
    params = _prefill(prefill, prompt)
    time.sleep(3.5)  # kv_lease_duration 3
    assert "no longer holds the KV" in _error(_complete(fail.url, prompt,
                                                        kv_transfer_params=params))
    assert _text(_complete(recompute.url, prompt, kv_transfer_params=params)) == reference
    (status,) = wait_until_idle(prefill)
    assert status["stats"]["leases_expired_total"] == expired_before + 1
    wait_until_idle(fail, recompute)


def test_client_hang_ups_abort_on_both_sides(servers):
    prefill, recompute, front = servers["prefill"], servers["recompute"], servers["proxy"]
    long_prompt, prompt = random_prompts([1000, 40], seed=23)
    # During the prefill call: the client gives up first.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{front.url}/v1/completions", json={**BODY, "prompt": long_prompt},
                   timeout=httpx.Timeout(60, read=0.3))
    # During the transfer: the decode instance's stream starts as it pulls; hang up at once.
    with httpx.stream("POST", f"{front.url}/v1/completions", timeout=120,
                      json={**BODY, "prompt": long_prompt[:-1], "stream": True}) as response:
        assert response.status_code == 200
    # While tokens stream.
    with httpx.stream("POST", f"{front.url}/v1/completions", timeout=120,
                      json={**BODY, "prompt": prompt, "max_tokens": 200,
                            "stream": True}) as response:
        next(response.iter_lines())
    wait_until_idle(prefill, recompute)
    assert front.metric("cpserve:proxy_client_disconnects_total") >= 2
    assert httpx.get(f"{front.url}/health", timeout=10).status_code == 200
    assert _text(_complete(front.url, prompt)) == _text(_complete(prefill.url, prompt))


def test_prefill_instance_dies_mid_transfer(servers):
    doomed, fail, recompute = servers["doomed_prefill"], servers["fail"], servers["recompute"]
    first, second = random_prompts([1000, 1000], seed=24)
    references = [_text(_complete(servers["prefill"].url, p)) for p in (first, second)]
    params = [_prefill(doomed, p) for p in (first, second)]
    answers = {}

    def ask(name, server, prompt, kv_params):
        answers[name] = _complete(server.url, prompt, kv_transfer_params=kv_params)

    threads = [threading.Thread(target=ask, args=("fail", fail, first, params[0])),
               threading.Thread(target=ask, args=("recompute", recompute, second, params[1]))]
    for thread in threads:
        thread.start()
    _when_loading(fail, recompute)
    doomed.kill()
    for thread in threads:
        thread.join(120)
    assert "lost mid-transfer" in _error(answers["fail"])
    assert _text(answers["recompute"]) == references[1]
    statuses = wait_until_idle(fail, recompute)
    assert statuses[1]["stats"]["loads_recomputed_total"] >= 1


def test_decode_instance_dies_mid_transfer(servers):
    prefill, doomed = servers["prefill"], servers["recompute"]
    (prompt,) = random_prompts([1000], seed=25)
    params = _prefill(prefill, prompt)

    def ask() -> None:
        with contextlib.suppress(httpx.HTTPError):  # it dies before answering
            _complete(doomed.url, prompt, kv_transfer_params=params)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    _when_loading(doomed)
    doomed.kill()
    (status,) = wait_until_idle(prefill)  # the lease nobody releases expires; nothing leaks
    assert status["stats"]["leases_expired_total"] >= 1
    (short,) = random_prompts([20], seed=26)
    assert _complete(prefill.url, short).status_code == 200
