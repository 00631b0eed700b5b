"""Run `cpserve serve` start-up in this process, up to the point where it would build an engine.

Every start-up refusal (argparse, server flags, chat template, engine config) happens before
the engine exists, so a command line's fate is known in milliseconds and nothing can hang:
instead of building the engine (or joining node 0, for a headless node) the run stops and
reports the config it would have used.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import cpserve.engine.worker
from cpserve.config import EngineConfig, LaunchConfig
from cpserve.engine.async_engine import AsyncEngine
from cpserve.entrypoints.cli import main


class _WouldStart(Exception):
    def __init__(self, role: str, config: EngineConfig | None = None,
                 launch: LaunchConfig | None = None) -> None:
        self.role, self.config, self.launch = role, config, launch


@dataclass
class Startup:
    code: int | None  # exit code if it stopped at start-up, None if it would start
    stderr: str
    role: str | None = None  # "server" or "headless", when it would start
    config: EngineConfig | None = None  # the server's engine config
    launch: LaunchConfig | None = None  # the headless node's launch


def startup(argv: list[str], monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture) -> Startup:
    def build_engine(args, **kwargs):
        raise _WouldStart("server", config=args.create_engine_config())

    def join_node_0(parallel, launch, device, timeout_s=None):
        raise _WouldStart("headless", launch=launch)

    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(AsyncEngine, "from_engine_args", staticmethod(build_engine))
        patch.setattr(cpserve.engine.worker, "run_headless_node", join_node_0)
        try:
            code = main(["serve", *argv])
        except SystemExit as exc:  # argparse
            code = exc.code
        except _WouldStart as started:
            return Startup(None, capsys.readouterr().err, started.role, started.config,
                           started.launch)
    return Startup(code, capsys.readouterr().err)
