"""Runs one step of the model on one rank: plan in, logits out (on the driver).

Every rank runs this same code on the same plan; what differs is only the rank's groups
(which heads, which tokens, which KV shard it holds).
"""

from __future__ import annotations

import torch

from cpserve.attention.backend import get_backend
from cpserve.attention.context import AttentionContext
from cpserve.attention.metadata import PlannedSeq, StepAttentionMetadata, build_step_tokens
from cpserve.config import EngineConfig
from cpserve.distributed.groups import ParallelGroups, all_reduce
from cpserve.distributed.plan import StepPlan
from cpserve.kv.layout import KVLayout
from cpserve.models.loader import build_model

CPU_DEFAULT_KV_GIB = 0.25


class ModelRunner:
    def __init__(self, config: EngineConfig, groups: ParallelGroups, device: torch.device) -> None:
        self.config = config
        self.groups = groups
        self.device = device
        par, cache, model_cfg = config.parallel, config.cache, config.model
        self.layout = KVLayout(cache.block_size, par.num_kv_shards, par.interleave)
        self.model = build_model(model_cfg, groups, device)
        self.backend = get_backend("auto", device.type)
        self.kv_spec = self.model.kv_cache_spec()
        self.num_blocks = self._decide_num_blocks()
        self.kv_caches = [self.kv_spec.allocate(self.num_blocks, cache.block_size, device)
                          for _ in range(model_cfg.num_layers)]
        self.block_tables: dict[str, list[int]] = {}

    @property
    def bytes_per_block(self) -> int:
        """One block of every layer on this rank."""
        return (self.config.model.num_layers * self.config.cache.block_size
                * self.kv_spec.bytes_per_token)

    def _decide_num_blocks(self) -> int:
        """Blocks per rank: explicit, from a memory size, or from free GPU memory; every rank
        takes the minimum so that block ids mean the same everywhere."""
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if cache.kv_cache_memory_gib is not None:
            budget = cache.kv_cache_memory_gib * 2**30
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free - torch.cuda.memory_allocated(self.device)
            activation_reserve = 2 * 2**30
            budget = total * cache.gpu_memory_utilization - used_by_others \
                - torch.cuda.memory_allocated(self.device) - activation_reserve
        else:
            budget = CPU_DEFAULT_KV_GIB * 2**30
        blocks = torch.tensor([max(int(budget // self.bytes_per_block), 1)])
        if self.groups.cpu_group is not None:
            torch.distributed.all_reduce(blocks, torch.distributed.ReduceOp.MIN,
                                         group=self.groups.cpu_group)
        return int(blocks.item())

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
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
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
