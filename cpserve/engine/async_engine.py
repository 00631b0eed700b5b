"""The API server's engine: a front end in this process, the engine core in another.

    this process (HTTP, event loops)                   engine process (core_process.py)
    add_requests ─ tokenize, check, fan out ─ "add" ─> LLMEngine: schedule, run, sample
    abort ─────────────────────────────────── "abort"> frees KV at once
    output thread <───────────── "outputs" per step ── news of each sequence
      OutputProcessor: detokenize, stop strings (an "abort" back), logprob text
      RequestStream.get() <── loop.call_soon_threadsafe (consumers on any event loop)

Tokenizing, detokenizing, stop strings, logprob decoding and HTTP never delay a step: they
run here while the engine computes the next one. Each stream gets one output per engine step
that gives it news, never merged: a streaming client sees every step.

If the engine process dies (a step raised, it was killed, the machine ran out of memory) or
this process loses it, every waiting consumer gets `EngineDeadError`, later calls fail at once,
`health()` reports it and the `on_death` callbacks run (the server uses one to exit non-zero).
The engine process dies with this one, however this one ends (a lifeline pipe).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cpserve.engine.core_client import EngineCoreClient
from cpserve.engine.errors import EngineDeadError, QueueFullError
from cpserve.engine.input_processor import InputProcessor, load_tokenizer
from cpserve.engine.messages import EngineCoreOutputs, EngineStats, decode_outputs, encode_request
from cpserve.engine.output_processor import (
    FinishedRequest,
    OutputProcessor,
    RequestOutputKind,
)
from cpserve.outputs import RequestOutput
from cpserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from cpserve.config import EngineConfig
    from cpserve.engine.args import EngineArgs

__all__ = ["AsyncEngine", "EngineDeadError", "QueueFullError", "RequestStream",
           "RequestOutputKind"]

logger = logging.getLogger(__name__)

Prompt = str | list[int]
_RECV_POLL_S = 0.2  # how often the output thread looks at the engine process between news


class EngineObserver(Protocol):
    """Per-step and per-request events, reported from the output thread (keep these cheap)."""

    def on_step(self, num_tokens: int) -> None: ...

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_inter_token(self, itl_s: float) -> None: ...

    def on_finished(self, request: FinishedRequest, e2e_s: float) -> None: ...

    def on_aborted(self) -> None: ...


class RequestStream:
    """Outputs of one or more requests, delivered on the event loop that created the stream.

    An HTTP call with several prompts adds them all to one stream, so one consumer waits on
    one queue.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.request_ids: list[str] = []
        self._unfinished: set[str] = set()

    @property
    def finished(self) -> bool:
        """True once every request added to this stream has delivered its final output."""
        return not self._unfinished

    @property
    def unfinished_ids(self) -> list[str]:
        return [rid for rid in self.request_ids if rid in self._unfinished]

    def _put_all(self, items: list[RequestOutput | BaseException]) -> None:
        for item in items:
            self._queue.put_nowait(item)

    async def get(self) -> list[RequestOutput]:
        """Wait for news; returns every output that came since the last call, in order.

        Raises `EngineDeadError` if the engine stopped while requests were in flight.
        """
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        outputs = []
        for item in items:
            if isinstance(item, BaseException):
                self._unfinished.clear()
                raise item
            if item.finished:
                self._unfinished.discard(item.request_id)
            outputs.append(item)
        return outputs


@dataclass
class _Tracked:
    """What the output thread remembers of a request in flight."""

    stream: RequestStream
    arrival: float  # time.monotonic()
    last_token_time: float | None = None


