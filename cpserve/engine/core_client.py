"""The front end's handle on the engine process: start it, talk to it, notice its death.

    EngineCoreClient(config)
      binds PUSH ipc://DIR/input and PULL ipc://DIR/output (DIR private: mode 0700)
      starts `python -m cpserve.engine.core_process SPEC` (a ChildProcess: it dies with us)
      waits for "ready" (or "startup_failed": ConfigError for a flag's fault)
    send(message)        any thread; never blocks (an engine gone is EngineDeadError)
    recv(timeout)        one thread (the front end's output thread)
    close()              "shutdown", wait for the process, kill it if it does not go

The sockets are Unix-domain sockets in a directory only this user can enter: ZeroMQ has no
authentication, so nothing on the network (or another local user) can reach the engine.
Messages are msgpack (`messages.pack`), never pickle. Under torchrun the engine process
inherits this process's environment, so rank 0 (RANK=0) is the engine process.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time

import zmq

from cpserve.child_process import ChildProcess
from cpserve.config import ConfigError, EngineConfig
from cpserve.distributed.config_codec import config_to_dict
from cpserve.engine.errors import EngineDeadError
from cpserve.engine.messages import pack, unpack

logger = logging.getLogger(__name__)

CORE_MODULE = "cpserve.engine.core_process"


class EngineCoreClient:
    def __init__(self, config: EngineConfig, *, max_waiting_requests: int,
                 startup_timeout_s: float | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="cpserve-")  # 0700
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)  # queue while a step runs; never drop
        self._input.setsockopt(zmq.LINGER, 0)
        self._output = self._context.socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        self._send_lock = threading.Lock()
        self.process: ChildProcess | None = None
        try:
            input_address = f"ipc://{self._dir}/input"
            output_address = f"ipc://{self._dir}/output"
            self._input.bind(input_address)
            self._output.bind(output_address)
            self.process = ChildProcess(CORE_MODULE, dict(
                config=config_to_dict(config), input=input_address, output=output_address,
                max_waiting_requests=max_waiting_requests,
                log_level=logging.getLogger().getEffectiveLevel()))
            self.ready = self._wait_until_ready(startup_timeout_s)
        except BaseException:
            self.close(timeout_s=5)
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if code is not None and code < 0:
            return (f"the engine process (pid {self.pid}) was killed by "
                    f"{signal.Signals(-code).name}")
        return f"the engine process (pid {self.pid}) exited with code {code}"

    def _wait_until_ready(self, timeout_s: float | None) -> dict:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            message = self.recv(0.2)
            if message is not None:
                if message[0] == "ready":
                    return message[1]
                if message[0] == "startup_failed":
                    _, kind, text = message
                    raise (ConfigError if kind == "config" else RuntimeError)(text)
                raise RuntimeError(f"unexpected {message[0]!r} from the engine at start-up")
            if self.process.exitcode is not None:
                raise RuntimeError(f"{self.describe_exit()} while starting (its error is "
                                   "in the log above)")
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"the engine process did not start within {timeout_s:g} s")

    def send(self, message: list) -> None:
        data = pack(message)
        with self._send_lock:
            try:
                self._input.send(data, zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):  # no engine at the other end any more
                raise EngineDeadError("the inference engine has stopped") from None

    def recv(self, timeout_s: float) -> list | None:
        if self._output.poll(int(timeout_s * 1000)):
            return unpack(self._output.recv())
        return None

    def close(self, timeout_s: float = 30.0) -> None:
        """Ask the engine to stop, wait for it, kill it if it will not; idempotent."""
        process, self.process = self.process, None
        if process is not None:
            if process.is_alive():
                try:
                    self.send(["shutdown"])
                except EngineDeadError:
                    pass
                process.join(timeout_s)
            if process.is_alive():
                logger.warning("the engine process did not stop within %g s: killed",
                               timeout_s)
                process.kill()
            process.join(5)
            self.process = process  # keep its exit code readable
        if not self._context.closed:
            self._input.close()
            self._output.close()
            self._context.term()
        if os.path.isdir(self._dir):
            shutil.rmtree(self._dir, ignore_errors=True)
