"""CUDA graphs of decode steps: captured once per batch-size bucket, replayed every step.

A graph replays the kernels of one forward pass on static buffers, so a decode step costs the
GPU's time and not the host's launch overhead (about 10x fewer host microseconds per layer).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from cpserve.attention.context import AttentionContext
from cpserve.attention.metadata import PlannedSeq, StepAttentionMetadata
from cpserve.config import EngineConfig
from cpserve.distributed.groups import ParallelGroups
from cpserve.distributed.plan import StepPlan
from cpserve.engine.compilation import decode_graph_buckets

if TYPE_CHECKING:
    from cpserve.engine.model_runner import ModelRunner


def graphs_enabled(config: EngineConfig, groups: ParallelGroups, device: torch.device) -> bool:
    """CUDA graphs for decode: on CUDA unless --enforce-eager. With several ranks the graphs
    would hold NCCL collectives, which hung in a naive probe here (DESIGN.md), so they are
    captured only when CPSERVE_CUDA_GRAPH_COLLECTIVES=1 asks for it."""
    if device.type != "cuda" or config.enforce_eager:
        return False
    return groups.world_size == 1 or os.environ.get("CPSERVE_CUDA_GRAPH_COLLECTIVES") == "1"


class DecodeGraphs:
    """CUDA graphs of decode steps, one per batch-size bucket, captured at first use.

    A decode step: every request computes one new token after cached ones, replicated on
    every PCP rank. The graph runs the model on static buffers, refilled before each replay:

        token_ids, positions, slots, kv_len         [bucket]
        block_tables                                [bucket, blocks of a max_model_len request]

    Rows past the batch are padding: their own sequence, slot -1 (no KV written), no cached
    tokens visible; their outputs are dropped. The kernels take every size they need from
    shapes (the split-K factor from the table width), so one capture serves all contexts.
    """

    @classmethod
    def for_runner(cls, runner: ModelRunner) -> DecodeGraphs | None:
        return cls(runner) if graphs_enabled(runner.config, runner.groups,
                                             runner.device) else None

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        config = runner.config
        # --compilation-config cudagraph_capture_sizes, else a default list to max_num_seqs.
        self.buckets = decode_graph_buckets(config.cudagraph_capture_sizes,
                                            config.scheduler.max_num_seqs)
        largest = self.buckets[-1]
        self.width = runner.layout.num_blocks_for(runner.config.model.max_model_len)
        n, dev = largest, runner.device

        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.long, device=dev)

        self.token_ids, self.positions, self.kv_len = zeros(n), zeros(n), zeros(n)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = zeros(n, self.width)
        self.rows = torch.arange(n, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def can_run(self, plan: StepPlan, seqs: list[PlannedSeq]) -> bool:
        return (len(seqs) <= self.buckets[-1]
                and all(s.num_new == 1 and s.start > 0 and not s.split for s in seqs)
                and all(len(self.runner.block_tables[r.request_id]) <= self.width
                        for r in plan.requests))

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor,
            meta: StepAttentionMetadata) -> torch.Tensor:
        n = token_ids.numel()
        bucket = next(b for b in self.buckets if b >= n)
        for buffer, values, pad in ((self.token_ids, token_ids, 0),
                                    (self.positions, positions, 0),
                                    (self.slots, meta.rep_slots, -1),
                                    (self.kv_len, meta.rep_kv_len, 0)):
            buffer[:n].copy_(values, non_blocking=True)
            buffer[n:bucket].fill_(pad)
        self.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables,
                                                                  non_blocking=True)
        if bucket not in self.graphs:
            self._capture(bucket)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n]

    def _metadata(self, bucket: int) -> StepAttentionMetadata:
        rows, none = self.rows[:bucket], self.rows[:0]
        return StepAttentionMetadata(
            block_tables=self.block_tables[:bucket], rep_index=rows,
            rep_slots=self.slots[:bucket], rep_seq=rows, rep_pos=self.positions[:bucket],
            rep_prefix_len=self.kv_len[:bucket], has_rep_prefix=True,
            rep_kv_len=self.kv_len[:bucket], rep_decode_only=True, split_index=none,
            split_pos=none, split_seq=none, pad=0, gathered_pos=none, gathered_seq=none,
            gathered_slots=none, gathered_prefix_len=none, has_prefix=False)

    def _capture(self, bucket: int) -> None:
        runner = self.runner
        ctx = AttentionContext(self._metadata(bucket), runner.kv_caches, runner.groups,
                               runner.backend, runner.config.parallel.kv_exchange)

        def forward() -> torch.Tensor:
            return runner.model(self.token_ids[:bucket], self.positions[:bucket], ctx)

        # Run once outside the capture: Triton compiles, cuDNN and NCCL set up. It writes the
        # same KV the replay will write, so it changes nothing.
        side = torch.cuda.Stream(runner.device)
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream(runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[bucket] = forward()
        self.pool = graph.pool()
        self.graphs[bucket] = graph
