"""Runs one step of the model on one rank: plan in, logits out (on the driver).

Every rank runs this same code on the same plan; what differs is only the rank's groups
(which heads, which tokens, which KV shard it holds).

On CUDA the KV cache gets what `gpu_memory_utilization` leaves after a profiling forward pass
of the largest step, and decode steps replay CUDA graphs (see `DecodeGraphs`).
"""

from __future__ import annotations

import os
import sys

import torch

from cpserve.attention.backend import get_backend
from cpserve.attention.context import AttentionContext
from cpserve.attention.metadata import PlannedSeq, StepAttentionMetadata, build_step_tokens
from cpserve.config import EngineConfig
from cpserve.distributed.groups import ParallelGroups, all_reduce
from cpserve.distributed.plan import PlannedRequest, StepPlan
from cpserve.kv.layout import KVLayout
from cpserve.models.loader import build_model

CPU_DEFAULT_KV_GIB = 0.25
PROFILE_REQUEST_ID = "__cpserve_profile__"


class ModelRunner:
    def __init__(self, config: EngineConfig, groups: ParallelGroups, device: torch.device) -> None:
        self.config = config
        self.groups = groups
        self.device = device
        par, cache, model_cfg = config.parallel, config.cache, config.model
        self.layout = KVLayout(cache.block_size, par.num_kv_shards, par.interleave)
        self.model = _build_model(config, groups, device)
        self.backend = get_backend("auto", device)
        self.kv_spec = self.model.kv_cache_spec()
        self.block_tables: dict[str, list[int]] = {}
        self.kv_caches: list = []
        self.num_blocks = self._decide_num_blocks()
        self.kv_caches = [self.kv_spec.allocate(self.num_blocks, cache.block_size, device)
                          for _ in range(model_cfg.num_layers)]
        if _load_format(config) == "dummy":
            self._randomize_kv_caches()
        self.graphs = DecodeGraphs.for_runner(self)

    def close(self) -> None:
        """Release the decode graphs before the process groups go: graphs that captured NCCL
        collectives hold work on their communicators (a rank that kept them while its group
        was destroyed did not exit in the 2026-11-22 benchmark run)."""
        self.graphs = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _randomize_kv_caches(self) -> None:
        """Benchmarks with dummy weights decode over contexts no prefill wrote: random
        values there, since timing over zeros can flatter the hardware."""
        gen = torch.Generator(device=self.device).manual_seed(self.config.seed)
        for k_cache, v_cache in self.kv_caches:
            for cache in (k_cache, v_cache):
                if cache is not None:
                    cache.normal_(generator=gen)

    @property
    def bytes_per_block(self) -> int:
        """One block of every layer on this rank."""
        return (self.config.model.num_layers * self.config.cache.block_size
                * self.kv_spec.bytes_per_token)

    def _decide_num_blocks(self) -> int:
        """Blocks per rank: explicit, from a memory size, or what GPU memory allows after a
        profiling pass; every rank takes the minimum so that block ids mean the same
        everywhere."""
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if cache.kv_cache_memory_gib is not None:
            budget = cache.kv_cache_memory_gib * 2**30
        elif self.device.type == "cuda":
            budget = self._profile_kv_budget()
        else:
            budget = CPU_DEFAULT_KV_GIB * 2**30
        blocks = torch.tensor([max(int(budget // self.bytes_per_block), 1)])
        if self.groups.cpu_group is not None:
            torch.distributed.all_reduce(blocks, torch.distributed.ReduceOp.MIN,
                                         group=self.groups.cpu_group)
        return int(blocks.item())

    def _profile_kv_budget(self) -> float:
        """Bytes left for the KV cache: run the largest step the scheduler can plan (one
        prompt of max_num_batched_tokens) with a cache just big enough for it, and take the
        peak memory it needed.

            total * gpu_memory_utilization
              - memory others hold on this GPU (CUDA context, NCCL buffers, other processes)
              - peak of this process's tensors during the step (weights + activations)
        """
        tokens = min(self.config.scheduler.max_num_batched_tokens,
                     self.config.model.max_model_len - 1)
        blocks = self.layout.num_blocks_for(tokens) + 1
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.kv_caches = [self.kv_spec.allocate(blocks, self.config.cache.block_size,
                                                self.device)
                          for _ in range(self.config.model.num_layers)]
        cache_bytes = blocks * self.bytes_per_block
        plan = StepPlan([PlannedRequest(PROFILE_REQUEST_ID, [0] * tokens, 0,
                                        list(range(blocks)), True, 1)])
        self.execute(plan, use_graphs=False)
        torch.cuda.synchronize(self.device)
        self.block_tables.pop(PROFILE_REQUEST_ID, None)
        peak = torch.cuda.max_memory_allocated(self.device) - cache_bytes
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        held_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.cache.gpu_memory_utilization - held_by_others - peak
        if budget <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: a step of {tokens} tokens peaks at "
                f"{peak / 2**30:.1f} GiB, others hold {held_by_others / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB; raise --gpu-memory-utilization "
                f"({self.config.cache.gpu_memory_utilization}) or lower "
                "--max-num-batched-tokens")
        self.profile_report = (f"profiled a {tokens}-token step: peak {peak / 2**30:.2f} GiB, "
                               f"others {held_by_others / 2**30:.2f} GiB, KV budget "
                               f"{budget / 2**30:.2f} GiB")
        print(f"cpserve rank {self.groups.rank}: {self.profile_report}", file=sys.stderr,
              flush=True)
        return budget

    def written_slots(self) -> torch.Tensor:
        """Flat slots of layer 0 whose K is not all zero (the cache starts zeroed)."""
        k_cache = self.kv_caches[0][0]
        return torch.nonzero(k_cache.flatten(0, 1).flatten(1).ne(0).any(dim=1)).squeeze(1).cpu()

    # One step ------------------------------------------------------------------------------
    def _apply_table_diffs(self, plan: StepPlan) -> None:
        for request_id in plan.freed_request_ids:
            self.block_tables.pop(request_id, None)
        for r in plan.requests:
            if r.is_new:
                self.block_tables[r.request_id] = list(r.block_ids)
            else:
                self.block_tables[r.request_id].extend(r.block_ids)

    def _is_split(self, num_new: int) -> bool:
        par = self.config.parallel
        return par.pcp > 1 and num_new >= par.min_split_tokens

    @torch.inference_mode()
    def execute(self, plan: StepPlan, use_graphs: bool = True) -> torch.Tensor | None:
        """Run the plan. Returns fp32 logits [rows, vocab] on the driver, None elsewhere.

        Rows: request by request in plan order, the last `num_logits` new tokens of each.
        """
        self._apply_table_diffs(plan)
        if not plan.requests:
            return None
        seqs = [PlannedSeq(r.start, len(r.token_ids), self._is_split(len(r.token_ids)))
                for r in plan.requests]
        tables = [self.block_tables[r.request_id] for r in plan.requests]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        step = build_step_tokens(seqs, block_tables, self.layout, self.groups)

        flat_ids = torch.tensor([t for r in plan.requests for t in r.token_ids], dtype=torch.long)
        first = torch.tensor([0] + [len(r.token_ids) for r in plan.requests]).cumsum(0)
        token_ids = flat_ids[first[step.seq] + step.offset]

        if use_graphs and self.graphs is not None and self.graphs.can_run(plan, seqs):
            hidden = self.graphs.run(token_ids, step.positions, step.metadata)
        else:
            ctx = AttentionContext(_to_device(step.metadata, self.device), self.kv_caches,
                                   self.groups, self.backend, self.config.parallel.kv_exchange)
            hidden = self.model(token_ids.to(self.device), step.positions.to(self.device), ctx)
        rows = self._logit_rows(plan, seqs, step.seq, step.offset, hidden)
        if rows is None or self.groups.pcp_rank != 0:
            return None
        logits = self.model.compute_logits(rows).float()
        return logits if self.groups.is_driver else None

    def _logit_rows(self, plan, seqs, local_seq, local_offset, hidden) -> torch.Tensor | None:
        """Hidden states of the tokens whose logits are needed, on PCP rank 0.

        Split tokens live on different PCP ranks, so each rank fills the rows it owns
        (replicated ones: PCP rank 0 alone) and a sum over the PCP group assembles them.
        Only these rows travel, never the whole prompt's hidden states.
        """
        wanted_seq, wanted_offset = [], []
        for i, r in enumerate(plan.requests):
            n = len(r.token_ids)
            wanted_seq += [i] * r.num_logits
            wanted_offset += range(n - r.num_logits, n)
        if not wanted_seq:
            return None
        key = local_seq * (1 << 32) + local_offset
        wanted_key = torch.tensor(wanted_seq) * (1 << 32) + torch.tensor(wanted_offset)
        needs_gather = any(seqs[i].split for i in set(wanted_seq))
        if not needs_gather:
            if self.groups.pcp_rank != 0:
                return None
            order = torch.argsort(key)
            index = order[torch.searchsorted(key[order], wanted_key)]
            return hidden[index.to(hidden.device)]
        owned = torch.isin(wanted_key, key)
        if self.groups.pcp_rank != 0:
            owned &= torch.tensor([seqs[i].split for i in wanted_seq])
        order = torch.argsort(key)
        pos = torch.searchsorted(key[order], wanted_key).clamp(max=max(len(key) - 1, 0))
        index = order[pos] if len(key) else pos
        rows = torch.zeros(len(wanted_seq), hidden.shape[-1], dtype=hidden.dtype,
                           device=hidden.device)
        owned_dev = owned.to(hidden.device)
        rows[owned_dev] = hidden[index[owned].to(hidden.device)]
        return all_reduce(rows, self.groups.pcp_group)


def _to_device(meta: StepAttentionMetadata, device: torch.device) -> StepAttentionMetadata:
    if device.type == "cpu":
        return meta
    moved = {name: (value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value)
             for name, value in vars(meta).items()}
    return StepAttentionMetadata(**moved)


def _load_format(config: EngineConfig) -> str:
    return config.load_format


def _build_model(config: EngineConfig, groups: ParallelGroups, device: torch.device):
    """Load the checkpoint, or with load format "dummy" make random weights directly on the
    device (benchmarks: speed does not depend on the values, and an 8B model needs no 16 GB
    of files)."""
    model_cfg = config.model
    if _load_format(config) != "dummy":
        return build_model(model_cfg, groups, device)
    from cpserve.models.registry import model_class

    with torch.device(device):
        model = model_class(model_cfg.architecture)(model_cfg, groups)
    # Seeded by TP rank: PCP ranks hold the same weights, as with a checkpoint.
    gen = torch.Generator(device=device).manual_seed(config.seed + groups.tp_rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model.eval()


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

    BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)

    @classmethod
    def for_runner(cls, runner: ModelRunner) -> DecodeGraphs | None:
        return cls(runner) if graphs_enabled(runner.config, runner.groups,
                                             runner.device) else None

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        largest = min(runner.config.scheduler.max_num_seqs, self.BUCKETS[-1])
        self.buckets = [b for b in self.BUCKETS if b < largest] + [largest]
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
