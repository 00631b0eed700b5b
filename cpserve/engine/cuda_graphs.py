"""CUDA graphs of decode steps: captured once per batch-size bucket, replayed every step.

A graph replays the kernels of one forward pass on static buffers, so a decode step costs the
GPU's time and not the host's launch overhead (about 10x fewer host microseconds per layer).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

from cpserve.attention.context import AttentionContext
from cpserve.attention.metadata import decode_metadata
from cpserve.config import EngineConfig
from cpserve.distributed.groups import ParallelGroups
from cpserve.engine.compilation import decode_graph_buckets

if TYPE_CHECKING:
    from cpserve.engine.model_runner import ModelRunner
    from cpserve.engine.step_inputs import StepInputs


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
    every PCP rank. A graph runs on one static buffer, refilled before each replay:

        vectors [3, largest bucket]:  token ids | positions | rows of the persistent tables

    and derives everything else inside the graph (`decode_metadata`): block tables are the
    runner's persistent ones (`RequestRows.table`, updated in place by each plan's diffs, so
    the graph always sees the current tables), slots and visible lengths come from the
    positions. Rows past the batch are padding: position -1 (no KV written, nothing visible),
    their outputs dropped. The kernels take every size they need from shapes (the split-K
    factor from the table width), so one capture serves all contexts.

    Every bucket is captured at start-up (`capture_all`, as vLLM does), over padding rows
    only: a bucket first met under load would otherwise cost its capture in a user's step.
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
        self.vectors = torch.zeros(3, largest, dtype=torch.long, device=runner.device)
        # Padding columns: token 0, position -1, row 0.
        self.padding = torch.zeros(3, largest, dtype=torch.long, device=runner.device)
        self.padding[1] = -1
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays: dict[int, int] = dict.fromkeys(self.buckets, 0)  # steps per bucket
        self.pool = None

    @torch.inference_mode()
    def capture_all(self) -> float:
        """Capture every bucket, largest first (the pool then holds the largest activations
        once); returns the seconds it took."""
        start = time.perf_counter()
        for bucket in reversed(self.buckets):
            self.vectors[:, :bucket].copy_(self.padding[:, :bucket])
            self._capture(bucket)
        torch.cuda.synchronize(self.runner.device)
        return time.perf_counter() - start

    def can_run(self, inputs: StepInputs) -> bool:
        return (inputs.decode_vectors is not None and len(inputs.seqs) <= self.buckets[-1]
                and all(s.start > 0 for s in inputs.seqs))

    def run(self, vectors: torch.Tensor) -> torch.Tensor:
        """Hidden states of a decode step given as [3, n] vectors (see the class)."""
        n = vectors.shape[1]
        bucket = next(b for b in self.buckets if b >= n)
        self.vectors[:, :n].copy_(vectors)
        self.vectors[:, n:bucket].copy_(self.padding[:, :bucket - n])
        if bucket not in self.graphs:
            self._capture(bucket)
        self.graphs[bucket].replay()
        self.replays[bucket] += 1
        return self.outputs[bucket][:n]

    def forward(self, bucket: int) -> torch.Tensor:
        """The forward pass a graph of `bucket` rows captures, over the static vectors."""
        runner = self.runner
        token_ids, positions, rows = self.vectors[:, :bucket]
        meta = decode_metadata(runner.rows.table, positions, runner.layout,
                               runner.groups.cp_rank, seq=rows)
        ctx = AttentionContext(meta, runner.kv_caches, runner.groups, runner.backend,
                               runner.config.parallel.kv_exchange, kv_scales=runner.kv_scales)
        return runner.model(token_ids, meta.rep_pos, ctx)

    def _capture(self, bucket: int) -> None:
        runner = self.runner
        # Run once outside the capture: Triton compiles, cuDNN and NCCL set up. It writes the
        # same KV the replay will write, so it changes nothing.
        side = torch.cuda.Stream(runner.device)
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(side):
            self.forward(bucket)
        torch.cuda.current_stream(runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[bucket] = self.forward(bucket)
        self.pool = graph.pool()
        self.graphs[bucket] = graph