class AsyncEngine:
    """The engine process and this process's front end to it, for coroutines.

    `max_waiting_requests` bounds the engine's waiting queue: an add that would go past it
    fails with `QueueFullError`. `stall_timeout_s` is how long the engine may go without
    progress (news of a step) while requests are unfinished before `health()` calls it stuck.
    """

    def __init__(self, config: EngineConfig, *, max_waiting_requests: int | None = None,
                 stall_timeout_s: float = 300.0, log_requests: bool = False) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.inputs = InputProcessor(config, self.tokenizer)
        self.max_waiting_requests = (max_waiting_requests if max_waiting_requests is not None
                                     else config.scheduler.max_waiting_requests)
        self.stall_timeout_s = stall_timeout_s
        self.log_requests = log_requests  # --enable-log-requests: a line per request
        self.observers: list[EngineObserver] = []
        self.on_death: list[Callable[[BaseException], None]] = []

        # Shared by event loops and the output thread: requests in flight, pending calls.
        self._lock = threading.Lock()
        self._outputs = OutputProcessor(self.tokenizer)
        self._tracked: dict[str, _Tracked] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._stats = EngineStats()
        self._last_progress = time.monotonic()
        self._dead: BaseException | None = None
        self._stopping = False
        self._client = EngineCoreClient(config, max_waiting_requests=self.max_waiting_requests)
        self._thread = threading.Thread(target=self._run, name="cpserve-outputs", daemon=True)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs: Any) -> AsyncEngine:
        return cls(args.create_engine_config(), **kwargs)

    @property
    def engine_pid(self) -> int:
        """The engine process's pid."""
        return self._client.pid

    # ---- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    async def add_requests(self, stream: RequestStream,
                           requests: Sequence[tuple[str, Prompt, SamplingParams]],
                           kind: RequestOutputKind = RequestOutputKind.DELTA) -> None:
        """Add requests whose outputs go to `stream`, all or none.

        Raises ValueError (bad input, message for the user), QueueFullError or EngineDeadError.
        """
        if self._dead is not None or self._stopping:
            raise EngineDeadError("the inference engine has stopped")
        arrival = time.time()
        if any(isinstance(prompt, str) for _, prompt, _ in requests):
            tokenized = await asyncio.get_running_loop().run_in_executor(
                None, lambda: [self.inputs.tokenize(p) for _, p, _ in requests])
        else:
            tokenized = [(None, list(p)) for _, p, _ in requests]
        sequences = []
        for (rid, _, params), (_, token_ids) in zip(requests, tokenized):
            sequences += self.inputs.sequences(rid, token_ids, params, arrival)
        ids = [rid for rid, _, _ in requests]
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            added = []
            try:
                for (rid, _, params), (text, token_ids) in zip(requests, tokenized):
                    self._outputs.add(rid, text, token_ids, params, kind, arrival)
                    added.append(rid)
            except ValueError:
                for rid in added:
                    self._outputs.abort(rid)
                raise
            if not self._tracked:
                self._last_progress = time.monotonic()  # the stall clock starts now
            for rid in ids:
                self._tracked[rid] = _Tracked(stream, time.monotonic())
            call_id = next(self._call_ids)
            self._calls[call_id] = future
        stream.request_ids.extend(ids)
        stream._unfinished.update(ids)
        try:
            self._client.send(["add", call_id, [encode_request(s) for s in sequences]])
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.abort(ids)
            raise
        except BaseException:
            self._forget(ids)
            stream._unfinished.difference_update(ids)
            raise
        if self.log_requests:
            for (rid, _, params), (_, token_ids) in zip(requests, tokenized):
                logger.info("Received request %s: prompt of %d token ids, %s", rid,
                            len(token_ids), params)

    async def generate(self, request_id: str, prompt: Prompt,
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The outputs of one request, each holding what one step added (DELTA); closing or
        cancelling the iterator aborts the request.

        Use `contextlib.aclosing` when breaking out early, so the abort happens at once.
        """
        stream = RequestStream()
        await self.add_requests(stream, [(request_id, prompt, params)])
        try:
            while not stream.finished:
                for output in await stream.get():
                    yield output
        finally:
            if not stream.finished:
                self.abort([request_id])

    def abort(self, request_ids: Sequence[str]) -> None:
        """Stop requests and free their KV blocks; unknown or finished ids are ignored.

        Not a coroutine, so it can run in `finally` blocks of cancelled tasks.
        """
        with self._lock:
            aborted = [rid for rid in request_ids if rid in self._tracked]
        sequences = self._forget(request_ids)
        if sequences and self._dead is None:
            try:
                self._client.send(["abort", sequences])
            except EngineDeadError:
                pass
        for rid in aborted:
            for observer in self.observers:
                observer.on_aborted()
            if self.log_requests:
                logger.info("Aborted request %s", rid)

    def _forget(self, request_ids: Sequence[str]) -> list[str]:
        with self._lock:
            sequences = []
            for rid in request_ids:
                sequences += self._outputs.abort(rid)
                self._tracked.pop(rid, None)
            return sequences

    async def call_utility(self, name: str, *args: Any) -> Any:
        """Run one of the engine process's UTILITIES between two steps; returns its result."""
        if self._dead is not None or self._stopping:
            raise EngineDeadError("the inference engine has stopped")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            call_id = next(self._call_ids)
            self._calls[call_id] = future
        self._client.send(["utility", call_id, name, list(args)])
        return await asyncio.wrap_future(future)

    async def check_integrity(self) -> None:
        """The KV block pool's self-check, in the engine process (raises on a leak)."""
        await self.call_utility("check_integrity")

    def stats(self) -> EngineStats:
        """The engine's stats as of the end of its last step or command."""
        return self._stats

    def health(self) -> str | None:
        """None while the engine is alive and making progress, else why not."""
        if self._dead is not None or self._client.exitcode() is not None:
            return "the inference engine has stopped"
        if not self._thread.is_alive():
            return "the inference engine is not running"
        with self._lock:
            waiting = bool(self._tracked)
            since = self._last_progress
        if waiting and time.monotonic() - since > self.stall_timeout_s:
            return (f"the inference engine has made no progress for over "
                    f"{self.stall_timeout_s:g} s while requests are unfinished")
        return None

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine process (in-flight requests end with EngineDeadError)."""
        self._stopping = True
        self._client.close(timeout_s)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._fail_everything(EngineDeadError("the inference engine was shut down"))

    # ---- output thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                message = self._client.recv(_RECV_POLL_S)
                if message is None:
                    if self._client.exitcode() is not None and not self._stopping:
                        raise EngineDeadError(self._client.describe_exit())
                    continue
                kind = message[0]
                if kind == "outputs":
                    self._on_outputs(decode_outputs(message[1]))
                elif kind == "reply":
                    self._on_reply(*message[1:])
                elif kind == "dead":
                    raise EngineDeadError(f"the engine failed: {message[1]}")
                else:
                    raise RuntimeError(f"unexpected message {kind!r} from the engine")
        except BaseException as exc:
            if not self._stopping:
                logger.error("the engine is gone: %s", exc)
                self._fail_everything(EngineDeadError("the inference engine has stopped"), exc)

    def _on_reply(self, call_id: int, error_kind: str | None, value: Any) -> None:
        with self._lock:
            future = self._calls.pop(call_id, None)
        if future is None or not future.set_running_or_notify_cancel():
            return
        if error_kind is None:
            future.set_result(value)
        else:
            error = {"value": ValueError, "queue_full": QueueFullError}.get(error_kind,
                                                                            RuntimeError)
            future.set_exception(error(value))

    def _on_outputs(self, batch: EngineCoreOutputs) -> None:
        now = time.monotonic()
        with self._lock:
            processed = self._outputs.process(batch)
            # Before delivering: whoever sees an output sees stats at least that new.
            self._stats = batch.stats
            if batch.outputs or batch.num_scheduled_tokens:
                self._last_progress = now
            timings = [(self._tracked[rid], n) for rid, n in processed.new_tokens.items()
                       if rid in self._tracked]
            delivery = []
            for output in processed.outputs:
                tracked = self._tracked.get(output.request_id)
                if tracked is None:
                    continue
                if output.finished:
                    del self._tracked[output.request_id]
                delivery.append((tracked.stream, output))
        if processed.stopped:  # ended by a stop string here: the engine frees them
            try:
                self._client.send(["abort", processed.stopped])
            except EngineDeadError:
                pass
        by_loop: dict[asyncio.AbstractEventLoop, dict[RequestStream, list]] = {}
        for stream, output in delivery:
            by_loop.setdefault(stream.loop, {}).setdefault(stream, []).append(output)
        for loop, per_stream in by_loop.items():
            _call_soon(loop, _put_per_stream, per_stream)
        if batch.num_scheduled_tokens:
            for observer in self.observers:
                observer.on_step(batch.num_scheduled_tokens)
        if self.observers:
            self._observe(timings, processed.finished, now)
        if self.log_requests:
            for request in processed.finished:
                logger.info("Finished request %s: %s", request.request_id,
                            ", ".join(map(str, request.finish_reasons)))

    def _observe(self, timings: list[tuple[_Tracked, int]], finished: list[FinishedRequest],
                 now: float) -> None:
        """Token latencies as this process sees them (outputs received), and finished
        requests, for the metrics."""
        for tracked, new_tokens in timings:
            for observer in self.observers:
                if tracked.last_token_time is None:
                    observer.on_first_token(now - tracked.arrival)
                else:
                    observer.on_inter_token((now - tracked.last_token_time) / new_tokens)
            tracked.last_token_time = now
        for request in finished:
            e2e = (request.metrics.finished_time or time.time()) - request.metrics.arrival_time
            for observer in self.observers:
                observer.on_finished(request, max(0.0, e2e))

    def _fail_everything(self, error: EngineDeadError, cause: BaseException | None = None) -> None:
        with self._lock:
            first_death = cause is not None and self._dead is None
            if cause is not None and self._dead is None:
                self._dead = cause
            calls, self._calls = self._calls, {}
            tracked, self._tracked = self._tracked, {}
            for rid in tracked:
                self._outputs.abort(rid)
        for future in calls.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        by_loop: dict[asyncio.AbstractEventLoop, dict[RequestStream, list]] = {}
        for t in tracked.values():
            by_loop.setdefault(t.stream.loop, {})[t.stream] = [error]
        for loop, per_stream in by_loop.items():
            _call_soon(loop, _put_per_stream, per_stream)
        if first_death:
            for callback in self.on_death:
                try:
                    callback(cause)
                except Exception:
                    logger.exception("on_death callback failed")


def _put_per_stream(per_stream: dict[RequestStream, list]) -> None:
    for stream, items in per_stream.items():
        stream._put_all(items)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is left to read these outputs
        pass
