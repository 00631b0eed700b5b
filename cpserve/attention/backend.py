"""The attention backend interface, and the PyTorch reference that runs anywhere.

Every backend offers the same operations: write, paged and dense attention, the LSE merge of
two partial results, and `plan_step`, which prepares on the host, once per step and before
any layer runs, whatever the other calls of that step need (work lists, tile maps, offsets,
already on the device), so that no layer waits for the host. Each attention call takes its
part of that `StepPlans` as `plan=`; without one a backend plans at call time. A GPU kernel
backend must match the reference on random inputs (tests compare them).

Shapes: q [N, H, D]; a KV cache is [num_blocks, B, H_kv, D] on each rank; H is a multiple of
H_kv (grouped-query attention); every attention returns out [N, H, D_v] in q's dtype and
lse [N, H] in fp32, with lse = -inf (and out = 0) for a query that sees no key.

Latent attention (MLA) stores one cache per layer whose first `v_dim` channels are also the
values: its caller passes `v = None` / `v_cache = None` and `v_dim`, and nothing is stored twice.
`latent_prefix_attention` reads such a cache in MLA's expanded form (forms.py): the prefix's
latents are up-projected into per-head keys and values, as the step's new tokens are.

An FP8 (e4m3) cache holds k / k_scale and v / v_scale: `write_kv` quantizes on write,
`paged_attention` dequantizes on load (cpserve/quantization/kv_cache.py); the scales are 1.0
for caches in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from cpserve.attention.merge import merge_two
from cpserve.quantization.fp8 import FP8, divide, to_fp8

if TYPE_CHECKING:
    from cpserve.attention.metadata import StepAttentionMetadata


@dataclass(frozen=True)
class AttentionShape:
    """What every attention call of a model looks like on one rank, known at start-up."""

    num_heads: int  # query heads one call sees (DCP gathers its group's heads first)
    num_kv_heads: int  # KV heads in this rank's cache
    k_dim: int
    v_dim: int  # latent attention: the values are the keys' first v_dim channels
    dtype: torch.dtype  # of queries and new keys and values (the model's)
    values_in_keys: bool = False  # latent attention: one cache, no v_cache
    kv_dtype: torch.dtype | None = None  # of the cache, when it differs (a quantized cache)
    # MLA read expanded (forms.py): per-head (key dim, value dim) of the expanded form, e.g.
    # (192, 128); None when the prefix is never read expanded (other models, DCP).
    expanded_dims: tuple[int, int] | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.kv_dtype or self.dtype


@dataclass(frozen=True)
class StepPlans:
    """What a backend prepared for the attention calls of one step (`plan_step`). Opaque to
    the callers, which hand each call its own part; None: that call plans for itself."""

    rep_dense: Any = None  # replicated tokens over their step's own tokens
    rep_prefix: Any = None  # replicated tokens over the cached prefix
    split_dense: tuple = ()  # split tokens over the exchanged ones: one, or one per ring source
    split_prefix: Any = None  # all split tokens of the PCP group over the cached prefix
    rep_latent_prefix: Any = None  # the same two calls, MLA's prefix read expanded
    split_latent_prefix: Any = None

    def split_dense_for(self, source: int) -> Any:
        return self.split_dense[source] if source < len(self.split_dense) else None


class AttentionBackend(Protocol):
    name: str

    def plan_step(self, meta: StepAttentionMetadata, kv_exchange: str) -> StepPlans:
        """Host-side preparation of a step, from the metadata's host tensors."""

    def write_kv(self, k: torch.Tensor, v: torch.Tensor | None, k_cache: torch.Tensor,
                 v_cache: torch.Tensor | None, slot_mapping: torch.Tensor,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """Store k[i], v[i] in flat slot `slot_mapping[i]`; skip entries that are -1. An
        FP8 cache stores e4m3(k / k_scale), saturating at +-448."""

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor | None, block_tables: torch.Tensor,
                        query_seq: torch.Tensor, query_kv_len: torch.Tensor, scale: float,
                        v_dim: int | None = None, k_scale: float = 1.0,
                        v_scale: float = 1.0,
                        plan: Any = None,
                        queries_per_seq: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query i attends to the first `query_kv_len[i]` slots of sequence
        `query_seq[i]`, whose blocks are `block_tables[query_seq[i]]` (the local slots of
        one shard, in position order; causality is expressed by the lengths). With
        `v_cache=None` the values are `k_cache[..., :v_dim]`. An FP8 cache's keys are
        k_cache * k_scale, its values v_cache * v_scale (k_scale for latent values).
        `queries_per_seq > 1`: the queries are runs of exactly that many rows per sequence
        (a layout hint; the result is the same without it)."""

    def dense_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        q_pos: torch.Tensor, k_pos: torch.Tensor, q_seq: torch.Tensor,
                        k_seq: torch.Tensor, scale: float,
                        plan: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Query i attends to key j iff q_seq[i] == k_seq[j] and k_pos[j] <= q_pos[i]."""

    def latent_prefix_attention(self, q: torch.Tensor, k_cache: torch.Tensor,
                                block_tables: torch.Tensor, query_seq: torch.Tensor,
                                query_kv_len: torch.Tensor, scale: float, forms: Any,
                                k_scale: float = 1.0,
                                plan: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`paged_attention` over a latent cache [num_blocks, B, 1, L + R] in MLA's expanded
        form: q [N, H, nope + R] expanded; the visible tokens' latents (dequantized into q's
        dtype for an FP8 cache) are expanded by `forms.new_kv` into keys [m, H, nope + R] and
        values [m, H, v]. Returns out [N, H, v], lse [N, H]."""

    def merge_two(self, out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                  lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSE merge of two partial results of the same queries (attention/merge.py)."""


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention in fp32. q [n, H, D], k/v [m, H_kv, D], visible [n, m] bool."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q.float(), k) * scale
    scores = scores.masked_fill(~visible.unsqueeze(0), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, n]; -inf where nothing is visible
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))  # exp(-inf) = 0 for hidden keys
    out = torch.einsum("hnm,mhd->nhd", probs, v)
    return out.to(q.dtype), lse.transpose(0, 1).contiguous()


