"""An asyncio front for the synchronous `LLMEngine`.

The engine is not thread-safe, so exactly one thread touches it: the engine thread. Coroutines
talk to it through a command list guarded by a condition variable, and it talks back through
each caller's event loop:

    event loop (HTTP handlers)                      engine thread (owns LLMEngine)
    add_requests() --+                              +-> drain commands: add / abort / call
    abort()        --+--> _commands --notify-->     |   step() -> list[RequestOutput]
    call()         --+                              |   group outputs by event loop
    RequestStream.get() <-- loop.call_soon_threadsafe --+   sleep on the condition when idle

Outputs are cumulative (each one carries the full text so far), so a consumer that falls
behind keeps only the latest output of each request.

If `step()` raises, the engine is dead: every waiting consumer gets `EngineDeadError`, later
calls fail at once, `health()` reports it and the `on_death` callbacks run (the server uses one
to exit the process).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from cpserve.outputs import RequestOutput
from cpserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from cpserve.engine.args import EngineArgs
    from cpserve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

Prompt = str | list[int]
# How long the engine thread waits before trying again after a step that could run nothing.
_IDLE_RETRY_S = 0.01


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (it raised, or it was shut down)."""


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


class EngineObserver(Protocol):
    """Per-step and per-request events, reported from the engine thread (keep these cheap)."""

    def on_step(self, num_tokens: int) -> None: ...

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_inter_token(self, itl_s: float) -> None: ...

    def on_finished(self, output: RequestOutput, e2e_s: float) -> None: ...

    def on_aborted(self) -> None: ...


