"""Children started as fresh interpreters, which cannot outlive the process that started them.

    parent                                          child: python -m MODULE SPEC
    ChildProcess(MODULE, spec) ──Popen────────────> main(): watch_parent(spec) first
      keeps the write end of a pipe (the lifeline)  a thread blocks reading its read end
      exits, is killed, crashes: the kernel          EOF: the parent is gone, so the
      closes the write end ────────────────────────> child exits at once (os._exit)

A fresh interpreter, not multiprocessing: "spawn" re-imports the user's main module (a script
without a main guard would run again in the child) and "fork" is unsafe once threads or CUDA
run. SPEC is JSON of plain values: no pickle. The child gets the parent's import path, as
spawn passes it, so a source checkout or pytest's rootdir works there too.

The lifeline is what makes the tree tidy whatever kills its root: the API server's engine
process dies with the server, the engine's local ranks with the engine. A pipe's EOF is seen
at once and needs no polling; only the parent holds the write end (pipes are not inherited
by other children: PEP 446).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable

_LIFELINE_KEY = "lifeline_fd"


def child_env() -> dict[str, str]:
    """The environment of a child: ours, with our import path."""
    path = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


class ChildProcess:
    """`python -m module json(spec)`, tied to this process by a lifeline."""

    def __init__(self, module: str, spec: dict, **popen_kwargs) -> None:
        read_end, write_end = os.pipe()
        try:
            spec = {**spec, _LIFELINE_KEY: read_end}
            self.popen = subprocess.Popen([sys.executable, "-m", module, json.dumps(spec)],
                                          env=child_env(), stdin=subprocess.DEVNULL,
                                          pass_fds=(read_end,), **popen_kwargs)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        # Held until the child is gone; closing it (or our death) tells the child to exit.
        self._lifeline = os.fdopen(write_end, "wb", buffering=0)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return
        self._lifeline.close()


def child_spec(argv: list[str]) -> dict:
    """The spec a `ChildProcess` passed (in the child's `main`)."""
    return json.loads(argv[1])


def watch_parent(spec: dict, on_parent_death: Callable[[], None] | None = None) -> None:
    """In the child: exit as soon as the parent is gone (its lifeline closes).

    `on_parent_death` runs first, briefly (say, to stop this child's own children); the
    process then ends with code 1 whatever it was doing.
    """
    fd = spec[_LIFELINE_KEY]

    def wait() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        try:
            if on_parent_death is not None:
                on_parent_death()
        finally:
            os._exit(1)

    threading.Thread(target=wait, name="cpserve-lifeline", daemon=True).start()
