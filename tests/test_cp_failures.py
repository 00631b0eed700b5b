"""Start-up refuses invalid layouts; a dead rank is reported, never waited on forever."""

from __future__ import annotations

import time

import pytest

from cpserve import LLM, SamplingParams
from cpserve.config import ConfigError, ParallelConfig
from cpserve.distributed.worker_pool import WorkerDiedError
from cpserve.engine.worker import start_worker_pool
from tests.checkpoints import make_checkpoint


@pytest.mark.parametrize("kwargs,message", [
    (dict(tensor_parallel_size=2, decode_context_parallel_size=4),
     r"decode_context_parallel_size=4 must divide tensor_parallel_size // num_key_value_heads "
     r"= 2 // 1 = 2 for this GQA model"),
    (dict(tensor_parallel_size=3), "tensor_parallel_size=3 must divide num_attention_heads=8"),
    (dict(block_size=16, cp_kv_cache_interleave_size=3),
     "cp_kv_cache_interleave_size=3 must divide block_size=16"),
    (dict(prefill_context_parallel_size=0), "prefill_context_parallel_size=0 must be a positive"),
    (dict(pcp_kv_exchange="carrier-pigeon"), "kv_exchange='carrier-pigeon'"),
    (dict(pcp_min_split_tokens=-1), r"pcp_min_split_tokens=-1 must be an integer >= 0 "
     r"\(--pcp-min-split-tokens\)"),
])
def test_invalid_layouts_are_refused_at_start_up(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LLM("tiny", **kwargs)


def test_gqa_rules_with_more_kv_heads(tmp_path):
    path = str(make_checkpoint(tmp_path, "qwen3", num_attention_heads=8, num_key_value_heads=4))
    with pytest.raises(ConfigError, match="must be 1 when tensor_parallel_size=2 < num_key_value_heads=4"):
        LLM(path, tensor_parallel_size=2, decode_context_parallel_size=2)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size // num_key_value_heads = 8 // 4 = 2"):
        LLM(path, tensor_parallel_size=8, decode_context_parallel_size=4)


def test_idle_ranks_stay_alive_and_a_killed_rank_is_named():
    params = SamplingParams(temperature=0, max_tokens=4)
    # A short collective timeout: idle ranks must be kept alive by the driver's keep-alives.
    with start_worker_pool(ParallelConfig(1, 2, 1), "cpu", timeout_s=3) as pool:
        llm = LLM("tiny", worker_pool=pool, prefill_context_parallel_size=2, num_kv_blocks=64,
                  max_model_len=1024)
        first = llm.generate("hello there", params, use_tqdm=False)
        time.sleep(5)
        assert llm.generate("hello there", params, use_tqdm=False)[0].outputs[0].token_ids == \
            first[0].outputs[0].token_ids

        pool._processes[0].kill()
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match="rank 1"):
            llm.generate("hello again, with a longer prompt", params, use_tqdm=False)
        assert time.monotonic() - started < 30
        assert not llm.engine.has_unfinished_requests()
        assert all(not p.is_alive() for p in pool._processes)


def test_a_rank_that_stops_answering_is_noticed():
    import os
    import signal

    with start_worker_pool(ParallelConfig(2, 1, 1), "cpu", timeout_s=3) as pool:
        llm = LLM("tiny", worker_pool=pool, tensor_parallel_size=2, num_kv_blocks=64,
                  max_model_len=1024)
        os.kill(pool._processes[0].pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match="stopped answering"):
            llm.generate("hello", SamplingParams(max_tokens=4), use_tqdm=False)
        assert time.monotonic() - started < 30
