"""KV transfer between two engines in this process (one rank each), over real sockets: the
decode engine's tokens equal the prefill engine's own, and every failure (lease expired,
instance unreachable, prompt mismatch, abort while loading) ends as kv_load_failure_policy
says, with no block leaked on either side (`check_integrity()` after each case).

Multi-rank layouts and the HTTP servers are tested in test_disaggregation*.py.
"""

from __future__ import annotations

import socket
import time

import pytest

from cpserve import SamplingParams
from cpserve.config import ConfigError
from cpserve.engine.args import EngineArgs
from cpserve.engine.input_processor import InputProcessor, load_tokenizer
from cpserve.engine.llm_engine import LLMEngine
from cpserve.engine.output_processor import OutputProcessor, RequestOutputKind
from cpserve.kv_transfer.config import KVTransferConfig
from tests.checkpoints import random_prompts

MAX_TOKENS = 6
LOGPROB_TOL = 1e-4  # fp32: a one-token step over pulled KV against one prefill
COMMON = dict(model="tiny", max_model_len=2048, block_size=16, num_kv_blocks=512, seed=0)


class Instance:
    """An engine core behind the offline API's front end, stepped by the test: prompts in,
    the outputs of finished requests out (FINAL), the rest of it the engine's own."""

    def __init__(self, engine: Instance) -> None:
        self.engine = engine
        tokenizer = load_tokenizer(engine.config)
        self.inputs = InputProcessor(engine.config, tokenizer)
        self.outputs = OutputProcessor(tokenizer)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def add_request(self, request_id: str, prompt, params: SamplingParams) -> None:
        text, token_ids = self.inputs.tokenize(prompt)
        arrival = time.time()
        sequences = self.inputs.sequences(request_id, token_ids, params, arrival)
        self.outputs.add(request_id, text, token_ids, params, RequestOutputKind.FINAL, arrival)
        try:
            self.engine.add_requests(sequences)
        except BaseException:
            self.outputs.abort(request_id)
            raise

    def abort_request(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort_request(self.outputs.abort(request_id))

    def step(self) -> list:
        processed = self.outputs.process(self.engine.step())
        self.engine.abort_request(processed.stopped)  # ended by a stop string
        return processed.outputs


def instance(**engine_args) -> Instance:
    return Instance(LLMEngine.from_engine_args(EngineArgs(**engine_args)))


def _engine(role: str, lease_s: float = 60.0, kv_cache_dtype: str = "auto",
            **extra) -> Instance:
    config = {"kv_connector": "CpserveConnector", "kv_role": role, "kv_port": 0,
              "kv_connector_extra_config": {"kv_lease_duration": lease_s,
                                            "max_send_mb_per_s": 2.0, "kv_io_timeout": 10.0}}
    config.update(extra)
    return instance(**COMMON, kv_cache_dtype=kv_cache_dtype, kv_transfer_config=config)


@pytest.fixture(scope="module")
def engines():
    made = {"prefill": _engine("kv_producer"),
            "short_lease": _engine("kv_producer", lease_s=1.0),
            "decode": _engine("kv_consumer"),
            "decode_recompute": _engine("kv_consumer", kv_load_failure_policy="recompute")}
    yield made
    for engine in made.values():
        engine.shutdown()


def _run(engines: list[Instance], timeout_s: float = 60.0) -> dict:
    """Step every engine until none has work left; the final outputs by request id."""
    finals, deadline = {}, time.monotonic() + timeout_s
    while any(e.has_unfinished_requests() for e in engines):
        assert time.monotonic() < deadline, "the engines did not finish"
        for engine in engines:
            if engine.has_unfinished_requests():
                finals.update({o.request_id: o for o in engine.step() if o.finished})
        time.sleep(0.001)
    return finals


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0,
                          **kw)


def _prefill(engine: Instance, rid: str, prompt: list[int]) -> dict:
    engine.add_request(rid, {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=1,
                                      kv_transfer_params={"do_remote_decode": True}))
    out = _run([engine])[rid]
    assert out.kv_transfer_params["do_remote_prefill"] is True
    return out.kv_transfer_params


