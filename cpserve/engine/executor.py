"""Runs step plans on every rank: in this process alone, or across spawned or torchrun ranks.

    driver (rank 0)                         worker (rank r > 0)
    ---------------                         -------------------
    plan = engine's plan
    broadcast_plan(plan)   ── gloo ──>      plan = broadcast_plan(None)
    logits = runner.execute(plan)  <──NCCL/gloo collectives──>  runner.execute(plan)
    sample ...                              loop until plan.shutdown

Locally the driver spawns the other ranks itself; under torchrun every rank is started by
torchrun, rank 0 becomes the driver and the others enter the worker loop and never return
from `Executor(...)` (they exit when the driver shuts down).
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpserve.config import EngineConfig
from cpserve.distributed.config_codec import config_from_dict, config_to_dict
from cpserve.distributed.groups import ParallelGroups, build_groups, single_process_groups
from cpserve.distributed.plan import StepPlan, broadcast_plan
from cpserve.engine.model_runner import ModelRunner

DIST_TIMEOUT_S = float(os.environ.get("CPSERVE_DIST_TIMEOUT", "60"))


class WorkerDiedError(RuntimeError):
    """A rank stopped: it exited, crashed, or stopped answering collectives."""


def _device_for(config: EngineConfig, local_rank: int) -> torch.device:
    if config.device == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _init_distributed(config: EngineConfig, rank: int, world: int, init_method: str,
                      device: torch.device) -> ParallelGroups:
    timeout = datetime.timedelta(seconds=DIST_TIMEOUT_S)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timeout, **kwargs)
    cpu_group = dist.new_group(list(range(world)), backend="gloo", timeout=timeout) \
        if backend != "gloo" else dist.group.WORLD
    return build_groups(config.parallel, rank, cpu_group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_loop(runner: ModelRunner, groups: ParallelGroups) -> None:
    while True:
        plan = broadcast_plan(None, groups.cpu_group)
        if plan.shutdown:
            return
        runner.execute(plan)


def _spawned_worker(rank: int, world: int, init_method: str, config_dict: dict) -> None:
    """Entry point of a locally spawned rank (a plain dict crosses the process boundary)."""
    config = config_from_dict(config_dict)
    try:
        device = _device_for(config, rank)
        groups = _init_distributed(config, rank, world, init_method, device)
        runner = ModelRunner(config, groups, device)
        _worker_loop(runner, groups)
        dist.destroy_process_group()
    except Exception as exc:  # the driver reports this rank by its exit code
        print(f"cpserve rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)


class Executor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.world_size = config.parallel.world_size
        self._processes: list = []
        self._dead: str | None = None
        if self.world_size == 1:
            self.groups = single_process_groups()
            self.device = _device_for(config, 0)
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            self._join_torchrun()
        else:
            self._spawn_local()
        print(f"cpserve: {self.groups.describe()}", file=sys.stderr, flush=True)
        self.runner = ModelRunner(config, self.groups, self.device)
        self.num_blocks = self.runner.num_blocks

    def _join_torchrun(self) -> None:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != self.world_size:
            raise RuntimeError(f"torchrun started {world} ranks, but tensor_parallel_size * "
                               f"prefill_context_parallel_size = {self.world_size}")
        self.device = _device_for(self.config, int(os.environ.get("LOCAL_RANK", rank)))
        self.groups = _init_distributed(self.config, rank, world, "env://", self.device)
        if rank != 0:
            runner = ModelRunner(self.config, self.groups, self.device)
            _worker_loop(runner, self.groups)
            dist.destroy_process_group()
            sys.exit(0)

    def _spawn_local(self) -> None:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        config_dict = config_to_dict(self.config)
        for rank in range(1, self.world_size):
            proc = ctx.Process(target=_spawned_worker, daemon=True, name=f"cpserve-rank{rank}",
                               args=(rank, self.world_size, init_method, config_dict))
            proc.start()
            self._processes.append(proc)
        threading.Thread(target=self._watch_workers, daemon=True).start()
        self.device = _device_for(self.config, 0)
        self.groups = _init_distributed(self.config, 0, self.world_size, init_method, self.device)

    def _watch_workers(self) -> None:
        """Notice a spawned rank that exits, so errors can name it."""
        while self._dead is None and self._processes:
            for rank, proc in enumerate(self._processes, start=1):
                if proc.exitcode is not None:
                    self._dead = f"rank {rank} exited with code {proc.exitcode}"
                    return
            time.sleep(0.2)

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        if self._dead is not None:
            raise WorkerDiedError(f"cpserve worker {self._dead}")
        if self.world_size == 1:
            return self.runner.execute(plan)
        try:
            broadcast_plan(plan, self.groups.cpu_group)
            return self.runner.execute(plan)
        except Exception as exc:
            time.sleep(0.5)  # let the watchdog see which rank went away
            who = self._dead or "a rank stopped answering collectives"
            self._kill_workers()
            self._dead = who
            raise WorkerDiedError(f"cpserve worker {who}: {type(exc).__name__}: {exc}") from exc

    def shutdown(self) -> None:
        if self.world_size > 1 and self._dead is None and dist.is_initialized():
            try:
                broadcast_plan(StepPlan(shutdown=True), self.groups.cpu_group)
            except Exception:
                pass
            for proc in self._processes:
                proc.join(timeout=10)
        self._kill_workers()
        if dist.is_initialized():
            dist.destroy_process_group()
        self._dead = self._dead or "shut down"

    def _kill_workers(self) -> None:
        for proc in self._processes:
            if proc.is_alive():
                proc.kill()
        for proc in self._processes:
            proc.join(timeout=5)