def _stored(x: torch.Tensor, cache: torch.Tensor, scale: float) -> torch.Tensor:
    """What a cache of `cache`'s dtype holds for `x`."""
    return to_fp8(divide(x, scale)) if cache.dtype == FP8 else x.to(cache.dtype)


def _copy_slots(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    flat = cache.view(-1, *cache.shape[2:])
    if flat.dtype == FP8:  # index_copy_ has no FP8 kernel on CPU: copy the bytes
        flat, values = flat.view(torch.uint8), values.view(torch.uint8)
    flat.index_copy_(0, slots, values)


def _cached_rows(cache: torch.Tensor, block_tables: torch.Tensor, query_seq: torch.Tensor,
                 query_kv_len: torch.Tensor):
    """Per sequence with cached tokens to read: its query rows, the (block, offset) index of
    its first max-visible-length cached tokens, and which of them each row sees."""
    block_size = cache.shape[1]
    for seq in torch.unique(query_seq).tolist():
        rows = torch.nonzero(query_seq == seq).squeeze(1)
        lengths = query_kv_len[rows]
        max_len = int(lengths.max())
        if max_len == 0:
            continue
        positions = torch.arange(max_len, device=cache.device)
        blocks = block_tables[seq, positions // block_size]
        visible = positions.unsqueeze(0) < lengths.unsqueeze(1)
        yield rows, (blocks, positions % block_size), visible


def _loaded(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Cache contents as values: FP8 times its scale, in fp32."""
    return x.float() * scale if x.dtype == FP8 else x


class TorchReferenceBackend:
    """Plain PyTorch, one sequence at a time: the specification the kernels are held to."""

    name = "torch"

    def plan_step(self, meta, kv_exchange):
        return StepPlans()

    def merge_two(self, out_a, lse_a, out_b, lse_b):
        return merge_two(out_a, lse_a, out_b, lse_b)

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        _copy_slots(k_cache, slots, _stored(k[keep], k_cache, k_scale))
        if v_cache is not None:
            _copy_slots(v_cache, slots, _stored(v[keep], v_cache, v_scale))

    def paged_attention(self, q, k_cache, v_cache, block_tables, query_seq, query_kv_len, scale,
                        v_dim=None, k_scale=1.0, v_scale=1.0, plan=None, queries_per_seq=1):
        if v_cache is None:
            v_cache, v_scale = k_cache[..., :v_dim], k_scale
        out = q.new_zeros(*q.shape[:2], v_cache.shape[-1])
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for rows, tokens, visible in _cached_rows(k_cache, block_tables, query_seq, query_kv_len):
            k = _loaded(k_cache[tokens], k_scale)
            v = _loaded(v_cache[tokens], v_scale)
            out[rows], lse[rows] = _attend(q[rows], k, v, visible, scale)
        return out, lse

    def latent_prefix_attention(self, q, k_cache, block_tables, query_seq, query_kv_len, scale,
                                forms, k_scale=1.0, plan=None):
        out = q.new_zeros(*q.shape[:2], forms.output_dim(0))
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for rows, tokens, visible in _cached_rows(k_cache, block_tables, query_seq, query_kv_len):
            latent = _loaded(k_cache[tokens], k_scale).to(q.dtype)
            keys, values = forms.new_kv(latent, None, None)
            out[rows], lse[rows] = _attend(q[rows], keys, values, visible, scale)
        return out, lse

    def dense_attention(self, q, k, v, q_pos, k_pos, q_seq, k_seq, scale, plan=None):
        out = q.new_zeros(*q.shape[:2], v.shape[-1])
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
        for seq in torch.unique(q_seq).tolist():
            rows = torch.nonzero(q_seq == seq).squeeze(1)
            cols = torch.nonzero(k_seq == seq).squeeze(1)
            if cols.numel() == 0:
                continue
            visible = k_pos[cols].unsqueeze(0) <= q_pos[rows].unsqueeze(1)
            out[rows], lse[rows] = _attend(q[rows], k[cols], v[cols], visible, scale)
        return out, lse


def get_backend(name: str = "auto", device: str | torch.device = "cpu",
                shape: AttentionShape | None = None,
                max_prefix_tokens: int = 0) -> AttentionBackend:
    """"auto": the GPU backend (Triton kernels, cuDNN / FlashAttention) on CUDA devices, the
    reference elsewhere. "torch" or "gpu" pick one (the GPU backend also runs on CPU under
    TRITON_INTERPRET=1, as the kernel tests do). `shape` lets the GPU backend plan steps
    ahead, and `max_prefix_tokens` sizes its workspace for gathered prefixes (the most cached
    tokens one request holds on a rank)."""
    device_type = torch.device(device).type
    if name == "torch" or (name == "auto" and device_type != "cuda"):
        return TorchReferenceBackend()
    if name in ("gpu", "auto"):
        from cpserve.attention.gpu_backend import GPUBackend  # needs Triton

        return GPUBackend(device, shape=shape, max_prefix_tokens=max_prefix_tokens)
    raise ValueError(f"unknown attention backend {name!r}")
