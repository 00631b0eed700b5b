"""`AsyncEngine`: the engine process and this process's front end to it. Delivery to
coroutines (every step, on any event loop), aborts, a stalled engine, a dead one, shutdown,
on the real engine with the demo model."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time

import pytest

from cpserve import LLM, SamplingParams
from cpserve.engine.args import EngineArgs
from cpserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    RequestOutputKind,
    RequestStream,
)

ARGS = EngineArgs(model="tiny", max_model_len=512, num_kv_blocks=128)
LONG = SamplingParams(max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    e = AsyncEngine.from_engine_args(ARGS)
    e.start()
    yield e
    e.shutdown()


def is_idle(engine: AsyncEngine) -> bool:
    s = engine.stats()
    return s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0


async def wait_idle(engine: AsyncEngine, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not is_idle(engine):
        assert time.monotonic() < deadline, f"engine not idle: {engine.stats()}"
        await asyncio.sleep(0.01)
    await engine.check_integrity()


def test_outputs_are_deltas_that_add_up_to_the_offline_answer(engine):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2, logprobs=1)

    async def run():
        deltas = [o async for o in engine.generate("deltas", "The morning train", params)]
        stream = RequestStream()
        await engine.add_requests(stream, [("final", "The morning train", params)],
                                  RequestOutputKind.FINAL)
        finals = await stream.get()
        await wait_idle(engine)
        return deltas, finals

    deltas, finals = asyncio.run(run())
    assert deltas[-1].finished and not any(o.finished for o in deltas[:-1])
    assert len(finals) == 1 and finals[0].finished
    with LLM(**vars(ARGS)) as llm:
        offline = llm.generate("The morning train", params, use_tqdm=False)[0]
    for k in range(2):
        mine = [c for o in deltas for c in o.outputs if c.index == k]
        # One token a step, each delta holding only its step's token.
        assert [len(c.token_ids) for c in mine] == [1] * 12
        expected = offline.outputs[k]
        assert sum((c.token_ids for c in mine), []) == expected.token_ids
        assert "".join(c.text for c in mine) == expected.text
        assert [p for c in mine for p in c.logprobs] == expected.logprobs
        assert finals[0].outputs[k].text == expected.text
        assert finals[0].outputs[k].token_ids == expected.token_ids
        assert mine[-1].cumulative_logprob == pytest.approx(expected.cumulative_logprob,
                                                            abs=1e-4)


def test_the_engine_process_runs_async_scheduling():
    """With async scheduling (the default on CUDA) the engine process still sends one delta a
    step, and they add up to the synchronous offline answer: n completions with logprobs, and
    a stop string the front end finds while the sequence's next step is already queued (its
    abort frees everything)."""
    args = dataclasses.replace(ARGS, async_scheduling=True)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2, logprobs=1)
    with LLM(**vars(ARGS)) as llm:
        offline = llm.generate("The morning train", greedy, use_tqdm=False)[0]
        text = offline.outputs[0].text
        stop = text[len(text) // 2:len(text) // 2 + 3]
        stopped = llm.generate("The morning train", dataclasses.replace(greedy, n=1, stop=[stop]),
                               use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 12
    e = AsyncEngine.from_engine_args(args)
    assert e.config.scheduler.async_scheduling  # what the engine process is started with
    e.start()
    try:
        async def run():
            deltas = [o async for o in e.generate("a", "The morning train", greedy)]
            stops = [o async for o in e.generate(
                "b", "The morning train", dataclasses.replace(greedy, n=1, stop=[stop]))]
            await wait_idle(e)
            return deltas, stops

        deltas, stops = asyncio.run(run())
    finally:
        e.shutdown()
    for k in range(2):
        mine = [c for o in deltas for c in o.outputs if c.index == k]
        assert [len(c.token_ids) for c in mine] == [1] * 12
        assert sum((c.token_ids for c in mine), []) == offline.outputs[k].token_ids
        assert [p for c in mine for p in c.logprobs] == offline.outputs[k].logprobs
        assert mine[-1].cumulative_logprob == pytest.approx(
            offline.outputs[k].cumulative_logprob, abs=1e-4)
    assert sum((c.token_ids for o in stops for c in o.outputs), []) == stopped.token_ids
    assert "".join(c.text for o in stops for c in o.outputs) == stopped.text
    assert stops[-1].outputs[0].finish_reason == "stop"


def test_a_slow_consumer_sees_every_step(engine):
    """Outputs that wait for their consumer are kept, one a step; they were merged into the
    latest once (a streaming client saw a burst, its timings lost)."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def run():
        outputs = []
        async for output in engine.generate("slow", "The morning train", params):
            outputs.append(output)
            await asyncio.sleep(0.1)  # several steps come meanwhile
        await wait_idle(engine)
        return outputs

    outputs = asyncio.run(run())
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1] * 20


