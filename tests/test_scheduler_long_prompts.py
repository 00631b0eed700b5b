"""Scheduling long prompts with vLLM's flags (`--enable-chunked-prefill`,
`--long-prefill-token-threshold`), on the real scheduler and KV manager (milliseconds)."""

from __future__ import annotations

import argparse

import pytest
from test_scheduler import add, run_step

from cpserve.config import ConfigError, SchedulerConfig
from cpserve.engine.args import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineArgs
from cpserve.engine.scheduler import Scheduler
from cpserve.kv.layout import KVLayout
from cpserve.kv.manager import KVCacheManager
from cpserve.models.demo import ensure_tiny_model

LONG = 131072


def scheduler(config: SchedulerConfig, num_blocks: int = 64, block_size: int = 4) -> Scheduler:
    kv = KVCacheManager(KVLayout(block_size), num_blocks, False, salt=b"t")
    return Scheduler(config, kv)


def default_config(max_model_len: int, **args) -> SchedulerConfig:
    """The scheduler config the engine builds from these EngineArgs."""
    budget, threshold = EngineArgs(**args).step_budget(max_model_len)
    return SchedulerConfig(max_num_batched_tokens=budget, long_prefill_token_threshold=threshold,
                           enable_chunked_prefill=args.get("enable_chunked_prefill", True))


def test_with_default_flags_a_long_prefill_starves_nobody():
    """While a 128k prompt prefills: running requests decode every step, and a short request
    that arrives gets its first token within two steps."""
    config = default_config(LONG + 1024)
    assert config.max_num_batched_tokens == DEFAULT_MAX_NUM_BATCHED_TOKENS
    assert 0 < config.long_prefill_token_threshold < config.max_num_batched_tokens
    s = scheduler(config, num_blocks=(LONG + 4096) // 16, block_size=16)
    decoding = add(s, "decoding", 30, max_tokens=10_000)
    run_step(s)
    long = add(s, "long", LONG, max_tokens=1)
    steps, short, short_arrived = 0, None, None
    while not long.output_token_ids:
        scheduled = run_step(s)
        steps += 1
        assert scheduled["decoding"] == 1  # never skipped while the long prompt prefills
        assert scheduled["long"] <= config.long_prefill_token_threshold
        if short is not None and not short.output_token_ids:
            assert steps - short_arrived < 2, "no first token within two steps"
        if steps == 3:  # a short request arrives in the middle of the prefill
            short, short_arrived = add(s, "short", 500, max_tokens=1), steps
    assert short.output_token_ids
    # The long prompt lost nothing: it took its capped share every step.
    assert steps == -(-LONG // config.long_prefill_token_threshold)
    assert len(decoding.output_token_ids) == steps + 1


def test_threshold_caps_running_and_waiting_requests():
    s = scheduler(SchedulerConfig(max_num_batched_tokens=32, long_prefill_token_threshold=6))
    add(s, "a", 20)
    assert run_step(s) == {"a": 6}  # admitted: capped
    add(s, "b", 9)
    assert run_step(s) == {"a": 6, "b": 6}  # running and waiting alike
    assert run_step(s) == {"a": 6, "b": 3}
    assert run_step(s) == {"a": 2, "b": 1}  # a completes, b decodes


def test_zero_threshold_means_no_cap():
    s = scheduler(SchedulerConfig(max_num_batched_tokens=32, long_prefill_token_threshold=0))
    add(s, "a", 40)
    assert run_step(s) == {"a": 32}


def test_without_chunked_prefill_a_prompt_waits_for_a_step_it_fits():
    s = scheduler(SchedulerConfig(max_num_batched_tokens=24, enable_chunked_prefill=False))
    add(s, "a", 20, max_tokens=5)
    assert run_step(s) == {"a": 20}  # whole
    add(s, "b", 24)
    assert run_step(s) == {"a": 1}  # 23 tokens left this step: b waits, unchunked
    add(s, "c", 3)
    assert run_step(s) == {"a": 1}  # in arrival order: c waits behind b
    s.finish(s.running[0], s.running[0].status.FINISHED_ABORTED)
    assert run_step(s) == {"b": 24}


def test_defaults_follow_chunked_prefill():
    assert EngineArgs().step_budget(4096) == (8192, 4096)
    assert EngineArgs(max_num_batched_tokens=2048).step_budget(4096) == (2048, 1024)
    assert EngineArgs(long_prefill_token_threshold=0).step_budget(4096) == (8192, 0)
    # vLLM: without chunked prefill the default budget holds the longest prompt.
    assert EngineArgs(enable_chunked_prefill=False).step_budget(131072) == (131072, 0)


@pytest.mark.parametrize("args,message", [
    (dict(enable_chunked_prefill=False, max_num_batched_tokens=100, max_model_len=512),
     "max_num_batched_tokens=100 is smaller than max_model_len=512"),
    (dict(enable_chunked_prefill=False, long_prefill_token_threshold=64, max_model_len=512),
     "long_prefill_token_threshold=64 chunks long prompts"),
    (dict(long_prefill_token_threshold=-1), "long_prefill_token_threshold=-1 must be"),
])
def test_invalid_combinations_stop_start_up(args, message):
    with pytest.raises(ConfigError, match=message):
        EngineArgs(model=str(ensure_tiny_model()), **args).create_engine_config()


def test_cli_flags_have_vllm_names():
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli_args(parser.parse_args(
        ["--no-enable-chunked-prefill", "--long-prefill-token-threshold", "0"]))
    assert args.enable_chunked_prefill is False and args.long_prefill_token_threshold == 0
    args = EngineArgs.from_cli_args(parser.parse_args(["--enable-chunked-prefill"]))
    assert args.enable_chunked_prefill is True and args.long_prefill_token_threshold is None