def _tokens(out) -> tuple[list[int], list[float]]:
    c = out.outputs[0]
    return c.token_ids, [c.logprobs[i][t].logprob for i, t in enumerate(c.token_ids)]


def _assert_same(out, ref) -> None:
    tokens, logprobs = _tokens(out)
    ref_tokens, ref_logprobs = _tokens(ref)
    assert tokens == ref_tokens
    assert logprobs == pytest.approx(ref_logprobs, abs=LOGPROB_TOL)


def _assert_clean(*engines: Instance) -> None:
    for engine in engines:
        status = engine.kv_transfer_status()  # runs check_integrity()
        assert (status["leases"], status["loads"]) == (0, 0), status
        assert engine.kv.pool.num_free == engine.kv.pool.num_blocks  # nothing held


def _settle(prefill: Instance, timeout_s: float = 5.0) -> None:
    """Let the prefill engine take the decode side's release (it comes over a socket)."""
    deadline = time.monotonic() + timeout_s
    while prefill.kv_transfer.leases and time.monotonic() < deadline:
        prefill.step()
        time.sleep(0.01)


def test_decoded_tokens_equal_the_prefill_engines_own(engines):
    prefill, decode = engines["prefill"], engines["decode"]
    # 1 token: nothing to pull (the decode side computes the last prompt token itself).
    prompts = random_prompts([1, 5, 17, 33, 300], seed=3)
    for i, prompt in enumerate(prompts):
        prefill.add_request(f"ref{i}", {"prompt_token_ids": prompt}, _greedy())
    refs = _run([prefill])
    for i, prompt in enumerate(prompts):
        params = _prefill(prefill, f"p{i}", prompt)
        assert prefill.kv.leased[f"p{i}"] == params["remote_block_ids"]
        decode.add_request(f"d{i}", {"prompt_token_ids": prompt},
                           _greedy(kv_transfer_params=params))
    outs = _run([decode, prefill])
    for i in range(len(prompts)):
        _assert_same(outs[f"d{i}"], refs[f"ref{i}"])
    _settle(prefill)
    stats = decode.kv_transfer.stats
    assert stats.loads_done_total >= len(prompts)
    assert prefill.kv_transfer.stats.leases_released_total >= len(prompts)
    # The bytes: every pulled block of every layer, K and V (prompt[:-1] in whole blocks).
    spec = decode.executor.runner.kv_spec
    blocks = sum(-(-(len(p) - 1) // 16) for p in prompts)
    assert stats.bytes_received_total >= blocks * 16 * spec.bytes_per_token * 4
    _assert_clean(prefill, decode)


def test_a_prefix_cached_on_the_decode_side_is_not_pulled_again(engines):
    prefill, decode = engines["prefill"], engines["decode"]
    shared, rest = random_prompts([64, 40], seed=4)
    decode.add_request("local", {"prompt_token_ids": shared + [7]}, _greedy())
    prefill.add_request("ref", {"prompt_token_ids": shared + rest}, _greedy())
    refs = _run([decode, prefill])
    before = decode.kv_transfer.stats.bytes_received_total
    params = _prefill(prefill, "p", shared + rest)
    decode.add_request("d", {"prompt_token_ids": shared + rest},
                       _greedy(kv_transfer_params=params))
    outs = _run([decode, prefill])
    _assert_same(outs["d"], refs["ref"])
    assert outs["d"].num_cached_tokens == 64
    per_block = 16 * decode.executor.runner.kv_spec.bytes_per_token * 4
    assert decode.kv_transfer.stats.bytes_received_total - before == 3 * per_block  # 64..103
    _settle(prefill)
    _assert_clean(prefill, decode)


def test_expired_lease_fails_or_recomputes_and_frees_the_blocks(engines):
    prefill, decode, recompute = (engines[k] for k in ("short_lease", "decode",
                                                       "decode_recompute"))
    (prompt,) = random_prompts([50], seed=5)
    prefill.add_request("ref", {"prompt_token_ids": prompt}, _greedy())
    ref = _run([prefill])["ref"]
    params = _prefill(prefill, "p", prompt)
    time.sleep(1.2)  # kv_lease_duration 1
    prefill.step()
    assert not prefill.kv.leased and prefill.kv_transfer.stats.leases_expired_total >= 1
    decode.add_request("d", {"prompt_token_ids": prompt}, _greedy(kv_transfer_params=params))
    recompute.add_request("r", {"prompt_token_ids": prompt},
                          _greedy(kv_transfer_params=params))
    outs = _run([decode, recompute, prefill])
    failed = outs["d"].outputs[0]
    assert failed.finish_reason == "error"
    assert "no longer holds the KV" in failed.error or "no KV lease" in failed.error
    _assert_same(outs["r"], ref)
    assert recompute.kv_transfer.stats.loads_recomputed_total >= 1
    _assert_clean(prefill, decode, recompute)


def test_unreachable_prefill_instance_fails_or_recomputes(engines):
    prefill, decode, recompute = (engines[k] for k in ("prefill", "decode", "decode_recompute"))
    (prompt,) = random_prompts([40], seed=6)
    prefill.add_request("ref", {"prompt_token_ids": prompt}, _greedy())
    ref = _run([prefill])["ref"]
    params = _prefill(prefill, "p", prompt)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    bad = {**params, "remote_port": closed}
    decode.add_request("d", {"prompt_token_ids": prompt}, _greedy(kv_transfer_params=bad))
    recompute.add_request("r", {"prompt_token_ids": prompt}, _greedy(kv_transfer_params=bad))
    outs = _run([decode, recompute])
    assert outs["d"].outputs[0].finish_reason == "error"
    assert "could not be reached" in outs["d"].outputs[0].error
    _assert_same(outs["r"], ref)
    prefill.kv_transfer._on_release("p", 0)  # nobody pulled it: what the proxy would do
    _settle(prefill)
    _assert_clean(prefill, decode, recompute)


def test_another_prompt_than_the_prefilled_one_is_refused(engines):
    prefill, decode = engines["prefill"], engines["decode"]
    prompt, other = random_prompts([30, 30], seed=7)
    params = _prefill(prefill, "p", prompt)
    decode.add_request("d", {"prompt_token_ids": other}, _greedy(kv_transfer_params=params))
    out = _run([decode, prefill])["d"].outputs[0]
    assert out.finish_reason == "error" and "computed another prompt" in out.error
    _settle(prefill)
    _assert_clean(prefill, decode)


def test_abort_while_loading_frees_the_blocks_once_the_ranks_stopped(engines):
    prefill, decode = engines["prefill"], engines["decode"]
    (prompt,) = random_prompts([600], seed=8)  # 300 kB of KV at 2 MB/s: 0.15 s
    params = _prefill(prefill, "p", prompt)
    decode.add_request("d", {"prompt_token_ids": prompt}, _greedy(kv_transfer_params=params))
    decode.step()
    decode.step()
    assert "d" in decode.kv_transfer.loads
    held = decode.kv.pool.num_blocks - decode.kv.pool.num_free
    assert held > 0
    decode.abort_request(["d"])
    assert decode.kv.pool.num_blocks - decode.kv.pool.num_free == held  # ranks still write
    _run([decode, prefill])
    assert decode.kv.pool.num_free == decode.kv.pool.num_blocks
    _settle(prefill)
    _assert_clean(prefill, decode)


def test_fp8_caches_travel_as_they_are_with_their_scales():
    """--kv-cache-dtype fp8 on both: the e4m3 bytes are pulled as stored (the scales agree at
    the handshake, compared as the wire gives them back), the tokens are the prefill's."""
    prefill = _engine("kv_producer", kv_cache_dtype="fp8")
    decode = _engine("kv_consumer", kv_cache_dtype="fp8")
    try:
        (prompt,) = random_prompts([70], seed=11)
        prefill.add_request("ref", {"prompt_token_ids": prompt}, _greedy())
        ref = _run([prefill])["ref"]
        params = _prefill(prefill, "p", prompt)
        decode.add_request("d", {"prompt_token_ids": prompt}, _greedy(kv_transfer_params=params))
        out = _run([decode, prefill])["d"]
        assert out.outputs[0].finish_reason == "length", out.outputs[0].error
        _assert_same(out, ref)
        _settle(prefill)
        _assert_clean(prefill, decode)
    finally:
        prefill.shutdown()
        decode.shutdown()


def test_instances_that_cannot_exchange_kv_are_named_at_the_handshake(engines):
    prefill = engines["prefill"]
    config = {"kv_connector": "CpserveConnector", "kv_role": "kv_consumer", "kv_port": 0}
    other = instance(**{**COMMON, "block_size": 32}, kv_transfer_config=config)
    try:
        (prompt,) = random_prompts([40], seed=9)
        params = _prefill(prefill, "p", prompt)
        other.add_request("d", {"prompt_token_ids": prompt}, _greedy(kv_transfer_params=params))
        out = _run([other, prefill])["d"].outputs[0]
        assert out.finish_reason == "error"
        assert "cannot exchange KV: block_size differs" in out.error
        assert "--block-size" in out.error
        _settle(prefill)
        _assert_clean(prefill, other)
    finally:
        other.shutdown()


@pytest.mark.parametrize(("params", "message"), [
    ({"do_remote_prefill": True}, "kv_transfer_params.remote_engine_id is missing"),
    ({"do_remote_decode": "yes"}, "kv_transfer_params.do_remote_decode must be true"),
    ({"do_remote_decode": True, "surprise": 1}, "kv_transfer_params.surprise is not a field"),
    ({"do_remote_decode": True}, "this instance is a kv_consumer"),
])
def test_bad_kv_transfer_params_are_refused_naming_the_field(engines, params, message):
    with pytest.raises(ValueError, match=message):
        engines["decode"].add_request("bad", [5, 6, 7], SamplingParams(
            max_tokens=2, kv_transfer_params=params))
    assert "bad" not in engines["decode"].requests


def test_kv_transfer_config_refusals_name_the_key():
    base = {"kv_connector": "CpserveConnector", "kv_role": "kv_both"}
    for raw, message in [
            ({**base, "kv_connector": "NixlConnector"}, "supports 'CpserveConnector'"),
            ({**base, "kv_role": "sender"}, "kv_role 'sender' must be one of"),
            ({**base, "kv_load_failure_policy": "retry"}, "kv_load_failure_policy 'retry'"),
            ({**base, "kv_ip": "0.0.0.0"}, "listens everywhere"),
            ({**base, "kv_port": "x"}, "kv_port 'x' must be a port"),
            ({**base, "kv_connector_extra_config": {"backends": ["UCX"]}},
             "unknown key\\(s\\) backends"),
            ({**base, "kv_connector_extra_config": {"kv_lease_duration": -1}},
             "kv_lease_duration -1 must be a positive"),
            ({**base, "surprise": 1}, "unknown key\\(s\\) surprise")]:
        with pytest.raises(ConfigError, match=message):
            KVTransferConfig.from_json(raw)
    parsed = KVTransferConfig.from_json({**base, "kv_port": "30000", "kv_buffer_device": "cuda"})
    assert (parsed.kv_port, parsed.is_producer, parsed.is_consumer) == (30000, True, True)


def test_proxy_picks_instances_round_robin_or_by_fewest_in_flight():
    from cpserve.entrypoints.proxy import Pool

    urls = ["http://a:1", "http://b:1", "http://c:1"]
    turns = Pool(urls, "round_robin")
    assert [turns.pick().url for _ in range(4)] == [*urls, urls[0]]
    least = Pool(urls, "least_loaded")
    least.backends[0].in_flight, least.backends[1].in_flight = 2, 1
    assert {least.pick().url for _ in range(3)} == {"http://c:1"}
    least.backends[2].in_flight = 1  # b and c tie: both get turns
    assert {least.pick().url for _ in range(4)} == {"http://b:1", "http://c:1"}


def test_proxy_refuses_a_backend_that_is_not_a_url(capsys):
    from cpserve.entrypoints.cli import main

    assert main(["proxy", "--prefill", "127.0.0.1:8100", "--decode", "http://x:1"]) == 2
    assert "'127.0.0.1:8100' is not an http:// or https:// URL" in capsys.readouterr().err
