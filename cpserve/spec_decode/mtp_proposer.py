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
from cpserve.attention.metadata import PlannedSeq, StepAttentionMetadata, decode_metadata
from cpserve.distributed.groups import all_reduce
from cpserve.engine.cuda_graphs import DecodeGraphs, graphs_enabled
from cpserve.engine.transfer import take_rows, to_device
from cpserve.models.deepseek_mtp import DeepseekMTP
from cpserve.models.loader import build_model
from cpserve.models.rope import StepPositions

if TYPE_CHECKING:
    from cpserve.engine.model_runner import ModelRunner, PreparedStep
    from cpserve.engine.step_inputs import StepInputs


class DraftGraphs(DecodeGraphs):
    """CUDA graphs of the MTP module's paged-only steps; the variant is the module."""

    def __init__(self, runner: ModelRunner, proposer: MTPProposer) -> None:
        super().__init__(runner, runner.config.model.hidden_size, runner.config.model.dtype)
        self.proposer = proposer

    def _model(self, token_ids: torch.Tensor, meta: StepAttentionMetadata,
               ctx: AttentionContext, variant: int) -> torch.Tensor:
        embeds = self.runner.model.model.embed_tokens(token_ids)
        module = self.proposer.mtp.module_for(variant)
        return module(StepPositions(meta.rep_pos), embeds, self.hidden[:token_ids.shape[0]], ctx)


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
        runner, plan, inputs = self.runner, prepared.plan, prepared.inputs
        seqs = inputs.seqs
        following = torch.tensor([t for e in entries for t in e[0]], dtype=torch.long)
        lengths = torch.tensor([len(e[0]) for e in entries])
        first = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        rows = first[inputs.local_seq] + torch.minimum(inputs.local_offset,
                                                       lengths[inputs.local_seq] - 1)
        token_ids = to_device(following[rows], runner.device)
        ctx = prepared.ctx
        if ctx is None and self.graphs is not None:  # the main step replayed a graph: so
            vectors = inputs.decode_vectors.clone()   # does the module, over the same rows
            vectors[0] = token_ids
            out = self.graphs.run(vectors, inputs.metadata.rep_queries_per_seq, hidden, 0)
        else:
            if ctx is None:  # a paged-only step: its metadata needs no plans
                ctx = AttentionContext(inputs.metadata, runner.kv_caches, runner.groups,
                                       runner.backend, runner.config.parallel.kv_exchange)
            out = self._eager(0, token_ids, inputs.positions, hidden, ctx)

        wanted = [i for i, e in enumerate(entries) if e[2] > 0]
        drafts: list[list[int]] = [[] for _ in entries]
        if not wanted:
            return drafts
        h = self._rows_everywhere(out, inputs, seqs, [(i, entries[i][1]) for i in wanted])
        tokens = self._argmax(0, h)
        positions = [plan.requests[i].start + entries[i][1] + 1 for i in wanted]
        # The chain stays on the device: each draft feeds the next step's inputs there, and
        # the host reads all of them once at the end (a read per draft would wait for the
        # device each time, leaving it idle while the next step is prepared).
        chain = [(wanted, tokens)]
        for k in range(1, max(entries[i][2] for i in wanted)):
            going = [j for j, i in enumerate(wanted) if entries[i][2] > k]
            if not going:
                break
            wanted = [wanted[j] for j in going]
            positions = [positions[j] for j in going]
            h, tokens = take_rows(h, going), take_rows(tokens, going)
            h = self._chain_step(k, tokens, positions,
                                 [runner.rows.row(plan.requests[i].request_id) for i in wanted],
                                 h)
            tokens = self._argmax(k, h)
            positions = [p + 1 for p in positions]
            chain.append((wanted, tokens))
        values = iter(torch.cat([t for _, t in chain]).tolist())
        for requests, _ in chain:
            for i in requests:
                drafts[i].append(next(values))
        return drafts

    @property
    def graphs(self) -> DraftGraphs | None:
        if self._use_graphs and self._graphs is None:  # made at first use, as the caches exist
            self._graphs = DraftGraphs(self.runner, self)
        return self._graphs

    def _chain_step(self, draft_index: int, tokens: torch.Tensor, positions: list[int],
                    table_rows: list[int], previous_hidden: torch.Tensor) -> torch.Tensor:
        """One decode step of the module: request j's token at positions[j], over its row of
        the runner's persistent tables, its KV written first."""
        runner = self.runner
        host = torch.tensor([positions, table_rows], dtype=torch.long)
        vectors = torch.cat([tokens.to(torch.long).view(1, -1),
                             to_device(host, runner.device)])
        graphs = self.graphs
        variant = draft_index % self.mtp.num_modules
        if graphs is not None and len(positions) <= graphs.buckets[-1]:
            return graphs.run(vectors, 1, previous_hidden, variant)
        meta = decode_metadata(runner.rows.table, vectors[1], runner.layout,
                               runner.groups.cp_rank, seq=vectors[2])
        ctx = AttentionContext(meta, runner.kv_caches, runner.groups, runner.backend,
                               runner.config.parallel.kv_exchange)
        return self._eager(draft_index, vectors[0], meta.rep_pos, previous_hidden, ctx)

    def _eager(self, draft_index: int, token_ids: torch.Tensor, positions: torch.Tensor,
               previous_hidden: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        embeds = self.runner.model.model.embed_tokens(token_ids)
        return self.mtp.module_for(draft_index)(StepPositions(positions), embeds,
                                                previous_hidden, ctx)

    def _argmax(self, draft_index: int, hidden: torch.Tensor) -> torch.Tensor:
        # Every TP rank gets the whole vocabulary's logits (the head gathers them).
        return self.mtp.module_for(draft_index).compute_logits(hidden).argmax(dim=-1)

    def _rows_everywhere(self, out: torch.Tensor, inputs: StepInputs, seqs: list[PlannedSeq],
                         wanted: list[tuple[int, int]]) -> torch.Tensor:
        """Rows (request index, offset) of `out`, on every rank. Replicated requests have
        them on every rank; a split one on one PCP rank each, so zero-filled rows summed
        over the PCP group assemble them (replicated ones filled by PCP rank 0 alone)."""
        key = inputs.local_seq * (1 << 32) + inputs.local_offset
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
