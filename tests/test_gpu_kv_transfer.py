"""KV transfer on a GPU (skipped without one): the TCP path with the caches on the GPU (two
engines in this process), and the device path (two servers sharing the GPU, so the decode
instance maps the prefill instance's cache through CUDA IPC). Tokens equal the prefill
instance's own in both; the bytes went the path the configuration says."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.checkpoints import random_prompts
from tests.disagg_servers import kv_config, serve, start, stop_all, wait_until_idle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_tcp_path_with_gpu_caches_gives_the_prefill_engines_tokens():
    from tests.test_kv_transfer_engine import (
        COMMON,
        Instance,
        _assert_same,
        _greedy,
        _prefill,
        _run,
        instance,
    )

    def engine(role: str) -> Instance:
        config = {"kv_connector": "CpserveConnector", "kv_role": role, "kv_port": 0,
                  "kv_connector_extra_config": {"kv_transport": "tcp"}}
        return instance(**{**COMMON, "num_kv_blocks": 512}, device="cuda",
                        kv_transfer_config=config)

    prefill, decode = engine("kv_producer"), engine("kv_consumer")
    try:
        prompts = random_prompts([3, 100, 1500], seed=31)
        for i, prompt in enumerate(prompts):
            prefill.add_request(f"ref{i}", {"prompt_token_ids": prompt}, _greedy())
        refs = _run([prefill])
        for i, prompt in enumerate(prompts):
            decode.add_request(f"d{i}", {"prompt_token_ids": prompt},
                               _greedy(kv_transfer_params=_prefill(prefill, f"p{i}", prompt)))
        outs = _run([decode, prefill])
        for i in range(len(prompts)):
            _assert_same(outs[f"d{i}"], refs[f"ref{i}"])
        stats = decode.kv_transfer.stats
        assert stats.bytes_received_total > 0 and stats.bytes_received_ipc_total == 0
        decode.check_integrity()
        prefill.check_integrity()
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_device_path_between_two_instances_on_one_gpu():
    gpu = ["--gpu-memory-utilization", "0.2", "--enforce-eager"]
    prefill = serve(*gpu, "--kv-transfer-config", kv_config("kv_producer"))
    decode = serve(*gpu, "--kv-transfer-config", kv_config("kv_consumer"))
    start(prefill, decode)
    try:
        for prompt in random_prompts([5, 300, 2000], seed=32):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True}
            ref = httpx.post(f"{prefill.url}/v1/completions", json=body, timeout=120).json()
            params = httpx.post(f"{prefill.url}/v1/completions", timeout=120, json={
                **body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
                ).json()["kv_transfer_params"]
            got = httpx.post(f"{decode.url}/v1/completions", timeout=120,
                             json={**body, "kv_transfer_params": params})
            assert got.status_code == 200, got.text
            assert got.json()["choices"][0]["text"] == ref["choices"][0]["text"]
        _, status = wait_until_idle(prefill, decode)
        stats = status["stats"]
        assert stats["bytes_received_ipc_total"] == stats["bytes_received_total"] > 0, stats
    finally:
        stop_all(prefill, decode)