def test_a_batch_with_a_bad_prompt_adds_nothing(engine):
    async def run():
        stream = RequestStream()
        with pytest.raises(ValueError, match="empty"):
            await engine.add_requests(stream, [("good", "hello", LONG), ("bad", [], LONG)])
        assert stream.finished
        await wait_idle(engine)
        # The ids are free again.
        outputs = [o async for o in engine.generate("good", "hello",
                                                    SamplingParams(max_tokens=2))]
        assert outputs[-1].finished

    asyncio.run(run())


def test_cancelled_consumer_aborts_its_request(engine):
    async def run():
        first_output = asyncio.Event()

        async def consume():
            async for _ in engine.generate("abandoned", "The morning train", LONG):
                first_output.set()

        task = asyncio.create_task(consume())
        await first_output.wait()
        assert engine.stats().num_running == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        generated = engine.stats().generation_tokens_total
        await wait_idle(engine)
        assert engine.stats().generation_tokens_total - generated < 50

    asyncio.run(run())


def test_outputs_reach_consumers_on_several_event_loops(engine):
    results = {}

    def consumer(name: str) -> None:
        async def run():
            params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            outputs = [o async for o in engine.generate(name, "hello", params)]
            results[name] = "".join(o.outputs[0].text for o in outputs)

        asyncio.run(run())

    threads = [threading.Thread(target=consumer, args=(f"loop-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and len(set(results.values())) == 1  # greedy, same prompt


def _cpu_ticks(stat_path: str) -> int:
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_an_idle_engine_sleeps(engine):
    assert is_idle(engine)
    engine_process = f"/proc/{engine.engine_pid}/stat"
    output_thread = f"/proc/self/task/{engine._thread.native_id}/stat"
    before = [_cpu_ticks(engine_process), _cpu_ticks(output_thread)]
    time.sleep(0.5)
    # A busy loop would burn ~50 ticks (10 ms each) in 0.5 s; the ranks' keep-alives and
    # the output thread's look at the engine process (5 a second) take far less than one.
    after = [_cpu_ticks(engine_process), _cpu_ticks(output_thread)]
    assert [b - a for a, b in zip(before, after)] <= [3, 2], (before, after)
    assert engine.health() is None


def test_health_reports_an_engine_that_makes_no_progress(engine, monkeypatch):
    """Work is unfinished and nothing moves (the engine process is stopped, as a hung device
    would hold it): /health must say so, and recover once steps run again."""
    monkeypatch.setattr(engine, "stall_timeout_s", 0.3)

    async def run():
        stream = RequestStream()
        await engine.add_requests(stream, [("stuck", "The morning train", LONG)])
        await stream.get()  # it is running
        assert engine.health() is None
        os.kill(engine.engine_pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 3.0
            while engine.health() is None:
                assert time.monotonic() < deadline, "health never reported the stall"
                await asyncio.sleep(0.02)
            assert "no progress" in engine.health()
        finally:
            os.kill(engine.engine_pid, signal.SIGCONT)
        # Outputs queued before the stop may still be in the stream: wait for news of a
        # step that ran after it, rather than trusting the first output read.
        deadline = time.monotonic() + 5.0
        while engine.health() is not None:
            assert time.monotonic() < deadline, "health never recovered after steps resumed"
            await asyncio.wait_for(stream.get(), timeout=5.0)
        engine.abort(["stuck"])
        await wait_idle(engine)

    asyncio.run(run())


def test_shutdown_ends_requests_in_flight(engine):
    async def run():
        got_one = asyncio.Event()

        async def consume():
            async for _ in engine.generate("cut short", "hello", LONG):
                got_one.set()

        task = asyncio.create_task(consume())
        await got_one.wait()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            await task
        assert engine.health() is not None
        with pytest.raises(EngineDeadError):
            await engine.add_requests(RequestStream(), [("late", "hello", LONG)])

    asyncio.run(run())
    assert engine._client.exitcode() == 0  # it stopped as asked


def test_a_killed_engine_process_fails_everyone():
    """The engine process vanishes (the OOM killer, a segfault in a kernel): consumers get
    EngineDeadError, later calls fail at once, and the death callbacks hear why."""
    engine = AsyncEngine.from_engine_args(ARGS)
    deaths = []
    engine.on_death.append(deaths.append)
    engine.start()

    async def run():
        received = 0
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("doomed", "The morning train", LONG):
                received += 1
                if received == 3:
                    os.kill(engine.engine_pid, signal.SIGKILL)
        assert 3 <= received < 400
        with pytest.raises(EngineDeadError):
            await engine.add_requests(RequestStream(), [("late", "hello", LONG)])
        with pytest.raises(EngineDeadError):
            await engine.check_integrity()

    try:
        asyncio.run(run())
        assert engine.is_dead and engine.health() is not None
    finally:
        engine.shutdown()
    assert [str(e) for e in deaths] == [f"the engine process (pid {engine.engine_pid}) was "
                                        "killed by SIGKILL"]
