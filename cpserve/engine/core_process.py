"""The engine core in a process of its own, behind the API server's front end.

    API process (AsyncEngine, core_client.py)          engine process (this module)
    PUSH ipc://DIR/input  ───── msgpack ─────────────> PULL  input thread: decode, queue
    PULL ipc://DIR/output <──── msgpack ────────────── PUSH  main thread: the step loop
    lifeline pipe ───────────────────────────────────> EOF (the API process is gone): exit

The main thread owns the `LLMEngine` (and, through it, rank 0 and the ranks it spawns): it
applies what the input thread queued between two steps, steps while there is work, and sends
each step's news with the stats of its end. HTTP, tokenizing and detokenizing happen in the
other process, so they never delay a step; decoding a large message happens in the input
thread, while a step runs.

Messages (lists; `messages.py` encodes their payloads):

    in:   ["add", call_id, [request, ...]]      all or none; the reply says which
          ["abort", [sequence id, ...]]
          ["utility", call_id, name, args]      one of UTILITIES, between two steps
          ["shutdown"]
    out:  ["ready", {"pid", "num_blocks"}]      once the engine is built
          ["startup_failed", kind, message]     kind "config" (a flag's fault) or "error"
          ["outputs", batch]                    after a step with news, or when stats change
          ["reply", call_id, error_kind, value] error_kind None, "value", "queue_full", "error"
          ["dead", message]                     a step raised; the process exits after it

    python -m cpserve.engine.core_process SPEC   (SPEC: JSON, made by core_client.py)
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback

import torch
import zmq

from cpserve.child_process import child_spec, watch_parent
from cpserve.config import ConfigError
from cpserve.distributed.config_codec import config_from_dict
from cpserve.engine.errors import QueueFullError
from cpserve.engine.llm_engine import LLMEngine
from cpserve.engine.messages import EngineCoreOutputs, decode_request, encode_outputs, pack, unpack

logger = logging.getLogger(__name__)

# How long the loop waits before trying again after a step that could run nothing.
IDLE_RETRY_S = 0.01
_KINDS = ("add", "abort", "utility", "shutdown")
# What a front end may run on the engine between two steps, by name.
UTILITIES = {
    "check_integrity": lambda engine: engine.check_integrity(),
}


class EngineCoreLoop:
    """The engine process's main loop over one engine and its two sockets."""

    def __init__(self, engine: LLMEngine, inbox: queue.Queue, output: zmq.Socket,
                 max_waiting: int) -> None:
        self.engine = engine
        self.inbox = inbox
        self.output = output
        self.max_waiting = max_waiting
        self._sent_stats = None

    def run(self) -> None:
        """Until told to shut down; a step that raises ends the process (see `main`)."""
        engine = self.engine
        retry_soon = False
        while True:
            busy = engine.has_unfinished_requests()
            for message in self._messages(wait=not busy or retry_soon,
                                          timeout=IDLE_RETRY_S if retry_soon else None):
                if message[0] == "shutdown":
                    return
                self._apply(message)
            batch = None
            if engine.has_unfinished_requests():
                batch = engine.step()
                retry_soon = not (batch.outputs or batch.num_scheduled_tokens)
            else:
                retry_soon = False
            self._send_news(batch)

    def _messages(self, wait: bool, timeout: float | None) -> list[list]:
        messages = []
        if wait:
            try:
                messages.append(self.inbox.get(timeout=timeout))
            except queue.Empty:
                return messages
        while True:
            try:
                messages.append(self.inbox.get_nowait())
            except queue.Empty:
                return messages

    def _apply(self, message: list) -> None:
        kind = message[0]
        if kind == "abort":
            self.engine.abort_request(message[1])
        elif kind == "add":
            _, call_id, requests = message
            self._reply(call_id, lambda: self.engine.add_requests(
                [decode_request(r) for r in requests], self.max_waiting))
        elif kind == "utility":
            _, call_id, name, args = message
            utility = UTILITIES.get(name)
            if utility is None:
                self.output.send(pack(["reply", call_id, "error", f"no utility {name!r}"]))
            else:
                self._reply(call_id, lambda: utility(self.engine, *args))

    def _reply(self, call_id: int, fn) -> None:
        try:
            reply = ["reply", call_id, None, fn()]
        except QueueFullError as exc:
            reply = ["reply", call_id, "queue_full", str(exc)]
        except ValueError as exc:
            reply = ["reply", call_id, "value", str(exc)]
        except Exception as exc:  # e.g. check_integrity found a leak: the caller's to report
            reply = ["reply", call_id, "error", f"{type(exc).__name__}: {exc}"]
        self.output.send(pack(reply))

    def _send_news(self, batch: EngineCoreOutputs | None) -> None:
        """A step's news, or the stats alone when they changed without one (an abort, an
        add), so the front end's gauges are never stale."""
        stats = batch.stats if batch is not None else self.engine.stats()
        if batch is None or not (batch.outputs or batch.num_scheduled_tokens):
            if stats == self._sent_stats:
                return
            batch = EngineCoreOutputs([], stats, time.time())
        self._sent_stats = stats
        self.output.send(pack(["outputs", encode_outputs(batch)]))


