"""What every non-driver rank runs: follow the driver's step plans with its own model runner.

The worker pool (`cpserve.distributed.worker_pool`) starts the ranks and carries the plans;
this loop, on the engine side, gives them meaning. `start_worker_pool` binds the two.
"""

from __future__ import annotations

import os

import torch

from cpserve.config import EngineConfig, LaunchConfig, ParallelConfig
from cpserve.distributed.config_codec import config_from_dict
from cpserve.distributed.groups import ParallelGroups
from cpserve.distributed.plan import broadcast_plan
from cpserve.distributed.worker_pool import WorkerPool, gather_to_driver, run_node_ranks
from cpserve.engine.model_runner import ModelRunner


def serve_plans(groups: ParallelGroups, device: torch.device) -> None:
    """A worker's life: follow the driver's plans until told to shut down."""
    runner = None
    while True:
        plan = broadcast_plan(None, groups.cpu_group)
        if plan.shutdown:
            if runner is not None:
                runner.close()
            return
        if plan.load is not None:
            if runner is not None:
                runner.close()
            runner = None  # free the old model and cache before building the new ones
            runner = ModelRunner(config_from_dict(plan.load), groups, device)
        elif plan.probe_kv:
            gather_to_driver(runner.written_slots(), groups)
        elif plan.requests or plan.freed_request_ids:  # an empty plan only keeps us alive
            runner.execute(plan)


def start_worker_pool(parallel: ParallelConfig, device: str, timeout_s: float | None = None,
                      launch: LaunchConfig | None = None) -> WorkerPool:
    """The ranks of `parallel` (spawned here, on several nodes, or joined under torchrun),
    serving plans."""
    return WorkerPool(parallel, device, serve_plans, timeout_s, launch)


def run_headless_node(parallel: ParallelConfig, launch: LaunchConfig, device: str,
                      timeout_s: float | None = None) -> int:
    """This node's ranks of a multi-node launch, serving the driver's plans; the exit code."""
    return run_node_ranks(parallel, launch, device, serve_plans, timeout_s)


def is_torchrun_worker() -> bool:
    """This process is a rank other than 0 of a torchrun launch."""
    return "WORLD_SIZE" in os.environ and int(os.environ.get("RANK", "0")) > 0


def follow_torchrun_driver(config: EngineConfig) -> int:
    """A torchrun rank other than 0: serve rank 0's plans until it shuts down; the exit code.

    (Rank 0 is the engine of whichever process drives: `LLM`, or the server's engine
    process, which inherits torchrun's environment.)
    """
    start_worker_pool(config.parallel, config.device)  # joins the group, serves, exits
    return 0
