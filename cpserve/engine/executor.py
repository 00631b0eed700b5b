"""Runs step plans on every rank of a worker pool, with the driver's own model runner."""

from __future__ import annotations

import torch

from cpserve.config import ConfigError, EngineConfig
from cpserve.distributed.config_codec import config_to_dict
from cpserve.distributed.plan import StepPlan
from cpserve.distributed.worker_pool import WorkerPool, gather_to_driver
from cpserve.engine.model_runner import LogitsConsumer, ModelRunner
from cpserve.engine.step_inputs import PendingTokens
from cpserve.engine.worker import start_worker_pool


class Executor:
    def __init__(self, config: EngineConfig, pool: WorkerPool | None = None) -> None:
        self.config = config
        self.owns_pool = pool is None
        self.pool = pool if pool is not None else start_worker_pool(
            config.parallel, config.device, launch=config.launch)
        p, q = self.pool.parallel, config.parallel
        if (p.tp, p.pcp, p.dcp) != (q.tp, q.pcp, q.dcp):
            raise ConfigError(f"the worker pool runs tp={p.tp} pcp={p.pcp} dcp={p.dcp}, the "
                              f"engine asks for tp={q.tp} pcp={q.pcp} dcp={q.dcp}")
        self.device = self.pool.device

        def build() -> ModelRunner:
            return ModelRunner(config, self.pool.groups, self.device)

        self.runner = self.pool.run(StepPlan(load=config_to_dict(config)), build)
        self.num_blocks = self.runner.num_blocks

    def execute(self, plan: StepPlan, consume_logits: LogitsConsumer | None = None,
                pending_tokens: PendingTokens | None = None) -> torch.Tensor | None:
        """Queue a step on every rank; the driver's logits are returned, or handed to
        `consume_logits` slice by slice (see `ModelRunner.execute`). `pending_tokens`: where
        the values of the plan's pending tokens are, on the driver's device."""
        return self.pool.run(plan, lambda: self.runner.execute(
            plan, consume_logits=consume_logits, pending_tokens=pending_tokens))

    def draft(self, plan: StepPlan) -> list[list[int]]:
        """Run the MTP drafter on every rank after a step (`plan.draft`); the driver's
        drafts, one list per request of that step."""
        return self.pool.run(plan, lambda: self.runner.propose_drafts(plan.draft))

    def written_slots_per_rank(self) -> list[torch.Tensor]:
        """Cache slots holding data on each rank (layer 0), for tests of the KV placement."""
        return self.pool.run(StepPlan(probe_kv=True), lambda: gather_to_driver(
            self.runner.written_slots(), self.pool.groups) if self.pool.world_size > 1
            else [self.runner.written_slots()])

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.runner = None
        if self.owns_pool:
            self.pool.shutdown()
