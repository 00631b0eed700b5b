"""The scheduler over real requests and a real KV manager, without a model (milliseconds)."""

from __future__ import annotations

from cpserve.config import SchedulerConfig
from cpserve.engine.scheduler import Scheduler
from cpserve.kv.layout import KVLayout
from cpserve.kv.manager import KVCacheManager
from cpserve.request import Request, RequestStatus
from cpserve.sampling_params import SamplingParams


def make_scheduler(num_blocks=64, block_size=4, max_tokens=32, max_seqs=8, shards=1,
                   prefix_caching=False) -> Scheduler:
    kv = KVCacheManager(KVLayout(block_size, shards), num_blocks, prefix_caching, salt=b"t")
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens), kv)


def add(s: Scheduler, rid: str, prompt_len: int, max_tokens: int = 4) -> Request:
    r = Request(rid, list(range(100, 100 + prompt_len)), SamplingParams(max_tokens=max_tokens))
    s.add_request(r)
    return r


def run_step(s: Scheduler) -> dict[str, int]:
    """One step as the engine does it, with token 7 'sampled' for every completing request."""
    out = s.schedule()
    s.update_after_step(out)
    for item in out.scheduled:
        r = item.request
        if item.completes:
            r.append_token(7)
            if len(r.output_token_ids) >= r.params.max_tokens:
                s.finish(r, RequestStatus.FINISHED_LENGTH)
    s.kv.check_integrity()
    return {item.request.request_id: item.num_new_tokens for item in out.scheduled}


def test_long_prompt_is_chunked_under_the_token_budget():
    s = make_scheduler(max_tokens=8)
    r = add(s, "long", 20)
    assert run_step(s) == {"long": 8}
    assert run_step(s) == {"long": 8}
    assert run_step(s) == {"long": 4}  # completes the prompt and samples
    assert r.output_token_ids == [7]
    assert run_step(s) == {"long": 1}  # decode


def test_decodes_and_a_prefill_chunk_share_a_step():
    s = make_scheduler(max_tokens=10)
    add(s, "a", 3, max_tokens=10)
    run_step(s)
    add(s, "b", 30)
    assert run_step(s) == {"a": 1, "b": 9}  # the running decode first, the rest to the prompt
    assert run_step(s) == {"a": 1, "b": 9}


def test_max_num_seqs_caps_running_requests():
    s = make_scheduler(max_seqs=2)
    for i in range(3):
        add(s, f"r{i}", 2)
    assert set(run_step(s)) == {"r0", "r1"}
    assert len(s.waiting) == 1


def test_preemption_by_recompute_and_resume():
    # 6 blocks of 4 tokens: two requests of 8-token prompts growing to 16 tokens cannot both fit.
    s = make_scheduler(num_blocks=6, max_tokens=64)
    a = add(s, "a", 8, max_tokens=8)
    b = add(s, "b", 8, max_tokens=8)
    preempted = False
    for _ in range(40):
        if not s.has_unfinished():
            break
        run_step(s)
        preempted |= b.num_preemptions > 0
    assert preempted and s.num_preemptions_total >= 1
    assert a.is_finished and b.is_finished
    assert len(a.output_token_ids) == 8 and len(b.output_token_ids) == 8
    assert s.kv.pool.num_free == 6  # everything returned
    s.kv.check_integrity()


def test_abort_frees_blocks_at_once():
    s = make_scheduler()
    r = add(s, "r", 10)
    run_step(s)
    assert s.kv.pool.num_free < 64
    s.finish(r, RequestStatus.FINISHED_ABORTED)
    assert s.kv.pool.num_free == 64 and not s.has_unfinished()
    assert s.schedule().freed_request_ids == ["r"]  # workers are told to forget it
    s.kv.check_integrity()


def test_virtual_blocks_hold_block_size_times_shards_tokens():
    s = make_scheduler(num_blocks=4, block_size=4, shards=4, max_tokens=64)
    add(s, "r", 60)  # 60 tokens need ceil(60 / 16) = 4 blocks of each rank
    assert run_step(s) == {"r": 60}
    assert s.kv.pool.num_free == 0


def test_prefix_cache_hit_skips_computed_tokens():
    s = make_scheduler(prefix_caching=True, max_tokens=64)
    add(s, "a", 12, max_tokens=1)
    run_step(s)
    b = add(s, "b", 14, max_tokens=1)  # shares the first 12 tokens: 3 full blocks
    assert run_step(s) == {"b": 14 - 12}
    assert b.num_cached_tokens == 12
    assert s.kv.prefix_hits == 12
    s.kv.check_integrity()


def test_a_request_the_cache_cannot_hold_alone_fails_instead_of_preempting_itself():
    # 8 blocks of 4 tokens = 32 tokens of KV; the request grows past it while others wait.
    s = make_scheduler(num_blocks=8, max_tokens=8)
    big = add(s, "big", 20, max_tokens=40)
    small = add(s, "small", 6, max_tokens=3)
    for _ in range(200):
        if not s.has_unfinished():
            break
        run_step(s)
    assert not s.has_unfinished(), "the scheduler spun without finishing its requests"
    assert big.status == RequestStatus.FINISHED_ERROR
    assert "needs KV for 33 tokens" in big.error and "holds (32 tokens)" in big.error
    assert small.status == RequestStatus.FINISHED_LENGTH and len(small.output_token_ids) == 3
    assert s.kv.pool.num_free == 8
    s.kv.check_integrity()


def test_a_waiting_request_that_can_never_be_admitted_fails_and_the_next_runs():
    s = make_scheduler(num_blocks=2, max_tokens=64)  # 8 tokens of KV
    too_long = add(s, "too-long", 12)
    fits = add(s, "fits", 3, max_tokens=2)
    out = s.schedule()
    assert out.failed == [too_long] and too_long.status == RequestStatus.FINISHED_ERROR
    assert [item.request for item in out.scheduled] == [fits]
    s.kv.check_integrity()


def test_prompt_logprobs_requests_do_not_read_the_prefix_cache():
    """A cache hit would skip the logits of the cached prompt tokens (vLLM skips it too)."""
    s = make_scheduler(prefix_caching=True, max_tokens=64)
    add(s, "a", 12, max_tokens=1)
    run_step(s)
    r = Request("b", list(range(100, 114)), SamplingParams(max_tokens=1, prompt_logprobs=0))
    s.add_request(r)
    assert run_step(s) == {"b": 14}
    assert r.num_cached_tokens == 0
    s.kv.check_integrity()
