"""The MTP drafter on every rank: after a step, the checkpoint's MTP module drafts K tokens.

The driver sends, for each request of the step just run (plan order), the token after each
of its new tokens, the row of its last token whose KV is now valid, and how many drafts it
wants (`StepPlan.draft`). Every rank then, with its own heads and KV shard:

  1. runs MTP module 0 over the step's own tokens (same rows, positions, slots and layout
     as the main step, PCP splits included), reading the main hidden states kept from the
     step and the following tokens, and writing the module's KV at those positions:

         step of a request:   positions L .. L+K (its last token and K drafts), a accepted
         MTP reads            (t_{L+1}, h_L) ... (t_{L+a+1}, h_{L+a})   valid
                              (0,       h_{L+a+1}) ...                  rows past them: their
                                                                        KV is written again
                                                                        by the next step
  2. takes the hidden state of row a (position L+a, which read the new token t_{L+a+1}):
     its argmax is draft 1, for position L+a+2;
  3. for drafts 2..K, one decode step of the module per draft at the next position, reading
     the previous draft and the previous h' (module (k - 1) % n for draft k), its KV
     written first, so draft k attends to the module's KV up to its own position.

On a GPU with CUDA graphs, step 1 replays a graph when the main step did (a decode or
verification step: the same rows), and every step of 3 does (a decode step of the module):
`DraftGraphs`, the engine's step graphs with the module as the forward pass and the
previous hidden state as one more static input.

The drafts are the same on every rank (same inputs, argmax); rank 0's are returned. The
chain's positions stay within the blocks the scheduler allocated (its lookahead) and below
max_model_len (the driver's budget), so no request writes outside its own blocks.

What the module's cache holds only ever changes drafts, never outputs (verification decides).
Two places where it is an approximation, as in vLLM: the module's KV at position p depends on
the token at p + 1, so a prefix-cache hit reuses, at the last position of the cached blocks,
KV made with the first request's next token; and modules after the first (K > 1 with several
modules) have KV only at chain positions, the first module's alone covering every position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cpserve.attention.context import AttentionContext
from cpserve.attention.metadata import PlannedSeq, StepTokens, build_step_tokens
from cpserve.distributed.groups import all_reduce
from cpserve.engine.cuda_graphs import DecodeGraphs, graphs_enabled
from cpserve.models.deepseek_mtp import DeepseekMTP
from cpserve.models.loader import build_model
from cpserve.models.rope import StepPositions

if TYPE_CHECKING:
    from cpserve.engine.model_runner import ModelRunner, PreparedStep


class DraftGraphs(DecodeGraphs):
    """CUDA graphs of the MTP module's paged-only steps; the variant is the module."""

    def __init__(self, runner: ModelRunner, proposer: MTPProposer) -> None:
        super().__init__(runner, runner.config.model.hidden_size, runner.config.model.dtype)
        self.proposer = proposer

    def _forward(self, rows: int, ctx: AttentionContext, variant: int) -> torch.Tensor:
        embeds = self.runner.model.model.embed_tokens(self.token_ids[:rows])
        module = self.proposer.mtp.module_for(variant)
        return module(StepPositions(self.positions[:rows]), embeds, self.hidden[:rows], ctx)


