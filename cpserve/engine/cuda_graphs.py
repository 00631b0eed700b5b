"""CUDA graphs of decode and verification steps: captured once per batch-size bucket (and
rows per request), replayed every step.

A graph replays the kernels of one forward pass on static buffers, so a decode step costs the
GPU's time and not the host's launch overhead (about 10x fewer host microseconds per layer).
With speculative decoding a verification step (each request's last token and up to K drafts,
laid out as 1 + K rows per request, metadata.py) has graphs of its own, by the same buckets.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from cpserve.attention.context import AttentionContext
from cpserve.attention.metadata import PlannedSeq, StepAttentionMetadata
from cpserve.config import EngineConfig
from cpserve.distributed.groups import ParallelGroups
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
    """CUDA graphs of paged-only steps, one per (batch-size bucket, rows per request),
    captured at first use.

    A decode step: every request computes one new token after cached ones, replicated on
    every PCP rank; a verification step: q = 1 + K rows per request (its tokens, then
    padding). The graph runs the model on static buffers, refilled before each replay:

        token_ids, positions, slots, kv_len         [bucket * q]
        block_tables                                [bucket, blocks of a max_model_len request]

    Rows past the batch are padding: their own sequence, slot -1 (no KV written), no cached
    tokens visible; their outputs are dropped. The kernels take every size they need from
    shapes (the split-K factor from the table width; a verification step's tiles from q), so
    one capture serves all contexts.
    """

    @classmethod
    def for_runner(cls, runner: ModelRunner) -> DecodeGraphs | None:
        return cls(runner) if graphs_enabled(runner.config, runner.groups,
                                             runner.device) else None

    def __init__(self, runner: ModelRunner, hidden_size: int = 0,
                 dtype: torch.dtype | None = None) -> None:
        """`hidden_size`: a forward pass that also reads a hidden state per row (an MTP
        module, spec_decode/mtp_proposer.py) gets a static buffer of it, `run(hidden=...)`."""
        self.runner = runner
        config = runner.config
        # --compilation-config cudagraph_capture_sizes, else a default list to max_num_seqs.
        self.buckets = decode_graph_buckets(config.cudagraph_capture_sizes,
                                            config.scheduler.max_num_seqs)
        self.max_rows_per_seq = runner.max_paged_queries  # 1 + K with speculation, else 1
        largest = self.buckets[-1]
        self.width = runner.layout.num_blocks_for(runner.config.model.max_model_len)
        n, dev = largest * self.max_rows_per_seq, runner.device

        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.long, device=dev)

        self.token_ids, self.positions, self.kv_len = zeros(n), zeros(n), zeros(n)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = zeros(largest, self.width)
        self.hidden = (torch.zeros(n, hidden_size, dtype=dtype, device=dev) if hidden_size
                       else None)
        self.rows = torch.arange(n, device=dev)
        # (bucket, rows per request, variant): variant picks among forward passes (MTP
        # modules); the model's own steps have one.
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, int], torch.Tensor] = {}
        self.pool = None

    def can_run(self, seqs: list[PlannedSeq], table_width: int) -> bool:
        return (len(seqs) <= self.buckets[-1] and table_width <= self.width
                and all(1 <= s.num_new <= self.max_rows_per_seq and s.start > 0
                        and not s.split for s in seqs))

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor,
            meta: StepAttentionMetadata, hidden: torch.Tensor | None = None,
            variant: int = 0) -> torch.Tensor:
        q = meta.rep_queries_per_seq
        rows = token_ids.numel()
        n = rows // q
        bucket = next(b for b in self.buckets if b >= n)
        for buffer, values, pad in ((self.token_ids, token_ids, 0),
                                    (self.positions, positions, 0),
                                    (self.slots, meta.rep_slots, -1),
                                    (self.kv_len, meta.rep_kv_len, 0)):
            buffer[:rows].copy_(values, non_blocking=True)
            buffer[rows:bucket * q].fill_(pad)
        if hidden is not None:
            self.hidden[:rows].copy_(hidden)
        self.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables,
                                                                  non_blocking=True)
        key = (bucket, q, variant)
        if key not in self.graphs:
            self._capture(bucket, q, variant)
        self.graphs[key].replay()
        return self.outputs[key][:rows]

    def _forward(self, rows: int, ctx: AttentionContext, variant: int) -> torch.Tensor:
        """The captured forward pass over the first `rows` rows of the static buffers."""
        return self.runner.model(self.token_ids[:rows], self.positions[:rows], ctx)

    def _metadata(self, bucket: int, q: int) -> StepAttentionMetadata:
        rows, none = self.rows[:bucket * q], self.rows[:0]
        return StepAttentionMetadata(
            block_tables=self.block_tables[:bucket], rep_index=rows,
            rep_slots=self.slots[:bucket * q], rep_seq=rows // q,
            rep_pos=self.positions[:bucket * q], rep_prefix_len=self.kv_len[:bucket * q],
            has_rep_prefix=True, rep_kv_len=self.kv_len[:bucket * q], rep_decode_only=True,
            split_index=none, split_pos=none, split_seq=none, pad=0, gathered_pos=none,
            gathered_seq=none, gathered_slots=none, gathered_prefix_len=none, has_prefix=False,
            rep_queries_per_seq=q)

    def _capture(self, bucket: int, q: int, variant: int = 0) -> None:
        runner = self.runner
        ctx = AttentionContext(self._metadata(bucket, q), runner.kv_caches, runner.groups,
                               runner.backend, runner.config.parallel.kv_exchange,
                               kv_scales=runner.kv_scales)
        rows = bucket * q

        def forward() -> torch.Tensor:
            return self._forward(rows, ctx, variant)

        # Run once outside the capture: Triton compiles, cuDNN and NCCL set up. It writes the
        # same KV the replay will write, so it changes nothing.
        side = torch.cuda.Stream(runner.device)
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream(runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[(bucket, q, variant)] = forward()
        self.pool = graph.pool()
        self.graphs[(bucket, q, variant)] = graph
