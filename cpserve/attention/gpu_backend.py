"""The GPU attention backend: Triton kernels and PyTorch's library attention, same contract
as `TorchReferenceBackend` (the tests hold it to that).

    write_kv         Triton scatter into the paged cache
    paged_attention  decode-shaped calls: Triton split-K paged kernel, GQA-aware
                     (kernels/paged.py); prefill-shaped calls (a chunk over a cached prefix,
                     many queries of one sequence seeing the same prefix): the prefix is
                     gathered into contiguous K/V (kernels/gather.py) and attended by cuDNN
                     non-causal, or FlashAttention-2 varlen for many groups
                     (kernels/prefix_plan.py); PREFIX_ATTENTION picks that or the Triton
                     kernel's tiled mode
    dense_attention  small steps: Triton masked kernel (no host sync, CUDA-graph safe);
                     large steps: planned into causal / full pieces (kernels/dense_plan.py)
                     run by cuDNN (one long sequence: ~600 TFLOP/s on H200) or
                     FlashAttention-2 varlen (many sequences, one call), LSE-merged;
                     irregular layouts: the Triton masked kernel, exact for any mask.
    merge_two        Triton LSE merge of a chunk's own part and its prefix part

An FP8 KV cache (`--kv-cache-dtype fp8`, e4m3 with per-layer k_scale / v_scale) is read by
every path: the Triton kernels load e4m3 and fold the scales in (kernels/paged.py), and the
gather dequantizes the prefix into the model's dtype for the library ops (its workspace is in
that dtype), so a chunk over an FP8 prefix keeps the library path.

`plan_step` builds every plan of a step on the host from the metadata, once, before the
layers run, with its index tensors on the device: the layers then only launch kernels, never
wait for the host. A call without a plan builds one itself (tests, benchmarks), which costs
a host synchronisation; `host_plans` counts those.

Latent attention (DeepSeek MLA, absorbed: keys 576 = 512 + 64, values = the keys' first 512
channels) runs in the Triton kernels, which read keys over 256 channels in 64-wide chunks
(kernels/scores.py). Its dense steps take the masked kernel at every size: the library ops
take head dims up to LIBRARY_MAX_HEAD_DIM. MLA's expanded form (keys 192, values 128) does go
to the library ops, its values zero-padded to the key width (the ops take one head dim for
q, k and v; the padding's output channels are 0 and dropped), and so does its cached prefix
(`latent_prefix_attention`, latent_prefix.py: gathered latents expanded in pieces into a
workspace, then the library op, rows of small groups absorbed in the Triton kernel). Shapes the kernels do not
cover go to the reference, and say so in `fallbacks`: key dims over MAX_KERNEL_KEY_DIM or value dims over MAX_KERNEL_VALUE_DIM.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F

from cpserve.attention.backend import AttentionShape, StepPlans, TorchReferenceBackend
from cpserve.attention.kernels import (
    masked_attention_triton,
    merge_attention_states_triton,
    paged_attention_triton,
    write_kv_triton,
)
from cpserve.attention.kernels.dense_plan import DensePlan, build_dense_plan
from cpserve.attention.kernels.gather import gather_kv_triton
from cpserve.attention.kernels.library_ops import (
    cudnn_attention,
    flash_varlen_attention,
    prefer_cudnn_shape_reuse,
    probe_ops,
)
from cpserve.attention.kernels.merge import merge_two_triton
from cpserve.attention.kernels.paged import (
    tile_queries,
    uniform_tiles,
    verification_queries,
    wants_tiles,
)
from cpserve.attention.kernels.prefix_plan import (
    LibraryPart,
    PrefixPlan,
    build_latent_prefix_plan,
    build_prefix_plan,
)
from cpserve.attention.latent_prefix import (
    MLA_PREFIX_PIECE_TOKENS,
    LatentWorkspace,
    run_latent_prefix,
)
from cpserve.quantization.fp8 import FP8

# Steps with at most this many (query, key) pairs take the masked kernel: decode batches
# (graph-captured) and short chunks, where planning would cost more than it saves.
SMALL_DENSE_PAIRS = 1 << 18
# Keys are read in chunks (any width; the chunk loop is unrolled, so keep it bounded); values
# are one fp32 accumulator row per query head in registers: 512 (MLA's latent) at most.
MAX_KERNEL_KEY_DIM = 1024
MAX_KERNEL_VALUE_DIM = 512
# cuDNN is called once per piece; with more pieces than this, one FlashAttention varlen
# call is cheaper.
MAX_CUDNN_PIECES = 8
# cuDNN and FlashAttention-2 take head dims up to 256.
LIBRARY_MAX_HEAD_DIM = 256
# Runs of fewer query rows (a decode beside a chunk) are not worth a cuDNN call, whose
# smallest shapes are its least tested: the masked kernel answers them, exact for any mask.
MIN_CUDNN_RUN_ROWS = 16
# How a block of queries attends to a cached prefix (a chunk continuing a prompt): the
# prefix gathered into contiguous K/V, then non-causal cuDNN ("gather-cudnn") or
# FlashAttention-2 varlen ("gather-flash"); or the Triton paged kernel's tiled mode reading
# K/V through the block table ("triton"). benchmarks/bench_chunk_attention.py measures all
# three and prints which to set here.
PREFIX_ATTENTION = "gather-cudnn"


def _kernel_dims(dk: int, dv: int) -> bool:
    return dk <= MAX_KERNEL_KEY_DIM and dv <= MAX_KERNEL_VALUE_DIM


def _anchor(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


class _PlanCache:
    """Plans for the index tensors of the current step. Every layer passes the same metadata
    tensors (or views of them), so a plan is built once per step. Entries hold weak
    references: once a step's metadata is gone, its plan can never be returned again."""

    def __init__(self, size: int = 8) -> None:
        self._entries: OrderedDict = OrderedDict()
        self._size = size

    def get(self, tensors: tuple[torch.Tensor, ...], build):
        key = tuple((id(_anchor(t)), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
                    for t in tensors)
        entry = self._entries.get(key)
        if entry is not None and all(ref() is not None for ref in entry[0]):
            self._entries.move_to_end(key)
            return entry[1]
        plan = build()
        self._entries[key] = ([weakref.ref(_anchor(t)) for t in tensors], plan)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return plan


class _PlacedPlan:
    """A step's dense plan with its index tensors already on the device, so the layers copy
    nothing from the host. `plan` None: the layout is irregular (the masked kernel runs)."""

    def __init__(self, plan: DensePlan | None, device: torch.device, num_queries: int,
                 num_keys: int) -> None:
        self.plan = plan
        self.num_queries, self.num_keys = num_queries, num_keys
        self.key_order = (None if plan is None or plan.key_order is None
                          else plan.key_order.to(device, non_blocking=True))
        # Pieces for cuDNN, one by one: those of runs long enough; the short runs' rows go to
        # the masked kernel together (`short_rows`, None when there are none).
        self.library_pieces: tuple = ()
        self.short_rows = None
        if plan is not None:
            short = [(a, b) for a, b in plan.runs if b - a < MIN_CUDNN_RUN_ROWS]
            short_starts = {a for a, _ in short}
            self.library_pieces = tuple(p for p in plan.pieces if p.q_lo not in short_starts)
            if short:
                rows = torch.cat([torch.arange(a, b) for a, b in short])
                self.short_rows = rows.to(device, non_blocking=True)
        # For one variable-length call: pieces tile all rows (varlen_causal), so the row
        # offsets of the sequences are the run ends.
        self.run_offsets = None
        if plan is not None and plan.varlen_causal:
            offsets = torch.tensor([0] + [p.q_hi for p in plan.pieces], dtype=torch.int32)
            self.run_offsets = offsets.to(device, non_blocking=True)

    @staticmethod
    def build(q_pos, k_pos, q_seq, k_seq, device: torch.device) -> _PlacedPlan:
        return _PlacedPlan(build_dense_plan(q_pos, k_pos, q_seq, k_seq), device, q_pos.numel(),
                           k_pos.numel())


def _check_plan(name: str, planned: tuple[int, ...], called: tuple[int, ...]) -> None:
    """A plan made for other rows would give wrong answers: refuse it (a host-side check)."""
    if planned != called:
        raise ValueError(f"{name} plan was made for {planned} rows, the call has {called}")


def _plans_dense(num_queries: int, num_keys: int) -> bool:
    """Large enough for library pieces; smaller steps take the masked kernel, unplanned."""
    return num_queries * num_keys > SMALL_DENSE_PAIRS


def _library_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


class GPUBackend:
    name = "gpu"

    def __init__(self, device: torch.device | str = "cuda", probe: bool = True,
                 shape: AttentionShape | None = None, max_prefix_tokens: int = 0) -> None:
        self.device = torch.device(device)
        self.reference = TorchReferenceBackend()
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            prefer_cudnn_shape_reuse()  # before the first cuDNN call (the probe's)
        self.ops = probe_ops(self.device) if on_cuda and probe else {"cudnn": False,
                                                                     "flash": False}
        # `ops` holds at head dim 128; other dims (MLA expanded: 192) are probed on first use.
        self._probe_dims = on_cuda and probe
        self._ops_by_dim: dict[int, dict[str, bool]] = {}
        self.shape = shape
        self.fallbacks: set[str] = set()  # which reference fallbacks were taken
        self.host_plans = 0  # plans built at call time (each a host synchronisation)
        self._plans = _PlanCache()
        # Library calls, replaceable (the CPU tests plan with reference pieces).
        self.causal_op = self._library_piece
        self.full_op = self._library_piece
        self.prefix_attention = PREFIX_ATTENTION
        # Gathered prefix K/V: one request's whole local cache, reserved before the KV cache
        # is sized, so that a long continuation never finds the memory taken.
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        if shape is not None and max_prefix_tokens > 0 and self._library_prefix(shape):
            # In the model's dtype: the gather dequantizes an FP8 cache into it.
            self._workspace = tuple(torch.empty(max_prefix_tokens, shape.num_kv_heads, dim,
                                                dtype=shape.dtype, device=self.device)
                                    for dim in (shape.k_dim, shape.v_dim))
        # MLA's prefix read expanded, in pieces of this many tokens (latent_prefix.py).
        self.latent_piece_tokens = MLA_PREFIX_PIECE_TOKENS
        self._latent_workspace: LatentWorkspace | None = None
        if shape is not None and max_prefix_tokens > 0 and self._latent_library(shape):
            self.latent_piece_tokens = LatentWorkspace.piece_tokens(shape, max_prefix_tokens)
            self._latent_workspace = LatentWorkspace(shape, self.latent_piece_tokens,
                                                     self.device)

    def _library(self) -> bool:
        return self.ops["cudnn"] or self.ops["flash"]

    def ops_for(self, head_dim: int) -> dict[str, bool]:
        """Which library ops take this head dim."""
        if not self._probe_dims or head_dim == 128:
            return self.ops
        if head_dim not in self._ops_by_dim:
            self._ops_by_dim[head_dim] = probe_ops(self.device, head_dim=head_dim)
        return self._ops_by_dim[head_dim]

    def _library_prefix(self, shape: AttentionShape) -> bool:
        """Whether a prefix is gathered for the library ops: equal key and value widths, half
        precision, values stored apart, and the tuning choice. A cache in the model's dtype is
        copied; an FP8 cache is dequantized by the gather into the model's dtype."""
        return (self.prefix_attention != "triton" and self._library()
                and not shape.values_in_keys and shape.k_dim == shape.v_dim
                and _library_dtype(shape.dtype) and shape.cache_dtype in (shape.dtype, FP8)
                and _kernel_dims(shape.k_dim, shape.v_dim))

    def _latent_library(self, shape: AttentionShape) -> bool:
        """Whether MLA's prefix is read expanded by the library ops (latent_prefix.py): a
        latent cache with expanded dims, half precision, the ops taking the expanded key
        width, and the tuning choice."""
        if (not shape.values_in_keys or shape.expanded_dims is None
                or self.prefix_attention == "triton" or not _library_dtype(shape.dtype)
                or shape.cache_dtype not in (shape.dtype, FP8)
                or shape.expanded_dims[0] > LIBRARY_MAX_HEAD_DIM):
            return False
        ops = self.ops_for(shape.expanded_dims[0])
        return ops["cudnn"] or ops["flash"]

    # planning -------------------------------------------------------------------------------
    def plan_step(self, meta, kv_exchange: str) -> StepPlans:
        """Every plan of the step, from the metadata's host tensors (before they move)."""
        if self.shape is None or (meta.rep_decode_only and not meta.has_split):
            return StepPlans()  # decode: the kernels need nothing but shapes
        num_seqs = meta.num_seqs
        dense = self._library() and _library_dtype(self.shape.dtype)  # else the masked kernel
        rep_dense = rep_prefix = split_prefix = rep_latent = split_latent = None
        latent = self._latent_library(self.shape)
        split_dense: tuple = ()
        if meta.has_replicated and not meta.rep_decode_only:
            if dense and _plans_dense(meta.rep_pos.numel(), meta.rep_pos.numel()):
                rep_dense = _PlacedPlan.build(meta.rep_pos, meta.rep_pos, meta.rep_seq,
                                              meta.rep_seq, self.device)
            if meta.has_rep_prefix:
                rep_prefix = self._prefix_plan(meta.rep_seq, meta.rep_prefix_len, num_seqs,
                                               self.shape)
                if latent:
                    rep_latent = self._latent_plan(meta.rep_seq, meta.rep_prefix_len, num_seqs)
        if meta.has_split:
            pad, keys = meta.pad, meta.gathered_pos.numel()
            sources = ([slice(0, keys)] if kv_exchange != "ring" or keys == pad
                       else [slice(p, p + pad) for p in range(0, keys, pad)])
            split_dense = tuple(
                _PlacedPlan.build(meta.split_pos, meta.gathered_pos[rows], meta.split_seq,
                                  meta.gathered_seq[rows], self.device)
                if dense and _plans_dense(meta.split_pos.numel(), rows.stop - rows.start)
                else None
                for rows in sources)
            if meta.has_prefix:
                split_prefix = self._prefix_plan(meta.gathered_seq.clamp(min=0),
                                                 meta.gathered_prefix_len, num_seqs, self.shape)
                if latent:
                    split_latent = self._latent_plan(meta.gathered_seq.clamp(min=0),
                                                     meta.gathered_prefix_len, num_seqs)
        return StepPlans(rep_dense, rep_prefix, split_dense, split_prefix, rep_latent,
                         split_latent)

    def _latent_plan(self, query_seq, query_kv_len, num_seqs: int):
        shape = self.shape
        return build_latent_prefix_plan(
            query_seq, query_kv_len, num_seqs, self.device,
            piece_tokens=self.latent_piece_tokens,
            tile_queries=tile_queries(shape.num_heads // shape.num_kv_heads, shape.v_dim))

    def _prefix_plan(self, query_seq, query_kv_len, num_seqs: int,
                     shape: AttentionShape) -> PrefixPlan:
        library = self._library_prefix(shape)
        capacity = None if self._workspace is None else self._workspace[0].shape[0]
        return build_prefix_plan(query_seq, query_kv_len, num_seqs, self.device,
                                 library=library, gather_capacity=capacity,
                                 tile_queries=tile_queries(shape.num_heads // shape.num_kv_heads,
                                                           shape.v_dim))

    # write ----------------------------------------------------------------------------------
    def write_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def merge_two(self, out_a, lse_a, out_b, lse_b):
        return merge_two_triton(out_a, lse_a, out_b, lse_b)

    # paged ----------------------------------------------------------------------------------
    def paged_attention(self, q, k_cache, v_cache, block_tables, query_seq, query_kv_len, scale,
                        v_dim=None, k_scale=1.0, v_scale=1.0, plan=None, queries_per_seq=1):
        dv = v_dim if v_cache is None else v_cache.shape[-1]
        if not _kernel_dims(q.shape[-1], dv):
            self.fallbacks.add(f"paged: head dims {q.shape[-1]}/{dv}")
            return self.reference.paged_attention(q, k_cache, v_cache, block_tables, query_seq,
                                                  query_kv_len, scale, v_dim, k_scale, v_scale)
        if plan is None and queries_per_seq > 1:  # a verification step: tiles from shapes,
            size = verification_queries(queries_per_seq, q.shape[1] // k_cache.shape[2], dv)
            by_size = self._plans.get((query_kv_len,), dict)  # made on the device once a step
            if size not in by_size:
                by_size[size] = uniform_tiles(query_kv_len, queries_per_seq, size)
            tiles = by_size[size]
            return paged_attention_triton(q, k_cache, v_cache, block_tables, query_seq,
                                          query_kv_len, scale, v_dim, tiles=tiles,
                                          k_scale=k_scale, v_scale=v_scale,
                                          queries_per_seq=queries_per_seq)
        if plan is None and wants_tiles(q.shape[0], block_tables.shape[0]):
            shape = AttentionShape(q.shape[1], k_cache.shape[2], q.shape[-1], dv, q.dtype,
                                   values_in_keys=v_cache is None, kv_dtype=k_cache.dtype)
            plan = self._plans.get((query_seq, query_kv_len), lambda: self._host_plan(
                query_seq, query_kv_len, block_tables.shape[0], shape))
        if plan is None:  # decode-shaped: one query per program row
            return paged_attention_triton(q, k_cache, v_cache, block_tables, query_seq,
                                          query_kv_len, scale, v_dim, tiled=False,
                                          k_scale=k_scale, v_scale=v_scale)
        _check_plan("prefix", (plan.num_queries,), (q.shape[0],))
        return self._run_prefix_plan(plan, q, k_cache, v_cache, block_tables, scale, v_dim, dv,
                                     k_scale, v_scale)

    def latent_prefix_attention(self, q, k_cache, block_tables, query_seq, query_kv_len, scale,
                                forms, k_scale=1.0, plan=None):
        if plan is None:
            shape = AttentionShape(q.shape[1], 1, k_cache.shape[-1], forms.latent_dim, q.dtype,
                                   values_in_keys=True, kv_dtype=k_cache.dtype,
                                   expanded_dims=(q.shape[-1], forms.v_head_dim))
            if not self._latent_library(shape):  # the absorbed paged path, in value space
                out, lse = self.paged_attention(forms.cached_query(q), k_cache, None,
                                                block_tables, query_seq, query_kv_len, scale,
                                                forms.latent_dim, k_scale, k_scale)
                return forms.cached_output(out), lse
            self.host_plans += 1
            plan = build_latent_prefix_plan(
                query_seq, query_kv_len, block_tables.shape[0], self.device,
                piece_tokens=self.latent_piece_tokens,
                tile_queries=tile_queries(q.shape[1], forms.latent_dim))
        _check_plan("latent prefix", (plan.num_queries,), (q.shape[0],))
        return run_latent_prefix(self, plan, q, k_cache, block_tables, scale, forms, k_scale,
                                 self._latent_workspace)

    def _host_plan(self, query_seq, query_kv_len, num_seqs: int, shape: AttentionShape):
        self.host_plans += 1
        return self._prefix_plan(query_seq, query_kv_len, num_seqs, shape)

    def _run_prefix_plan(self, plan: PrefixPlan, q, k_cache, v_cache, block_tables, scale,
                         v_dim, dv, k_scale=1.0, v_scale=1.0):
        lib, tri = plan.library, plan.triton
        num_heads = q.shape[1]
        scales = {"k_scale": k_scale, "v_scale": v_scale}
        if lib is not None and lib.rows is None and tri is None:  # one group, rows in order
            return self._library_prefix_part(lib, q, k_cache, v_cache, block_tables, scale,
                                             **scales)
        if tri is not None and tri.rows is None and lib is None:
            return paged_attention_triton(q, k_cache, v_cache, block_tables, tri.seq,
                                          tri.kv_len, scale, v_dim, tiles=tri.tiles,
                                          tiled=tri.tiles is not None, **scales)
        out = q.new_zeros(q.shape[0], num_heads, dv)
        lse = torch.full((q.shape[0], num_heads), float("-inf"), dtype=torch.float32,
                         device=q.device)
        if lib is not None:
            part_out, part_lse = self._library_prefix_part(lib, q.index_select(0, lib.rows),
                                                           k_cache, v_cache, block_tables, scale,
                                                           **scales)
            out.index_copy_(0, lib.rows, part_out)
            lse.index_copy_(0, lib.rows, part_lse)
        if tri is not None:
            part_out, part_lse = paged_attention_triton(
                q.index_select(0, tri.rows), k_cache, v_cache, block_tables, tri.seq,
                tri.kv_len, scale, v_dim, tiles=tri.tiles, tiled=tri.tiles is not None,
                **scales)
            out.index_copy_(0, tri.rows, part_out)
            lse.index_copy_(0, tri.rows, part_lse)
        return out, lse

    def _library_prefix_part(self, lib: LibraryPart, q, k_cache, v_cache, block_tables, scale,
                             k_scale=1.0, v_scale=1.0):
        """The library rows (grouped, in `lib.pieces` order) over their gathered prefixes. An
        FP8 cache is gathered into the queries' dtype, dequantized with the layer's scales
        (the same numbers the step's own K/V were rounded to: context.py)."""
        k_buf = v_buf = None
        if self._workspace is not None and self._workspace[0].shape[0] >= lib.gather.num_rows \
                and self._workspace[0].dtype == q.dtype:
            k_buf, v_buf = (w[:lib.gather.num_rows] for w in self._workspace)
        k = gather_kv_triton(k_cache, block_tables, lib.gather, out=k_buf, scale=k_scale,
                             dtype=q.dtype)
        v = gather_kv_triton(v_cache, block_tables, lib.gather, out=v_buf, scale=v_scale,
                             dtype=q.dtype)
        use_cudnn = (self.prefix_attention == "gather-cudnn" and self.ops["cudnn"]
                     and len(lib.pieces) <= MAX_CUDNN_PIECES)
        if not use_cudnn and self.ops["flash"]:
            return flash_varlen_attention(q, k, v, lib.cu_q, lib.cu_k, lib.max_q, lib.max_k,
                                          False, scale)
        results = [self.full_op(q[a:b], k[c:d], v[c:d], False, scale)
                   for a, b, c, d in lib.pieces]
        if len(results) == 1:
            return results[0]
        return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])

    # dense ----------------------------------------------------------------------------------
    def dense_attention(self, q, k, v, q_pos, k_pos, q_seq, k_seq, scale, plan=None):
        dk, dv = q.shape[-1], v.shape[-1]
        if not _kernel_dims(dk, dv):
            self.fallbacks.add(f"dense: head dims {dk}/{dv}")
            return self.reference.dense_attention(q, k, v, q_pos, k_pos, q_seq, k_seq, scale)
        ops = self.ops_for(dk) if dv <= dk <= LIBRARY_MAX_HEAD_DIM else {}
        library = (ops.get("cudnn") or ops.get("flash")) and _library_dtype(q.dtype)
        if not _plans_dense(q.shape[0], k.shape[0]) or not library:
            return masked_attention_triton(q, k, v, q_pos, k_pos, q_seq, k_seq, scale)
        if plan is None:
            plan = self._plans.get((q_pos, k_pos, q_seq, k_seq), lambda: self._host_dense_plan(
                q_pos, k_pos, q_seq, k_seq, q.device))
        _check_plan("dense", (plan.num_queries, plan.num_keys), (q.shape[0], k.shape[0]))
        if plan.plan is None:
            self.fallbacks.add("dense: irregular layout, masked kernel")
            return masked_attention_triton(q, k, v, q_pos, k_pos, q_seq, k_seq, scale)
        if dv < dk:  # the library ops take one head dim: values zero-padded, padding dropped
            out, lse = self._run_plan(plan, q, k, F.pad(v, (0, dk - dv)), q_pos, k_pos, q_seq,
                                      k_seq, scale)
            return out[..., :dv], lse
        return self._run_plan(plan, q, k, v, q_pos, k_pos, q_seq, k_seq, scale)

    def _host_dense_plan(self, q_pos, k_pos, q_seq, k_seq, device) -> _PlacedPlan:
        self.host_plans += 1
        return _PlacedPlan.build(q_pos, k_pos, q_seq, k_seq, device)

    def _run_plan(self, placed: _PlacedPlan, q, k, v, q_pos, k_pos, q_seq, k_seq, scale):
        plan, ops = placed.plan, self.ops_for(q.shape[-1])
        if not plan.pieces:
            return (q.new_zeros(*q.shape[:2], v.shape[-1]),
                    torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device))
        if plan.varlen_causal and (len(plan.pieces) > MAX_CUDNN_PIECES or not ops["cudnn"]) \
                and ops["flash"]:
            longest = max(p.q_hi - p.q_lo for p in plan.pieces)
            return flash_varlen_attention(q, k, v, placed.run_offsets, placed.run_offsets,
                                          longest, longest, True, scale)
        keys, values = k, v
        if placed.key_order is not None:
            keys, values = k.index_select(0, placed.key_order), v.index_select(0, placed.key_order)
        pieces = placed.library_pieces
        if placed.short_rows is None and len(pieces) == 1 \
                and (pieces[0].q_lo, pieces[0].q_hi) == (0, q.shape[0]):
            piece = pieces[0]  # one run covering every row: its piece is the answer
            op = self.causal_op if piece.causal else self.full_op
            return op(q, keys[piece.k_lo:piece.k_hi], values[piece.k_lo:piece.k_hi],
                      piece.causal, scale)
        out = torch.zeros(*q.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        by_run: dict[int, list] = {}
        for piece in pieces:
            op = self.causal_op if piece.causal else self.full_op
            result = op(q[piece.q_lo:piece.q_hi], keys[piece.k_lo:piece.k_hi],
                        values[piece.k_lo:piece.k_hi], piece.causal, scale)
            by_run.setdefault(piece.q_lo, []).append((piece.q_hi, result))
        for q_lo, results in by_run.items():
            q_hi = results[0][0]
            if len(results) == 1:
                run_out, run_lse = results[0][1]
            elif len(results) == 2:
                (out_a, lse_a), (out_b, lse_b) = results[0][1], results[1][1]
                run_out, run_lse = merge_two_triton(out_a, lse_a, out_b, lse_b)
            else:
                run_out, run_lse = merge_attention_states_triton(
                    torch.stack([r[1][0] for r in results]),
                    torch.stack([r[1][1] for r in results]))
            out[q_lo:q_hi], lse[q_lo:q_hi] = run_out, run_lse
        if placed.short_rows is not None:
            rows = placed.short_rows
            short_out, short_lse = masked_attention_triton(
                q.index_select(0, rows), k, v, q_pos.index_select(0, rows), k_pos,
                q_seq.index_select(0, rows), k_seq, scale)
            out.index_copy_(0, rows, short_out)
            lse.index_copy_(0, rows, short_lse)
        return out, lse

    def _library_piece(self, q, k, v, causal: bool, scale: float):
        """One contiguous piece: causal pieces are square (see dense_plan.py)."""
        if self.ops_for(q.shape[-1])["cudnn"]:
            return cudnn_attention(q, k, v, causal, scale)
        # Offsets from host memory without a blocking copy (no cuDNN: FlashAttention alone).
        cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32).to(q.device, non_blocking=True)
        cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32).to(q.device, non_blocking=True)
        return flash_varlen_attention(q, k, v, cu_q, cu_k, q.shape[0], k.shape[0], causal, scale)