class RequestStream:
    """Outputs of one or more requests, delivered on the event loop that created the stream.

    An HTTP request with several prompts adds them all to one stream, so one consumer waits on
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

    async def get(self) -> dict[str, RequestOutput]:
        """Wait for news; returns the latest output of each request that progressed.

        Raises `EngineDeadError` if the engine stopped while requests were in flight.
        """
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        latest: dict[str, RequestOutput] = {}
        for item in items:
            if isinstance(item, BaseException):
                self._unfinished.clear()
                raise item
            if item.finished:
                self._unfinished.discard(item.request_id)
            latest[item.request_id] = item
        return latest


@dataclass
class _Add:
    stream: RequestStream
    requests: list[tuple[str, Prompt, SamplingParams, float]]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Tracked:
    """What the engine thread remembers about a request in flight."""

    stream: RequestStream
    arrival: float  # time.monotonic()
    last_token_time: float | None = None
    num_tokens: int = 0


class AsyncEngine:
    """Runs `LLMEngine.step()` in a background thread and serves coroutines.

    `max_waiting_requests` bounds the engine's waiting queue: an add that would go past it
    fails with `QueueFullError`. `stall_timeout_s` is how long the engine may go without
    progress (a step computing tokens or finishing requests) while it has unfinished work
    before `health()` calls it stuck: one step running that long, or steps that do nothing.
    """

    def __init__(self, engine: LLMEngine, *, max_waiting_requests: int | None = None,
                 stall_timeout_s: float = 300.0, log_requests: bool = False) -> None:
        self._engine = engine
        # Read-only after start-up, safe to share with the event loop.
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.max_waiting_requests = (max_waiting_requests if max_waiting_requests is not None
                                     else engine.config.scheduler.max_waiting_requests)
        self.stall_timeout_s = stall_timeout_s
        self.log_requests = log_requests  # --enable-log-requests: a line per request
        self.observers: list[EngineObserver] = []
        self.on_death: list[Callable[[BaseException], None]] = []

        self._cv = threading.Condition()
        self._commands: list[_Add | _Abort | _Call] = []
        self._stopping = False
        self._dead: BaseException | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._stats = engine.stats()
        self._step_started: float | None = None
        # Since when unfinished work has waited for progress; None while idle.
        self._waiting_for_progress_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="cpserve-engine", daemon=True)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs: Any) -> AsyncEngine:
        from cpserve.engine.llm_engine import LLMEngine

        return cls(LLMEngine.from_engine_args(args), **kwargs)

    # ---- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    async def add_requests(self, stream: RequestStream,
                           requests: Sequence[tuple[str, Prompt, SamplingParams]]) -> None:
        """Add requests whose outputs go to `stream`, all or none.

        Raises ValueError (bad input, message for the user), QueueFullError or EngineDeadError.
        """
        now = time.time()
        command = _Add(stream, [(rid, prompt, params, now) for rid, prompt, params in requests])
        ids = [rid for rid, _, _ in requests]
        self._submit(command)
        # Safe after submitting: outputs reach the stream through this loop, which is ours.
        stream.request_ids.extend(ids)
        stream._unfinished.update(ids)
        try:
            await asyncio.wrap_future(command.future)
        except asyncio.CancelledError:
            self.abort(ids)
            raise
        except BaseException:
            stream._unfinished.difference_update(ids)
            raise

    async def generate(self, request_id: str, prompt: Prompt,
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; closing or cancelling the iterator aborts the request.

        Use `contextlib.aclosing` when breaking out early, so the abort happens at once.
        """
        stream = RequestStream()
        await self.add_requests(stream, [(request_id, prompt, params)])
        try:
            while not stream.finished:
                for output in (await stream.get()).values():
                    yield output
        finally:
            if not stream.finished:
                self.abort([request_id])

    def abort(self, request_ids: Sequence[str]) -> None:
        """Stop requests and free their KV blocks; unknown or finished ids are ignored.

        Not a coroutine, so it can run in `finally` blocks of cancelled tasks.
        """
        if request_ids:
            self._submit(_Abort(list(request_ids)), raise_if_dead=False)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between two steps and return its result."""
        command = _Call(fn)
        self._submit(command)
        return await asyncio.wrap_future(command.future)

    def stats(self) -> Any:
        """The engine's `EngineStats` as of the end of the last step or command."""
        return self._stats

    def health(self) -> str | None:
        """None while the engine loop is alive and making progress, else why not."""
        if self._dead is not None:
            return "the inference engine has stopped"
        if not self._thread.is_alive():
            return "the inference engine is not running"
        now = time.monotonic()
        started = self._step_started
        if started is not None and now - started > self.stall_timeout_s:
            return f"an engine step has been running for over {self.stall_timeout_s:g} s"
        since = self._waiting_for_progress_since
        if since is not None and now - since > self.stall_timeout_s:
            return (f"the inference engine has made no progress for over "
                    f"{self.stall_timeout_s:g} s while requests are unfinished")
        return None

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine thread (in-flight requests end with EngineDeadError)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        elif self._thread.ident is None:  # never started: the engine is still ours to close
            self._engine.shutdown()

    def _submit(self, command: _Add | _Abort | _Call, raise_if_dead: bool = True) -> None:
        with self._cv:
            if self._dead is not None or self._stopping:
                if raise_if_dead:
                    raise EngineDeadError("the inference engine has stopped")
                return
            self._commands.append(command)
            self._cv.notify()

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        try:
            has_work = False
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or has_work):
                        self._cv.wait()
                    commands, self._commands = self._commands, []
                    stopping = self._stopping
                for command in commands:
                    self._apply(command)
                if stopping:
                    break
                outputs = []
                if engine.has_unfinished_requests():
                    if self._waiting_for_progress_since is None:
                        self._waiting_for_progress_since = time.monotonic()
                    self._step_started = time.monotonic()
                    outputs = engine.step()  # an output for every request that progressed
                    self._step_started = None
                    for observer in self.observers:
                        observer.on_step(engine.last_step_num_tokens)
                has_work = engine.has_unfinished_requests()
                if outputs or not has_work:
                    self._waiting_for_progress_since = time.monotonic() if has_work else None
                else:
                    with self._cv:  # nothing could run: do not spin on the scheduler
                        self._cv.wait(_IDLE_RETRY_S)
                # Before delivering: whoever sees an output sees stats at least that new.
                self._stats = engine.stats()
                self._deliver(outputs)
            self._fail_everything(EngineDeadError("the inference engine was shut down"))
        except BaseException as exc:
            logger.exception("the engine loop died")
            self._fail_everything(EngineDeadError("the inference engine has stopped"), exc)
        finally:
            try:
                engine.shutdown()
            except Exception:
                logger.exception("engine shutdown failed")

    def _apply(self, command: _Add | _Abort | _Call) -> None:
        engine = self._engine
        if isinstance(command, _Abort):
            ids = [rid for rid in command.request_ids if rid in self._tracked]
            if ids:
                engine.abort_request(ids)
                for rid in ids:
                    del self._tracked[rid]
                    for observer in self.observers:
                        observer.on_aborted()
                    if self.log_requests:
                        logger.info("Aborted request %s", rid)
            return
        if not command.future.set_running_or_notify_cancel():
            return
        if isinstance(command, _Call):
            try:
                command.future.set_result(command.fn(engine))
            except Exception as exc:
                command.future.set_exception(exc)
            return
        # Counted in sequences, as the scheduler queues them (n per request). A call bigger
        # than the whole queue could never be admitted: that is the caller's error.
        num_waiting = engine.stats().num_waiting
        incoming = sum(params.n for _, _, params, _ in command.requests)
        if incoming > self.max_waiting_requests:
            command.future.set_exception(ValueError(
                f"the request asks for {incoming} sequences, more than the server queues at "
                f"once (--max-waiting-requests {self.max_waiting_requests})"))
            return
        if num_waiting + incoming > self.max_waiting_requests:
            command.future.set_exception(QueueFullError(
                f"the server is busy: {num_waiting} requests are waiting, the limit is "
                f"{self.max_waiting_requests}; retry later"))
            return
        added: list[str] = []
        try:
            for rid, prompt, params, arrival in command.requests:
                if rid in self._tracked:
                    raise ValueError(f"request id {rid!r} is already in use")
                engine.add_request(rid, prompt, params, arrival_time=arrival)
                added.append(rid)
                self._tracked[rid] = _Tracked(command.stream, time.monotonic())
                if self.log_requests:
                    logger.info("Received request %s: prompt of %d %s, %s", rid, len(prompt),
                                "characters" if isinstance(prompt, str) else "token ids",
                                params)
        except Exception as exc:
            # All or none: a batch with one bad prompt adds nothing.
            if added:
                engine.abort_request(added)
                for rid in added:
                    del self._tracked[rid]
            command.future.set_exception(exc)
            return
        command.future.set_result(None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, dict[RequestStream, list]] = {}
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:  # aborted while the step ran
                continue
            self._observe(tracked, output, now)
            if output.finished:
                del self._tracked[output.request_id]
                if self.log_requests:
                    logger.info("Finished request %s: %s", output.request_id,
                                ", ".join(str(c.finish_reason) for c in output.outputs))
            stream = tracked.stream
            by_loop.setdefault(stream.loop, {}).setdefault(stream, []).append(output)
        for loop, per_stream in by_loop.items():
            _call_soon(loop, _put_per_stream, per_stream)

    def _observe(self, tracked: _Tracked, output: RequestOutput, now: float) -> None:
        num_tokens = max((len(c.token_ids) for c in output.outputs), default=0)
        if num_tokens > tracked.num_tokens:
            for observer in self.observers:
                if tracked.last_token_time is None:
                    observer.on_first_token(now - tracked.arrival)
                else:
                    itl = (now - tracked.last_token_time) / (num_tokens - tracked.num_tokens)
                    observer.on_inter_token(itl)
            tracked.last_token_time, tracked.num_tokens = now, num_tokens
        if output.finished:
            for observer in self.observers:
                observer.on_finished(output, now - tracked.arrival)

    def _fail_everything(self, error: EngineDeadError, cause: BaseException | None = None) -> None:
        with self._cv:
            if cause is not None:
                self._dead = cause
            self._stopping = True
            commands, self._commands = self._commands, []
        for command in commands:
            if not isinstance(command, _Abort) and command.future.set_running_or_notify_cancel():
                command.future.set_exception(error)
        by_loop: dict[asyncio.AbstractEventLoop, dict[RequestStream, list]] = {}
        for tracked in self._tracked.values():
            by_loop.setdefault(tracked.stream.loop, {})[tracked.stream] = [error]
        self._tracked.clear()
        for loop, per_stream in by_loop.items():
            _call_soon(loop, _put_per_stream, per_stream)
        if cause is not None:
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