class _Receiver(threading.Thread):
    """The input thread: receives and decodes while the main thread steps."""

    def __init__(self, socket: zmq.Socket, inbox: queue.Queue) -> None:
        super().__init__(name="cpserve-engine-input", daemon=True)
        self.socket, self.inbox = socket, inbox
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            if self.socket.poll(100):
                data = self.socket.recv()
                try:
                    message = unpack(data)
                    if not (isinstance(message, list) and message and message[0] in _KINDS):
                        raise ValueError(f"not a message: {message!r:.80}")
                except Exception as exc:  # only our front end can reach the socket: a bug
                    logger.error("dropped a message the engine cannot read (%s)", exc)
                    continue
                self.inbox.put(message)
        self.socket.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


def main(argv: list[str]) -> int:
    spec = child_spec(argv)
    watch_parent(spec)
    # Ctrl-C in a terminal reaches the whole process group: the front end stops this process
    # (a "shutdown" message), after it has stopped taking requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=spec.get("log_level", logging.INFO), format="%(asctime)s "
                        "%(levelname)s %(name)s (engine process): %(message)s")
    context = zmq.Context()
    output = context.socket(zmq.PUSH)
    output.setsockopt(zmq.LINGER, 5000)  # the last messages still reach the front end
    output.connect(spec["output"])
    inbox: queue.Queue = queue.Queue()
    source = context.socket(zmq.PULL)
    source.connect(spec["input"])
    receiver = _Receiver(source, inbox)
    receiver.start()

    def leave(code: int) -> int:
        receiver.stop()
        output.close()
        context.term()  # waits (LINGER at most) until the last messages are out
        sys.stdout.flush()
        sys.stderr.flush()
        # Daemon threads (keep-alives) may sit in blocking calls: no interpreter teardown.
        os._exit(code)

    config = config_from_dict(spec["config"])
    if config.device == "cpu":
        # The API process needs a core of its own: intra-op threads on every core would be
        # descheduled by it at each barrier (on two cores, the fuzz test took twice as long).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    try:
        engine = LLMEngine(config)
    except ConfigError as exc:
        output.send(pack(["startup_failed", "config", str(exc)]))
        return leave(2)
    except Exception as exc:
        traceback.print_exc()
        output.send(pack(["startup_failed", "error", f"{type(exc).__name__}: {exc}"]))
        return leave(1)
    output.send(pack(["ready", {"pid": os.getpid(), "num_blocks": engine.executor.num_blocks}]))
    code = 0
    try:
        EngineCoreLoop(engine, inbox, output, spec["max_waiting_requests"]).run()
    except Exception as exc:
        logger.exception("the engine loop died")
        output.send(pack(["dead", f"{type(exc).__name__}: {exc}"]))
        code = 1
    finally:
        try:
            engine.shutdown()
        except Exception:
            logger.exception("engine shutdown failed")
    return leave(code)


if __name__ == "__main__":
    main(sys.argv)
