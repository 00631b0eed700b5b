"""Async scheduling (step n+1 queued while step n runs) gives what synchronous steps give:
same greedy tokens, same seeded samples, stops and lengths honoured, aborts and preemptions
leaving no KV behind, failures confined to their request. On CPU nothing overlaps, but every
path of the pipeline runs: pending tokens fed from the last step's samples, the extra step of
a request that stopped on its pending token dropped, blocks freed while a step is queued.
(Every parallel layout runs async too: tests/test_context_parallel.py.)
"""

from __future__ import annotations

import pytest

from cpserve import LLM, SamplingParams
from cpserve.distributed.plan import PENDING_TOKEN
from cpserve.engine.executor import Executor
from tests.checkpoints import random_prompts

# 24 blocks of 4 tokens: the batch below cannot hold all its requests at full length, so
# requests are preempted and recomputed while steps are in flight.
COMMON = dict(block_size=4, num_kv_blocks=24, max_model_len=64, max_num_batched_tokens=24,
              seed=0)
PROMPTS = random_prompts([3, 9, 17, 30, 5, 12], seed=3)


@pytest.fixture(scope="module")
def engines():
    with LLM("tiny", async_scheduling=False, **COMMON) as sync, \
            LLM("tiny", async_scheduling=True, **COMMON) as overlapped:
        assert overlapped.engine.async_scheduling and not sync.engine.async_scheduling
        yield sync, overlapped


def _mixed_params(stop_token: int) -> list[SamplingParams]:
    """Lengths, a stop token, logprobs, prompt logprobs, min_tokens, a repetition penalty
    and seeded sampling with n=2: every per-request feature the pipeline must keep."""
    return [
        SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                       stop_token_ids=[stop_token]),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=1),
        SamplingParams(temperature=0.8, top_k=20, seed=7, n=2, max_tokens=9, ignore_eos=True,
                       min_tokens=4, repetition_penalty=1.3),
        SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=13, ignore_eos=True),
    ]


def _run(llm: LLM, params: list[SamplingParams]):
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    engine = llm.engine
    engine.check_integrity()
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks  # nothing leaked
    return outputs


def test_same_outputs_as_synchronous_steps(engines):
    sync, overlapped = engines
    # A stop token the second request meets mid-way in the greedy reference.
    probe = sync.generate({"prompt_token_ids": PROMPTS[1]},
                          SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    stop_token = probe[6]
    expected = _run(sync, _mixed_params(stop_token))
    preemptions = overlapped.engine.stats().num_preemptions_total
    got = _run(overlapped, _mixed_params(stop_token))
    assert overlapped.engine.stats().num_preemptions_total > preemptions  # it did preempt
    for ours, ref in zip(got, expected):
        assert len(ours.outputs) == len(ref.outputs)
        for a, b in zip(ours.outputs, ref.outputs):
            assert a.token_ids == b.token_ids, ours.request_id
            assert (a.finish_reason, a.stop_reason) == (b.finish_reason, b.stop_reason)
            assert a.text == b.text
    assert got[1].outputs[0].finish_reason == "stop"
    assert got[1].outputs[0].token_ids[-1] == stop_token
    # Logprobs of the chosen tokens and of the prompt: same values, same ranks (fp32, the
    # same kernels on the same batches up to which requests share them).
    for ours, ref in ((got[2].outputs[0].logprobs, expected[2].outputs[0].logprobs),
                      (got[3].prompt_logprobs[1:], expected[3].prompt_logprobs[1:])):
        assert len(ours) == len(ref)
        for a, b in zip(ours, ref):
            assert list(a) == list(b)
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank
                       for t in a)


def test_decodes_are_fed_from_the_device_while_a_step_is_queued(engines, monkeypatch):
    """In steady decoding every planned decode token is pending (its value comes from the
    previous step's samples on the device), and each call returns the news of the step
    queued before (the first call queues two: it returns what the first did)."""
    _, overlapped = engines
    engine = overlapped.engine
    plans = []
    execute = Executor.execute
    monkeypatch.setattr(Executor, "execute", lambda self, plan, *a: plans.append(plan)
                        or execute(self, plan, *a))
    engine.add_request("steady", PROMPTS[0],
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    news = []
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            news.append((len(out.new_token_ids), out.finish_reason))
    # One token per step, none lost or repeated; the sixth ends it.
    assert news == [(1, None)] * 5 + [(1, "length")]
    decodes = [p.requests[0].token_ids for p in plans if p.requests][1:]
    # max_tokens is known ahead: no step is queued past the sixth token.
    assert decodes == [[PENDING_TOKEN]] * 5
    assert not engine._in_flight and engine.kv.pool.num_free == engine.kv.pool.num_blocks


def test_abort_while_a_step_is_queued_frees_everything(engines):
    sync, overlapped = engines
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    [expected] = sync.generate({"prompt_token_ids": PROMPTS[2]}, params, use_tqdm=False)
    engine = overlapped.engine
    engine.add_request("keep", PROMPTS[2], params)
    engine.add_request("drop", PROMPTS[3], params)
    tokens = {"keep": [], "drop": []}
    ends = {}

    def step() -> None:
        for out in engine.step().outputs:
            tokens[out.request_id] += out.new_token_ids
            if out.finish_reason is not None:
                ends[out.request_id] = out.finish_reason

    for _ in range(4):
        step()
    assert engine._in_flight is not None  # "drop" is in the queued step
    dropped_at = len(tokens["drop"])
    engine.abort_request(["drop"])
    engine.check_integrity()
    while engine.has_unfinished_requests():
        step()
    assert tokens["keep"] == expected.outputs[0].token_ids and ends["keep"] == "length"
    # No news of an aborted sequence: the front end that aborted it knows.
    assert len(tokens["drop"]) == dropped_at and "drop" not in ends
    engine.check_integrity()
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks
    assert engine.step().outputs == []  # the next plan tells the workers which requests ended
    assert len(engine.executor.runner.rows) == 0
