"""CUDA graphs of decode and verification steps: captured once per batch-size bucket (and
rows per request), replayed every step.

A graph replays the kernels of one forward pass on static buffers, so a decode step costs the
GPU's time and not the host's launch overhead (about 10x fewer host microseconds per layer).
With speculative decoding a verification step (each request's last token and up to K drafts,
laid out as q = 1 + K rows per request, attention/metadata.py) has graphs of its own, by the
same buckets.
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
    """CUDA graphs of paged-only steps, one per (batch-size bucket, rows per request q,
    variant).

    A decode step: every request computes one new token after cached ones, replicated on
    every PCP rank (q = 1); a verification step: q = 1 + K rows per request, its tokens then
    padding. A graph runs on one static buffer, refilled before each replay:

        vectors [3, largest bucket * q]:  token ids | positions | rows of the persistent tables

    and derives everything else inside the graph (`decode_metadata`): block tables are the
    runner's persistent ones (`RequestRows.table`, updated in place by each plan's diffs, so
    the graph always sees the current tables), slots and visible lengths come from the
    positions. Rows past the batch are padding: position -1 (no KV written, nothing visible),
    their outputs dropped. The kernels take every size they need from shapes (the split-K
    factor from the table width), so one capture serves all contexts.

    Every decode bucket is captured at start-up (`capture_all`, as vLLM does), over padding
    rows only: a bucket first met under load would otherwise cost its capture in a user's
    step; with speculative decoding the verification buckets too.

    `hidden_size`: a forward pass that also reads a hidden state per row (an MTP module,
    spec_decode/mtp_proposer.py) gets a static buffer of it, `run(hidden=...)`; its variants
    are the modules. The model's own steps have one variant, 0.
    """

    @classmethod
    def for_runner(cls, runner: ModelRunner) -> DecodeGraphs | None:
        return cls(runner) if graphs_enabled(runner.config, runner.groups,
                                             runner.device) else None

    def __init__(self, runner: ModelRunner, hidden_size: int = 0,
                 dtype: torch.dtype | None = None) -> None:
        self.runner = runner
        config = runner.config
        # --compilation-config cudagraph_capture_sizes, else a default list to max_num_seqs.
        self.buckets = decode_graph_buckets(config.cudagraph_capture_sizes,
                                            config.scheduler.max_num_seqs)
        self.max_rows_per_seq = runner.max_paged_queries  # 1 + K with speculation, else 1
        n = self.buckets[-1] * self.max_rows_per_seq
        self.vectors = torch.zeros(3, n, dtype=torch.long, device=runner.device)
        # Padding columns: token 0, position -1, row 0.
        self.padding = torch.zeros(3, n, dtype=torch.long, device=runner.device)
        self.padding[1] = -1
        self.hidden = (torch.zeros(n, hidden_size, dtype=dtype, device=runner.device)
                       if hidden_size else None)
        # Keys (bucket, rows per request, variant).
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, int], torch.Tensor] = {}
        self.replays: dict[tuple[int, int, int], int] = {}  # steps per key
        self.pool = None

    @torch.inference_mode()
    def capture_all(self) -> float:
        """Capture every bucket of decode steps, and of verification steps with speculative
        decoding, largest first (the pool then holds the largest activations once); returns
        the seconds it took."""
        start = time.perf_counter()
        rows_per_seq = sorted({1, self.max_rows_per_seq}, reverse=True)
        for q in rows_per_seq:
            for bucket in reversed(self.buckets):
                self.vectors[:, :bucket * q].copy_(self.padding[:, :bucket * q])
                self._capture(bucket, q)
        torch.cuda.synchronize(self.runner.device)
        return time.perf_counter() - start

    def can_run(self, inputs: StepInputs) -> bool:
        return (inputs.decode_vectors is not None and len(inputs.seqs) <= self.buckets[-1]
                and all(s.start > 0 for s in inputs.seqs))

    def run(self, vectors: torch.Tensor, queries_per_seq: int = 1,
            hidden: torch.Tensor | None = None, variant: int = 0) -> torch.Tensor:
        """Hidden states of a paged-only step given as [3, n * q] vectors (see the class)."""
        q = queries_per_seq
        rows = vectors.shape[1]
        bucket = next(b for b in self.buckets if b >= rows // q)
        self.vectors[:, :rows].copy_(vectors)
        self.vectors[:, rows:bucket * q].copy_(self.padding[:, :bucket * q - rows])
        if hidden is not None:
            self.hidden[:rows].copy_(hidden)
        key = (bucket, q, variant)
        if key not in self.graphs:
            self._capture(bucket, q, variant)
        self.graphs[key].replay()
        self.replays[key] = self.replays.get(key, 0) + 1
        return self.outputs[key][:rows]

    def metadata(self, bucket: int, q: int = 1):
        """The captured step's metadata, over the static vectors."""
        runner = self.runner
        _, positions, rows = self.vectors[:, :bucket * q]
        return decode_metadata(runner.rows.table, positions, runner.layout,
                               runner.groups.cp_rank, seq=rows, queries_per_seq=q)

    def forward(self, bucket: int, q: int = 1, variant: int = 0) -> torch.Tensor:
        """The forward pass a graph of `bucket` requests of `q` rows captures, over the static
        vectors."""
        runner = self.runner
        meta = self.metadata(bucket, q)
        ctx = AttentionContext(meta, runner.kv_caches, runner.groups, runner.backend,
                               runner.config.parallel.kv_exchange, kv_scales=runner.kv_scales)
        return self._model(self.vectors[0, :bucket * q], meta, ctx, variant)

    def _model(self, token_ids: torch.Tensor, meta, ctx: AttentionContext,
               variant: int) -> torch.Tensor:
        return self.runner.model(token_ids, meta.rep_pos, ctx)

    def _capture(self, bucket: int, q: int = 1, variant: int = 0) -> None:
        runner = self.runner
        # Run once outside the capture: Triton compiles, cuDNN and NCCL set up. It writes the
        # same KV the replay will write, so it changes nothing.
        side = torch.cuda.Stream(runner.device)
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(side):
            self.forward(bucket, q, variant)
        torch.cuda.current_stream(runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        key = (bucket, q, variant)
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[key] = self.forward(bucket, q, variant)
        self.pool = graph.pool()
        self.graphs[key] = graph
