"""Runs one step of the model on one rank: plan in, logits out (on the driver).

Every rank runs this same code on the same plan; what differs is only the rank's groups
(which heads, which tokens, which KV shard it holds).

    execute(plan)
      prepare   rows.apply (the plan's diffs) -> step inputs on the device (step_inputs.py)
                -> the backend's plans of every attention call (non-decode steps)
      forward   a decode graph replay (cuda_graphs.py) or the eager model
      logits    the rows the plan asks for, in slices (prompt logprobs can ask for many)

Nothing here waits for the device: a step is queued and `execute` returns, so the driver can
schedule the next one while this one runs (async scheduling, `engine/llm_engine.py`).
On CUDA the KV cache gets what `gpu_memory_utilization` leaves after a profiling step
(`kv_sizing.py`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cpserve.attention.backend import AttentionShape, StepPlans, get_backend
from cpserve.attention.context import AttentionContext
from cpserve.attention.metadata import PlannedSeq
from cpserve.config import EngineConfig
from cpserve.distributed.groups import ParallelGroups, all_reduce
from cpserve.distributed.plan import PlannedRequest, StepPlan
from cpserve.engine.cuda_graphs import DecodeGraphs
from cpserve.engine.kv_sizing import decide_num_blocks, gpu_used
from cpserve.engine.step_inputs import (
    PendingTokens,
    RequestRows,
    StepInputs,
    prepare_inputs,
    wanted_rows,
)
from cpserve.engine.transfer import to_device
from cpserve.kv.layout import KVLayout
from cpserve.models.checkpoint import checkpoint_files
from cpserve.models.loader import build_model
from cpserve.quantization import kv_cache as fp8_kv
from cpserve.spec_decode.mtp_proposer import MTPProposer

WARMUP_REQUEST_ID = "__cpserve_kv_warmup__"
# fp32 logits computed at once, whatever the number of rows a step asks for.
LOGITS_SLICE_BYTES = 256 * 2**20

# Takes the fp32 logits of rows [first_row, first_row + len(logits)) of a step, on the driver.
LogitsConsumer = Callable[[int, torch.Tensor], None]


@dataclass
class PreparedStep:
    """One step's inputs, and for an eager step the attention context with the backend's
    plans (None: the step replays a decode graph)."""

    plan: StepPlan
    inputs: StepInputs
    ctx: AttentionContext | None = None


class ModelRunner:
    def __init__(self, config: EngineConfig, groups: ParallelGroups, device: torch.device) -> None:
        self.config = config
        self.groups = groups
        self.device = device
        par, cache, model_cfg = config.parallel, config.cache, config.model
        # GPU memory in use before this process loads anything (another instance sharing the
        # GPU): gpu_memory_utilization is this instance's share, as in vLLM.
        self.gpu_used_at_start = gpu_used(device)
        self.layout = KVLayout(cache.block_size, par.num_kv_shards, par.interleave)
        self.model_groups = dataclasses.replace(groups,
                                                expert_parallel=par.enable_expert_parallel)
        self.model = build_model(config.model, self.model_groups, device, config.load_format,
                                 config.seed)
        # Speculative decoding with MTP: the checkpoint's MTP modules, with caches of their own
        # (not with an FP8 cache: spec_decode/config.py refuses the two together).
        self.drafter = MTPProposer(self) if config.speculative and config.speculative.is_mtp \
            else None
        self.num_cache_layers = model_cfg.num_layers + (self.drafter.num_cache_layers
                                                        if self.drafter else 0)
        # The cache's layout in its own dtype (FP8 with --kv-cache-dtype fp8), known before
        # the backend: its plans and gather workspace depend on it.
        self.kv_spec = fp8_kv.with_cache_dtype(self.model.kv_cache_spec(), cache)
        # Before the KV cache is sized: the backend reserves its gather workspace here, the
        # rows their tables.
        self.backend = get_backend("auto", device, self.attention_shape(),
                                   self.layout.local_count(model_cfg.max_model_len, 0))
        self.rows = RequestRows(config.scheduler.max_num_seqs,
                                self.layout.num_blocks_for(model_cfg.max_model_len), device)
        self.kv_caches: list = []
        self.kv_scales: list[tuple[float, float]] | None = None  # per layer, FP8 caches only
        self.kv_report = None
        if cache.fp8_kv:  # the warm-up prefill (if any) runs on a cache of the model's dtype
            self.kv_scales = self._fp8_kv_scales()
            self.kv_report = fp8_kv.cache_report(self.kv_spec, model_cfg.dtype,
                                                 self.kv_scales_source)
        self.num_blocks = decide_num_blocks(self)
        self.kv_caches = [self.kv_spec.allocate(self.num_blocks, cache.block_size, device)
                          for _ in range(self.num_cache_layers)]
        if config.load_format == "dummy":
            self._randomize_kv_caches()
        self.graphs = DecodeGraphs.for_runner(self)
        self.kv_transfer = None  # --kv-transfer-config: this rank's server and loads
        if config.kv_transfer is not None:
            from cpserve.kv_transfer.worker import KVTransferWorker

            self.kv_transfer = KVTransferWorker(self)
        if self.graphs is not None:
            seconds = self.graphs.capture_all()
            print(f"cpserve rank {groups.rank}: captured decode graphs of batch "
                  f"{self.graphs.buckets} in {seconds:.1f} s", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Release the decode graphs before the process groups go: graphs that captured NCCL
        collectives hold work on their communicators (a rank that kept them while its group
        was destroyed did not exit in the 2026-11-22 benchmark run)."""
        self.graphs = None
        if self.kv_transfer is not None:
            self.kv_transfer.close()
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
        blocks = self.layout.num_blocks_for(tokens)  # within a max_model_len request's row
        spec = self.model.kv_cache_spec()
        self.kv_caches = [spec.allocate(blocks, cfg.cache.block_size, self.device)
                          for _ in range(cfg.model.num_layers)]
        prompt = fp8_kv.warmup_prompt(cfg.model.vocab_size, tokens)
        self.execute(StepPlan([PlannedRequest(WARMUP_REQUEST_ID, prompt, 0,
                                              list(range(blocks)), True, 1)]),
                     use_graphs=False)
        self.rows.remove(WARMUP_REQUEST_ID)
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
        return self.num_cache_layers * self.config.cache.block_size * self.kv_spec.bytes_per_token

    def written_slots(self) -> torch.Tensor:
        """Flat slots of layer 0 whose K is not all zero (the cache starts zeroed)."""
        k_cache = self.kv_caches[0][0]
        if k_cache.element_size() == 1:  # FP8: compare the bits
            k_cache = k_cache.view(torch.uint8)
        return torch.nonzero(k_cache.flatten(0, 1).flatten(1).ne(0).any(dim=1)).squeeze(1).cpu()

    # One step ------------------------------------------------------------------------------
    def _is_split(self, r: PlannedRequest) -> bool:
        """Long prompt chunks are split over the PCP ranks; drafts never are (a verification
        step's queries are replicated tokens, DESIGN.md)."""
        par = self.config.parallel
        return par.pcp > 1 and len(r.token_ids) >= par.min_split_tokens and not r.num_drafts

    @property
    def max_paged_queries(self) -> int:
        """Requests of at most this many new tokens attend through the paged cache alone."""
        spec = self.config.speculative
        return spec.max_queries_per_request if spec is not None else 1

    @torch.inference_mode()
    def execute(self, plan: StepPlan, use_graphs: bool = True,
                consume_logits: LogitsConsumer | None = None,
                pending_tokens: PendingTokens | None = None) -> torch.Tensor | None:
        """Run the plan. Returns fp32 logits [rows, vocab] on the driver, None elsewhere; with
        `consume_logits`, the driver gets them slice by slice instead and None is returned.
        `pending_tokens`: see `prepare_inputs`.

        Rows: request by request in plan order, the last `num_logits` new tokens of each.
        """
        if plan.kv is not None:
            self.kv_transfer.apply(plan.kv)
        step = self.prepare(plan, use_graphs, pending_tokens)
        if step is None:
            return None
        hidden = self.forward(step)
        if self.drafter is not None:
            self.drafter.remember(step, hidden)
        rows = self._logit_rows(step, hidden)
        if rows is None or self.groups.pcp_rank != 0:
            return None
        return self._logits_in_slices(rows, consume_logits)

    def propose_drafts(self, entries: list) -> list[list[int]]:
        """MTP drafts after the last step (`StepPlan.draft`, spec_decode/mtp_proposer.py)."""
        return self.drafter.propose(entries)

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
        return torch.cat(kept) if len(kept) > 1 else (kept[0] if kept else None)

    def prepare(self, plan: StepPlan, use_graphs: bool = True,
                pending_tokens: PendingTokens | None = None) -> PreparedStep | None:
        """Host work of a step: the plan's table diffs, the inputs on the device, and for an
        eager step the backend's plans. None when the plan runs no request."""
        diff = self.rows.apply(plan)
        if not plan.requests:  # freed requests only: no table changes
            return None
        seqs = [PlannedSeq(r.start, len(r.token_ids), self._is_split(r)) for r in plan.requests]
        inputs = prepare_inputs(plan, seqs, self.rows, diff, self.layout, self.groups,
                                self.device, pending_tokens, self.max_paged_queries)
        step = PreparedStep(plan, inputs)
        if use_graphs and self.graphs is not None and self.graphs.can_run(inputs):
            return step
        exchange = self.config.parallel.kv_exchange
        # Decode steps need no plans: their kernels take everything from shapes.
        plans = (StepPlans() if inputs.host_metadata is None
                 else self.backend.plan_step(inputs.host_metadata, exchange))
        step.ctx = AttentionContext(inputs.metadata, self.kv_caches, self.groups, self.backend,
                                    exchange, kv_scales=self.kv_scales, plans=plans)
        return step

    def forward(self, step: PreparedStep) -> torch.Tensor:
        """Final hidden states of the step's local tokens (no host synchronisation)."""
        if step.ctx is None:
            return self.graphs.run(step.inputs.decode_vectors,
                                   step.inputs.metadata.rep_queries_per_seq)
        return self.model(step.inputs.token_ids, step.inputs.positions, step.ctx)

    def _logit_rows(self, step: PreparedStep, hidden: torch.Tensor) -> torch.Tensor | None:
        """Hidden states of the tokens whose logits are needed, on PCP rank 0.

        Split tokens live on different PCP ranks, so each rank fills the rows it owns
        (replicated ones: PCP rank 0 alone) and a sum over the PCP group assembles them.
        Only these rows travel, never the whole prompt's hidden states.
        """
        plan, seqs = step.plan, step.inputs.seqs
        wanted_seq, wanted_offset = wanted_rows(plan)
        if not len(wanted_seq):
            return None
        needs_gather = any(seqs[i].split for i in set(wanted_seq.tolist()))
        if not needs_gather:
            if self.groups.pcp_rank != 0:
                return None
            # Unsplit: local tokens are the plan's, request after request (q rows each in a
            # padded verification step).
            q = step.inputs.metadata.rep_queries_per_seq
            if q > 1:
                index = wanted_seq * q + wanted_offset
            else:
                first = torch.tensor([0] + [s.num_new for s in seqs]).cumsum(0)
                index = first[wanted_seq] + wanted_offset
            if len(index) == hidden.shape[0] and bool((index == torch.arange(len(index))).all()):
                return hidden  # every token's logits, in order (decodes)
            return hidden.index_select(0, to_device(index, hidden.device))
        local_seq, local_offset = step.inputs.local_seq, step.inputs.local_offset
        key = local_seq * (1 << 32) + local_offset
        wanted_key = wanted_seq * (1 << 32) + wanted_offset
        owned = torch.isin(wanted_key, key)
        if self.groups.pcp_rank != 0:
            owned &= torch.tensor([seqs[i].split for i in wanted_seq.tolist()])
        order = torch.argsort(key)
        pos = torch.searchsorted(key[order], wanted_key).clamp(max=max(len(key) - 1, 0))
        index = order[pos] if len(key) else pos
        rows = torch.zeros(len(wanted_seq), hidden.shape[-1], dtype=hidden.dtype,
                           device=hidden.device)
        rows.index_copy_(0, to_device(torch.nonzero(owned).squeeze(1), hidden.device),
                         hidden.index_select(0, to_device(index[owned], hidden.device)))
        return all_reduce(rows, self.groups.pcp_group)


