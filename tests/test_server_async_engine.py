"""`AsyncEngine`: the engine thread, delivery to coroutines, aborts, death and shutdown, on the
real engine with the demo model."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from cpserve import SamplingParams
from cpserve.engine.args import EngineArgs
from cpserve.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from cpserve.engine.llm_engine import LLMEngine

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
    await engine.call(lambda e: e.check_integrity())


def test_outputs_are_cumulative_and_end_finished(engine):
    async def run():
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)
        outputs = [o async for o in engine.generate("cumulative", "The morning train", params)]
        await wait_idle(engine)
        return outputs

    outputs = asyncio.run(run())
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    for k in range(2):
        lengths = [len(o.outputs[k].token_ids) for o in outputs]
        assert lengths == sorted(lengths) and lengths[-1] == 12
        final = outputs[-1].outputs[k]
        assert final.finish_reason == "length"
        assert all(final.token_ids[:len(o.outputs[k].token_ids)] == o.outputs[k].token_ids
                   for o in outputs)


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
            results[name] = outputs[-1].outputs[0].text

        asyncio.run(run())

    threads = [threading.Thread(target=consumer, args=(f"loop-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4 and len(set(results.values())) == 1  # greedy, same prompt


def _cpu_ticks(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_idle_engine_thread_sleeps(engine):
    assert is_idle(engine)
    native_id = engine._thread.native_id
    before = _cpu_ticks(native_id)
    time.sleep(0.5)
    # A busy loop would burn ~50 ticks (10 ms each) in 0.5 s.
    assert _cpu_ticks(native_id) - before <= 2
    assert engine.health() is None


def test_health_reports_an_engine_that_makes_no_progress(engine, monkeypatch):
    """Work is unfinished and nothing moves (here the engine thread is held by a command):
    /health must say so, and recover once steps run again."""
    monkeypatch.setattr(engine, "stall_timeout_s", 0.3)

    async def run():
        stream = RequestStream()
        await engine.add_requests(stream, [("stuck", "The morning train", LONG)])
        await stream.get()  # it is running
        assert engine.health() is None
        held = asyncio.ensure_future(engine.call(lambda e: time.sleep(1.2)))
        deadline = time.monotonic() + 1.0
        while engine.health() is None:
            assert time.monotonic() < deadline, "health never reported the stall"
            await asyncio.sleep(0.02)
        assert "no progress" in engine.health()
        await held
        await stream.get()  # steps run again
        assert engine.health() is None
        engine.abort(["stuck"])
        await wait_idle(engine)

    asyncio.run(run())


def test_engine_death_fails_everyone():
    llm_engine = LLMEngine.from_engine_args(ARGS)
    real_step = llm_engine.step
    num_steps = 0

    def step_then_fail():
        nonlocal num_steps
        num_steps += 1
        if num_steps > 3:
            raise RuntimeError("injected fault")
        return real_step()

    llm_engine.step = step_then_fail
    engine = AsyncEngine(llm_engine)
    deaths = []
    engine.on_death.append(deaths.append)
    engine.start()

    async def run():
        received = 0
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("doomed", "The morning train", LONG):
                received += 1
        assert 1 <= received <= 3
        with pytest.raises(EngineDeadError):
            await engine.add_requests(RequestStream(), [("late", "hello", LONG)])
        with pytest.raises(EngineDeadError):
            await engine.call(lambda e: None)

    asyncio.run(run())
    assert engine.is_dead and engine.health() is not None
    engine.shutdown()  # joins the engine thread, which runs the callbacks last
    assert [str(e) for e in deaths] == ["injected fault"]


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

    asyncio.run(run())
