"""The GPU attention backend: Triton kernels and PyTorch's library attention, same contract
as `TorchReferenceBackend` (the tests hold it to that).

    write_kv         Triton scatter into the paged cache
    paged_attention  Triton split-K paged kernel, GQA-aware (kernels/paged.py)
    dense_attention  small steps: Triton masked kernel (no host sync, CUDA-graph safe);
                     large steps: planned into causal / full pieces (kernels/dense_plan.py)
                     run by cuDNN (one long sequence: ~600 TFLOP/s on H200) or
                     FlashAttention-2 varlen (many sequences, one call), LSE-merged;
                     irregular layouts: the Triton masked kernel, exact for any mask.

Latent attention (DeepSeek MLA, absorbed: keys 576 = 512 + 64, values = the keys' first 512
channels) runs in the Triton kernels, which read keys over 256 channels in 64-wide chunks
(kernels/scores.py). Its dense steps take the masked kernel at every size, as the library ops
need equal key and value dims. Shapes the kernels do not cover go to the reference, and say
so in `fallbacks`: key dims over MAX_KERNEL_KEY_DIM or value dims over MAX_KERNEL_VALUE_DIM.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from cpserve.attention.backend import TorchReferenceBackend
from cpserve.attention.kernels import (
    masked_attention_triton,
    merge_attention_states_triton,
    paged_attention_triton,
    write_kv_triton,
)
from cpserve.attention.kernels.dense_plan import DensePlan, build_dense_plan
from cpserve.attention.kernels.library_ops import (
    cudnn_attention,
    flash_varlen_attention,
    probe_ops,
)

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
    """A step's dense plan with its index tensors already on the device. Built once per step
    (the plan cache hands it to every layer), so the layers copy nothing from the host."""

    def __init__(self, plan: DensePlan, device: torch.device) -> None:
        self.plan = plan
        self.key_order = (None if plan.key_order is None
                          else plan.key_order.to(device, non_blocking=True))
        # For one variable-length call: pieces tile all rows (varlen_causal), so the row
        # offsets of the sequences are the run ends.
        self.run_offsets = (torch.tensor([0] + [p.q_hi for p in plan.pieces], dtype=torch.int32,
                                         device=device) if plan.varlen_causal else None)

    @staticmethod
    def build(q_pos, k_pos, q_seq, k_seq, device: torch.device) -> _PlacedPlan | None:
        plan = build_dense_plan(q_pos, k_pos, q_seq, k_seq)
        return None if plan is None else _PlacedPlan(plan, device)


class GPUBackend:
    name = "gpu"

    def __init__(self, device: torch.device | str = "cuda", probe: bool = True) -> None:
        self.device = torch.device(device)
        self.reference = TorchReferenceBackend()
        on_cuda = self.device.type == "cuda"
        self.ops = probe_ops(self.device) if on_cuda and probe else {"cudnn": False,
                                                                     "flash": False}
        self.fallbacks: set[str] = set()  # which reference fallbacks were taken
        self._plans = _PlanCache()
        # Library calls, replaceable (the CPU tests plan with reference pieces).
        self.causal_op = self._library_piece
        self.full_op = self._library_piece

    # write ----------------------------------------------------------------------------------
    def write_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    # paged ----------------------------------------------------------------------------------
    def paged_attention(self, q, k_cache, v_cache, block_tables, query_seq, query_kv_len, scale,
                        v_dim=None, k_scale=1.0, v_scale=1.0):
        dv = v_dim if v_cache is None else v_cache.shape[-1]
        if not _kernel_dims(q.shape[-1], dv):
            self.fallbacks.add(f"paged: head dims {q.shape[-1]}/{dv}")
            return self.reference.paged_attention(q, k_cache, v_cache, block_tables, query_seq,
                                                  query_kv_len, scale, v_dim, k_scale, v_scale)
        return paged_attention_triton(q, k_cache, v_cache, block_tables, query_seq,
                                      query_kv_len, scale, v_dim, k_scale=k_scale,
                                      v_scale=v_scale)

    # dense ----------------------------------------------------------------------------------
    def dense_attention(self, q, k, v, q_pos, k_pos, q_seq, k_seq, scale):
        dk, dv = q.shape[-1], v.shape[-1]
        if not _kernel_dims(dk, dv):
            self.fallbacks.add(f"dense: head dims {dk}/{dv}")
            return self.reference.dense_attention(q, k, v, q_pos, k_pos, q_seq, k_seq, scale)
        library = ((self.ops["cudnn"] or self.ops["flash"]) and dk == dv
                   and q.dtype in (torch.float16, torch.bfloat16))
        if q.shape[0] * k.shape[0] <= SMALL_DENSE_PAIRS or not library:
            return masked_attention_triton(q, k, v, q_pos, k_pos, q_seq, k_seq, scale)
        plan = self._plans.get((q_pos, k_pos, q_seq, k_seq),
                               lambda: _PlacedPlan.build(q_pos, k_pos, q_seq, k_seq, q.device))
        if plan is None:
            self.fallbacks.add("dense: irregular layout, masked kernel")
            return masked_attention_triton(q, k, v, q_pos, k_pos, q_seq, k_seq, scale)
        return self._run_plan(plan, q, k, v, scale)

    def _run_plan(self, placed: _PlacedPlan, q, k, v, scale):
        plan = placed.plan
        out = torch.zeros(*q.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        if not plan.pieces:
            return out, lse
        if plan.varlen_causal and (len(plan.pieces) > MAX_CUDNN_PIECES or not self.ops["cudnn"]) \
                and self.ops["flash"]:
            longest = max(p.q_hi - p.q_lo for p in plan.pieces)
            return flash_varlen_attention(q, k, v, placed.run_offsets, placed.run_offsets,
                                          longest, longest, True, scale)
        if placed.key_order is not None:
            k, v = k.index_select(0, placed.key_order), v.index_select(0, placed.key_order)
        by_run: dict[int, list] = {}
        for piece in plan.pieces:
            op = self.causal_op if piece.causal else self.full_op
            result = op(q[piece.q_lo:piece.q_hi], k[piece.k_lo:piece.k_hi],
                        v[piece.k_lo:piece.k_hi], piece.causal, scale)
            by_run.setdefault(piece.q_lo, []).append((piece.q_hi, result))
        for q_lo, results in by_run.items():
            q_hi = results[0][0]
            if len(results) == 1:
                run_out, run_lse = results[0][1]
            else:
                run_out, run_lse = merge_attention_states_triton(
                    torch.stack([r[1][0] for r in results]),
                    torch.stack([r[1][1] for r in results]))
            out[q_lo:q_hi], lse[q_lo:q_hi] = run_out, run_lse
        return out, lse

    def _library_piece(self, q, k, v, causal: bool, scale: float):
        """One contiguous piece: causal pieces are square (see dense_plan.py)."""
        if self.ops["cudnn"]:
            return cudnn_attention(q, k, v, causal, scale)
        cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32, device=q.device)
        return flash_varlen_attention(q, k, v, cu_q, cu_k, q.shape[0], k.shape[0], causal, scale)