class MTPProposer:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        cfg = runner.config
        self.mtp: DeepseekMTP = build_model(cfg.model, runner.model_groups, runner.device,
                                            cfg.load_format, cfg.seed, model_cls=DeepseekMTP)
        self._step: tuple | None = None
        self._graphs: DraftGraphs | None = None
        self._use_graphs = graphs_enabled(cfg, runner.groups, runner.device)

    @property
    def num_cache_layers(self) -> int:
        return self.mtp.num_modules

    def remember(self, step: PreparedStep, hidden: torch.Tensor) -> None:
        """Keep what the module reads from the step just run (until the next one): its
        inputs and attention context (the backend's plans hold for the module too) and the
        main model's final hidden states."""
        self._step = (step, hidden)

    def forget(self) -> None:
        self._step = None

    @torch.inference_mode()
    def propose(self, entries: list) -> list[list[int]]:
        """Drafts per request of the last step (empty where none are wanted)."""
        prepared, hidden = self._step
        self._step = None
        runner, plan, seqs, step = self.runner, prepared.plan, prepared.seqs, prepared.tokens
        following = torch.tensor([t for e in entries for t in e[0]], dtype=torch.long)
        lengths = torch.tensor([len(e[0]) for e in entries])
        first = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        rows = first[step.seq] + torch.minimum(step.offset, lengths[step.seq] - 1)
        out = self._run(0, following[rows], step, hidden, prepared.ctx,
                        graphed=prepared.ctx is None)

        wanted = [i for i, e in enumerate(entries) if e[2] > 0]
        drafts: list[list[int]] = [[] for _ in entries]
        if not wanted:
            return drafts
        h = self._rows_everywhere(out, step, seqs, [(i, entries[i][1]) for i in wanted])
        tokens = self._argmax(0, h)
        positions = [plan.requests[i].start + entries[i][1] + 1 for i in wanted]
        for k in range(1, max(entries[i][2] for i in wanted) + 1):
            for j, i in enumerate(wanted):
                drafts[i].append(int(tokens[j]))
            going = [j for j, i in enumerate(wanted) if entries[i][2] > k]
            if not going:
                break
            wanted = [wanted[j] for j in going]
            positions = [positions[j] for j in going]
            h, tokens = h[going], tokens[going]
            tables = [runner.block_tables[plan.requests[i].request_id] for i in wanted]
            width = max(len(t) for t in tables)
            block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
            seqs_k = [PlannedSeq(p, 1, False) for p in positions]
            chain = build_step_tokens(seqs_k, block_tables, runner.layout, runner.groups)
            graphs = self.graphs
            h = self._run(k, tokens.to(torch.long).cpu(), chain, h,
                          graphed=graphs is not None and graphs.can_run(seqs_k, width))
            tokens = self._argmax(k, h)
            positions = [p + 1 for p in positions]
        return drafts

    @property
    def graphs(self) -> DraftGraphs | None:
        if self._use_graphs and self._graphs is None:  # made at first use, as the caches exist
            self._graphs = DraftGraphs(self.runner, self)
        return self._graphs

    def _run(self, draft_index: int, token_ids: torch.Tensor, step: StepTokens,
             previous_hidden: torch.Tensor, ctx: AttentionContext | None = None,
             graphed: bool = False) -> torch.Tensor:
        from cpserve.engine.model_runner import _to_device

        runner = self.runner
        if graphed and self.graphs is not None:
            return self.graphs.run(token_ids, step.positions, step.metadata, previous_hidden,
                                   draft_index % self.mtp.num_modules)
        if ctx is None:  # a chain step, or a main step that replayed a graph
            exchange = runner.config.parallel.kv_exchange
            ctx = AttentionContext(_to_device(step.metadata, runner.device), runner.kv_caches,
                                   runner.groups, runner.backend, exchange,
                                   plans=runner.backend.plan_step(step.metadata, exchange))
        embeds = runner.model.model.embed_tokens(token_ids.to(runner.device))
        positions = StepPositions(step.positions.to(runner.device))
        return self.mtp.module_for(draft_index)(positions, embeds, previous_hidden, ctx)

    def _argmax(self, draft_index: int, hidden: torch.Tensor) -> torch.Tensor:
        # Every TP rank gets the whole vocabulary's logits (the head gathers them).
        return self.mtp.module_for(draft_index).compute_logits(hidden).argmax(dim=-1)

    def _rows_everywhere(self, out: torch.Tensor, step: StepTokens, seqs: list[PlannedSeq],
                         wanted: list[tuple[int, int]]) -> torch.Tensor:
        """Rows (request index, offset) of `out`, on every rank. Replicated requests have
        them on every rank; a split one on one PCP rank each, so zero-filled rows summed
        over the PCP group assemble them (replicated ones filled by PCP rank 0 alone)."""
        key = step.seq * (1 << 32) + step.offset
        wanted_key = torch.tensor([i * (1 << 32) + o for i, o in wanted])
        order = torch.argsort(key)
        pos = torch.searchsorted(key[order], wanted_key).clamp(max=max(len(key) - 1, 0))
        index = order[pos] if len(key) else pos
        if not any(seqs[i].split for i, _ in wanted):
            return out[index.to(out.device)]
        groups = self.runner.groups
        owned = torch.isin(wanted_key, key)
        if groups.pcp_rank != 0:
            owned &= torch.tensor([seqs[i].split for i, _ in wanted])
        rows = out.new_zeros(len(wanted), out.shape[-1])
        owned_dev = owned.to(out.device)
        rows[owned_dev] = out[index[owned].to(out.device)]
        return all_reduce(rows, groups.pcp_group)
