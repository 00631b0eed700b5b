"""Runs one step of the model on one rank: plan in, logits out (on the driver).

Every rank runs this same code on the same plan; what differs is only the rank's groups
(which heads, which tokens, which KV shard it holds).

On CUDA the KV cache gets what `gpu_memory_utilization` leaves after a profiling forward pass
of the largest step, and decode steps replay CUDA graphs (see `DecodeGraphs`).

A step is prepared on the host (metadata, the backend's plans, inputs moved to the device
once) and then run: the forward pass of an eager step never waits for the host.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cpserve.attention.backend import AttentionShape, get_backend
from cpserve.attention.context import AttentionContext
from cpserve.attention.metadata import (
    PlannedSeq,
    StepAttentionMetadata,
    StepTokens,
    build_step_tokens,
)
from cpserve.config import EngineConfig
from cpserve.distributed.groups import ParallelGroups, all_reduce
from cpserve.distributed.plan import PlannedRequest, StepPlan
from cpserve.engine.cuda_graphs import DecodeGraphs
from cpserve.kv.layout import KVLayout
from cpserve.models.checkpoint import checkpoint_files
from cpserve.models.loader import build_model
from cpserve.quantization import kv_cache as fp8_kv

CPU_DEFAULT_KV_GIB = 0.25
PROFILE_REQUEST_ID = "__cpserve_profile__"
WARMUP_REQUEST_ID = "__cpserve_kv_warmup__"
# fp32 logits computed at once, whatever the number of rows a step asks for.
LOGITS_SLICE_BYTES = 256 * 2**20

# Takes the fp32 logits of rows [first_row, first_row + len(logits)) of a step, on the driver.
LogitsConsumer = Callable[[int, torch.Tensor], None]


@dataclass
class PreparedStep:
    """One step's inputs: host tensors, and for an eager step the device inputs and the
    attention context with the backend's plans (None: the step replays a decode graph)."""

    plan: StepPlan
    seqs: list[PlannedSeq]
    tokens: StepTokens
    token_ids: torch.Tensor
    ctx: AttentionContext | None = None
    device_token_ids: torch.Tensor | None = None
    device_positions: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, groups: ParallelGroups, device: torch.device) -> None:
        self.config = config
        self.groups = groups
        self.device = device
        par, cache, model_cfg = config.parallel, config.cache, config.model
        self.layout = KVLayout(cache.block_size, par.num_kv_shards, par.interleave)
        model_groups = dataclasses.replace(groups,
                                           expert_parallel=par.enable_expert_parallel)
        self.model = build_model(config.model, model_groups, device, config.load_format,
                                 config.seed)
        # The cache's layout in its own dtype (FP8 with --kv-cache-dtype fp8), known before
        # the backend: its plans and gather workspace depend on it.
        self.kv_spec = fp8_kv.with_cache_dtype(self.model.kv_cache_spec(), cache)
        # Before the KV cache is sized: the backend reserves its gather workspace here.
        self.backend = get_backend("auto", device, self.attention_shape(),
                                   self.layout.local_count(model_cfg.max_model_len, 0))
        self.block_tables: dict[str, list[int]] = {}
        self.kv_caches: list = []
        self.kv_scales: list[tuple[float, float]] | None = None  # per layer, FP8 caches only
        self.kv_report = None
        if cache.fp8_kv:  # the warm-up prefill (if any) runs on a cache of the model's dtype
            self.kv_scales = self._fp8_kv_scales()
            self.kv_report = fp8_kv.cache_report(self.kv_spec, model_cfg.dtype,
                                                 self.kv_scales_source)
        self.num_blocks = self._decide_num_blocks()
        self.kv_caches = [self.kv_spec.allocate(self.num_blocks, cache.block_size, device)
                          for _ in range(model_cfg.num_layers)]
        if config.load_format == "dummy":
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
                if cache is None:
                    continue
                if cache.dtype != torch.float8_e4m3fn:
                    cache.normal_(generator=gen)
                    continue
                for block in cache.split(max(1, 2**28 // cache[0].numel())):  # no normal_ in FP8
                    block.copy_(torch.randn(block.shape, generator=gen, device=self.device,
                                            dtype=torch.bfloat16).to(block.dtype))

    def _fp8_kv_scales(self) -> list[tuple[float, float]]:
        """Per-layer (k_scale, v_scale) of an FP8 cache: the checkpoint's, or measured by a
        warm-up prefill into a cache of the model's dtype (quantization/kv_cache.py)."""
        cfg = self.config
        if cfg.load_format != "dummy":
            scales = fp8_kv.checkpoint_kv_scales(checkpoint_files(Path(cfg.model.path)),
                                                 cfg.model.num_layers)
            if scales is not None:
                self.kv_scales_source = "from the checkpoint"
                return scales
        tokens = min(fp8_kv.WARMUP_TOKENS, cfg.model.max_model_len - 1,
                     cfg.scheduler.max_num_batched_tokens)
        blocks = self.layout.num_blocks_for(tokens) + 1
        spec = self.model.kv_cache_spec()
        self.kv_caches = [spec.allocate(blocks, cfg.cache.block_size, self.device)
                          for _ in range(cfg.model.num_layers)]
        prompt = fp8_kv.warmup_prompt(cfg.model.vocab_size, tokens)
        self.execute(StepPlan([PlannedRequest(WARMUP_REQUEST_ID, prompt, 0,
                                              list(range(blocks)), True, 1)]),
                     use_graphs=False)
        self.block_tables.pop(WARMUP_REQUEST_ID, None)
        amax = fp8_kv.kv_amax(self.kv_caches)
        self.kv_caches = []
        if self.groups.cpu_group is not None:
            torch.distributed.all_reduce(amax, torch.distributed.ReduceOp.MAX,
                                         group=self.groups.cpu_group)
        self.kv_scales_source = f"measured by a {tokens}-token warm-up prefill"
        return [(fp8_kv.scale_from_amax(float(k)), fp8_kv.scale_from_amax(float(v)))
                for k, v in amax.tolist()]

    def attention_shape(self) -> AttentionShape:
        """The attention calls' shape on this rank: DCP gathers its group's query heads."""
        model, par, spec = self.config.model, self.config.parallel, self.kv_spec
        v_dim = spec.v_dim if spec.v_dim is not None else int(model.hf_config["kv_lora_rank"])
        hf = model.hf_config
        expanded = None  # MLA without DCP reads prefixes expanded (attention/sharded.py)
        if spec.v_dim is None and "qk_nope_head_dim" in hf and par.dcp == 1:
            expanded = (int(hf["qk_nope_head_dim"]) + int(hf["qk_rope_head_dim"]),
                        int(hf["v_head_dim"]))
        return AttentionShape(model.num_heads // par.tp * par.dcp, spec.num_heads, spec.k_dim,
                              v_dim, model.dtype, values_in_keys=spec.v_dim is None,
                              kv_dtype=spec.dtype, expanded_dims=expanded)

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
        # Too small a budget gives 0 blocks, which the engine refuses naming the flags.
        blocks = torch.tensor([int(budget // self.bytes_per_block)])
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
        self.profiled_kv_budget = budget
        self.profile_report = (f"profiled a {tokens}-token step: peak {peak / 2**30:.2f} GiB, "
                               f"others {held_by_others / 2**30:.2f} GiB, KV budget "
                               f"{budget / 2**30:.2f} GiB")
        print(f"cpserve rank {self.groups.rank}: {self.profile_report}", file=sys.stderr,
              flush=True)
        return budget

    def written_slots(self) -> torch.Tensor:
        """Flat slots of layer 0 whose K is not all zero (the cache starts zeroed)."""
        k_cache = self.kv_caches[0][0]
        if k_cache.element_size() == 1:  # FP8: compare the bits
            k_cache = k_cache.view(torch.uint8)
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
    def execute(self, plan: StepPlan, use_graphs: bool = True,
                consume_logits: LogitsConsumer | None = None) -> torch.Tensor | None:
        """Run the plan. Returns fp32 logits [rows, vocab] on the driver, None elsewhere; with
        `consume_logits`, the driver gets them slice by slice instead and None is returned.

        Rows: request by request in plan order, the last `num_logits` new tokens of each.
        """
        self._apply_table_diffs(plan)
        if not plan.requests:
            return None
        step = self.prepare(plan, use_graphs)
        hidden = self.forward(step)
        rows = self._logit_rows(plan, step.seqs, step.tokens.seq, step.tokens.offset, hidden)
        if rows is None or self.groups.pcp_rank != 0:
            return None
        return self._logits_in_slices(rows, consume_logits)

    def _logits_in_slices(self, rows: torch.Tensor,
                          consume: LogitsConsumer | None) -> torch.Tensor | None:
        """fp32 logits of `rows`, at most LOGITS_SLICE_BYTES of them at a time.

        Prompt logprobs ask for a logit row per prompt token, which the profiling step does
        not count (8k rows of a 128k vocabulary would be 4 GiB): each slice goes to
        `consume(first_row, logits)` on the driver and is dropped before the next. Every TP
        rank of PCP rank 0 computes the same slices (the LM head gathers over the vocabulary).
        """
        per_slice = max(1, LOGITS_SLICE_BYTES // (4 * self.config.model.vocab_size))
        kept = []
        for first in range(0, rows.shape[0], per_slice):
            logits = self.model.compute_logits(rows[first:first + per_slice]).float()
            if not self.groups.is_driver:
                continue
            if consume is not None:
                consume(first, logits)
            else:
                kept.append(logits)
        return torch.cat(kept) if kept else None

    def prepare(self, plan: StepPlan, use_graphs: bool = True) -> PreparedStep:
        """Host work of a step (block tables already applied): metadata, the backend's
        plans, and the inputs on the device, each index tensor copied once."""
        seqs = [PlannedSeq(r.start, len(r.token_ids), self._is_split(len(r.token_ids)))
                for r in plan.requests]
        tables = [self.block_tables[r.request_id] for r in plan.requests]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        tokens = build_step_tokens(seqs, block_tables, self.layout, self.groups)
        flat_ids = torch.tensor([t for r in plan.requests for t in r.token_ids], dtype=torch.long)
        first = torch.tensor([0] + [len(r.token_ids) for r in plan.requests]).cumsum(0)
        step = PreparedStep(plan, seqs, tokens, flat_ids[first[tokens.seq] + tokens.offset])
        if use_graphs and self.graphs is not None and self.graphs.can_run(plan, seqs):
            return step
        exchange = self.config.parallel.kv_exchange
        plans = self.backend.plan_step(tokens.metadata, exchange)
        step.ctx = AttentionContext(_to_device(tokens.metadata, self.device), self.kv_caches,
                                    self.groups, self.backend, exchange,
                                    kv_scales=self.kv_scales, plans=plans)
        step.device_token_ids = step.token_ids.to(self.device, non_blocking=True)
        step.device_positions = tokens.positions.to(self.device, non_blocking=True)
        return step

    def forward(self, step: PreparedStep) -> torch.Tensor:
        """Final hidden states of the step's local tokens (no host synchronisation)."""
        if step.ctx is None:
            return self.graphs.run(step.token_ids, step.tokens.positions, step.tokens.metadata)
        return self.model(step.device_token_ids, step.device_positions, step.ctx)

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
