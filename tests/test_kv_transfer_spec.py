"""Speculative decoding on instances that exchange KV (issues 13 and 14 together), two engines
in this process over real sockets:

- n-gram drafts on a decode instance: its tokens equal the prefill engine's own, speculation
  on or off, and drafts are verified from the first decode step on;
- DeepSeek MTP on both instances: the MTP module's KV cache travels with the model's (the
  decode instance's module cache over the pulled positions equals the prefill instance's),
  and the tokens equal speculation off;
- MTP on one instance only: the caches differ by a layer, so the handshake refuses the
  transfer and the request fails naming --speculative-config.
"""

from __future__ import annotations

import time

import pytest
import torch

from cpserve import SamplingParams
from tests.checkpoints import add_mtp_modules, make_deepseek_checkpoint, random_prompts
from tests.test_kv_transfer_engine import Instance, _assert_clean, _prefill, _run, _settle, instance

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
MTP = {"method": "deepseek_mtp", "num_speculative_tokens": 2}
COMMON = dict(max_model_len=512, block_size=16, num_kv_blocks=256, seed=0)
BLOCK = 16


def _engine(model: str, role: str, speculative: dict | None = None) -> Instance:
    config = {"kv_connector": "CpserveConnector", "kv_role": role, "kv_port": 0,
              "kv_connector_extra_config": {"kv_lease_duration": 60.0, "kv_io_timeout": 10.0}}
    return instance(model=model, **COMMON, kv_transfer_config=config,
                    speculative_config=speculative)


def _greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _transfer(prefill: Instance, decode: Instance, prompts, max_tokens: int = 16) -> dict:
    """Prefill each prompt on `prefill`, decode it on `decode`: the final outputs."""
    for i, prompt in enumerate(prompts):
        params = _prefill(prefill, f"p{i}", prompt)
        decode.add_request(f"d{i}", {"prompt_token_ids": prompt},
                           _greedy(max_tokens, kv_transfer_params=params))
    outs = _run([decode, prefill])
    _settle(prefill)
    return outs


def _reference(engine: Instance, prompts, max_tokens: int = 16) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"ref{i}", {"prompt_token_ids": prompt}, _greedy(max_tokens))
    refs = _run([engine])
    return [refs[f"ref{i}"].outputs[0].token_ids for i in range(len(prompts))]


def test_ngram_drafts_on_a_decode_instance_change_no_token():
    prefill, decode = _engine("tiny", "kv_producer"), _engine("tiny", "kv_consumer", NGRAM)
    try:
        # Prompts that repeat themselves: n-gram matches from the first decode step.
        prompts = [p + p[:12] for p in random_prompts([40, 70], seed=8)]
        reference = _reference(prefill, prompts)
        outs = _transfer(prefill, decode, prompts)
        assert [outs[f"d{i}"].outputs[0].token_ids for i in range(2)] == reference
        assert decode.kv_transfer.stats.loads_done_total == 2
        spec = decode.stats().spec_decode
        assert spec.num_draft_tokens > 0 and spec.num_accepted_tokens > 0
        _assert_clean(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    return str(add_mtp_modules(make_deepseek_checkpoint(tmp_path_factory.mktemp("v3-mtp"),
                                                        "deepseek-v3")))


def test_mtp_caches_travel_with_the_kv_and_change_no_token(mtp_checkpoint):
    prefill = _engine(mtp_checkpoint, "kv_producer", MTP)
    decode = _engine(mtp_checkpoint, "kv_consumer", MTP)
    try:
        prompts = random_prompts([50, 33], seed=9)
        reference = _reference(prefill, prompts, max_tokens=8)
        for i, prompt in enumerate(prompts):
            params = _prefill(prefill, f"p{i}", prompt)
            decode.add_request(f"d{i}", {"prompt_token_ids": prompt},
                               _greedy(8, kv_transfer_params=params))
            # Before the decode instance computes anything: its module cache over the pulled
            # blocks (whole blocks below the last prompt token) is the prefill instance's.
            deadline = time.monotonic() + 60
            while f"d{i}" not in {r.request_id for r in decode.scheduler.running}:
                assert time.monotonic() < deadline, "the load did not finish"
                decode.step()  # the prefill side serves pulls from its server's threads
                time.sleep(0.001)
            full = (len(prompt) - 1) // BLOCK
            mine = decode.kv.block_table(f"d{i}")[:full]
            theirs = params["remote_block_ids"][:full]
            for cache, source in zip(decode.executor.runner.kv_caches[-1],
                                     prefill.executor.runner.kv_caches[-1]):
                if cache is not None:
                    assert source[theirs].abs().sum() > 0  # the prefill's module wrote it
                    assert torch.equal(cache[mine], source[theirs])
        outs = _run([decode, prefill])
        _settle(prefill)
        assert [outs[f"d{i}"].outputs[0].token_ids for i in range(2)] == reference
        assert decode.stats().spec_decode.num_draft_tokens > 0
        _assert_clean(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_mtp_on_one_instance_only_is_refused_naming_the_flag(mtp_checkpoint):
    prefill = _engine(mtp_checkpoint, "kv_producer")
    decode = _engine(mtp_checkpoint, "kv_consumer", MTP)
    try:
        (prompt,) = random_prompts([40], seed=10)
        outs = _transfer(prefill, decode, [prompt])
        failed = outs["d0"].outputs[0]
        assert failed.finish_reason == "error"
        assert "cannot exchange KV" in failed.error and "--speculative-config" in failed.error
        assert "'mtp_layers': 0" in failed.error and "'mtp_layers': 1" in failed.error
        _assert_clean(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()
