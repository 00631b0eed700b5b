"""MLA's cached prefix read in the expanded form on the GPU (see forms.py, sharded.py).

A chunk over a cached prefix in an MLA layer (a later chunk of a long prompt, a prefix-cache
hit) has thousands of queries over thousands of cached latents. Absorbed, that is head dim 576
against one latent head in the Triton paged kernel (2.9 s of a 3.4 s DeepSeek-V2-Lite 32k
prefill on an H200, device run 6). Expanded, it is the GQA chunk-over-prefix path at head dim
192 (kernels/prefix_plan.py, gather.py): for each group of queries of one sequence, in pieces
of at most the workspace's tokens,

    gather   the piece's latents [m, 1, L + R] from the paged cache (FP8: dequantized)
    expand   one GEMM with kv_b_proj -> keys [m, H, nope + R], values [m, H, v] (zero-padded
             to the key width: the library ops take one head dim)
    attend   non-causal cuDNN (or FlashAttention) of the group's queries over the piece
    merge    LSE-merge with the pieces before it (Triton)

Rows outside the groups (decodes beside the chunk, short runs) read the prefix absorbed in
the paged kernel, their output taken to value space by W_UV.

The workspace (latents, the GEMM's output, keys, padded values: about 21 KB a token for 16
heads, 177 MB at MLA_PREFIX_PIECE_TOKENS = 8192; at most MLA_PREFIX_WORKSPACE_BYTES) is
reserved when the backend is made, before the KV cache is sized, so the start-up profile
counts it and a long continuation never finds the memory taken; without one (an unplanned
backend) each piece allocates its own buffers. What a piece allocates besides (the library
op's output and the merged result, [queries, H, K] each) is less than what the profiled step
of max_num_batched_tokens new tokens allocates for their own expanded K/V, which the
attention context frees before the prefix part (context.py).
"""

from __future__ import annotations

import torch

from cpserve.attention.backend import AttentionShape
from cpserve.attention.kernels.gather import GatherWork, gather_kv_triton
from cpserve.attention.kernels.merge import merge_two_triton
from cpserve.attention.kernels.prefix_plan import LatentPrefixPlan

# Cached tokens expanded at once: the workspace's rows. 8192 keeps cuDNN's calls large (8k x
# queries) and the workspace under 200 MB for 16 heads; longer prefixes take more pieces.
MLA_PREFIX_PIECE_TOKENS = 8192
# And at most this much workspace (many heads per rank: fewer tokens a piece, at least 1024).
MLA_PREFIX_WORKSPACE_BYTES = 256 << 20


class LatentWorkspace:
    """Buffers for one piece: latents [P, 1, L + R], GEMM output [P, H * (nope + v)], keys
    [P, H, K], values [P, H, K] (channels past v stay 0)."""

    def __init__(self, shape: AttentionShape, tokens: int, device: torch.device) -> None:
        key_dim, v_dim = shape.expanded_dims
        heads, rope = shape.num_heads, shape.k_dim - shape.v_dim
        self.tokens = tokens
        self.latent = torch.empty(tokens, 1, shape.k_dim, dtype=shape.dtype, device=device)
        self.scratch = torch.empty(tokens, heads * (key_dim - rope + v_dim), dtype=shape.dtype,
                                   device=device)
        self.keys = torch.empty(tokens, heads, key_dim, dtype=shape.dtype, device=device)
        self.values = torch.zeros(tokens, heads, key_dim, dtype=shape.dtype, device=device)

    @staticmethod
    def piece_tokens(shape: AttentionShape, max_prefix_tokens: int) -> int:
        """Tokens a piece: MLA_PREFIX_PIECE_TOKENS within MLA_PREFIX_WORKSPACE_BYTES, and no
        more than one request's prefix."""
        fit = max(1024, MLA_PREFIX_WORKSPACE_BYTES // LatentWorkspace.nbytes(shape, 1))
        return max(1, min(MLA_PREFIX_PIECE_TOKENS, fit, max_prefix_tokens))

    @staticmethod
    def nbytes(shape: AttentionShape, tokens: int) -> int:
        key_dim, v_dim = shape.expanded_dims
        rope = shape.k_dim - shape.v_dim
        per_token = shape.k_dim + shape.num_heads * (3 * key_dim - rope + v_dim)
        return tokens * per_token * shape.dtype.itemsize


def _expanded_piece(work: GatherWork, k_cache, block_tables, forms, k_scale: float, dtype,
                    workspace: LatentWorkspace | None):
    """Keys [m, H, K] and zero-padded values [m, H, K] of one piece (views of the workspace)."""
    m, heads = work.num_rows, forms.num_heads
    key_dim = k_cache.shape[-1] - forms.latent_dim + forms.nope
    if workspace is not None and workspace.tokens >= m and workspace.latent.dtype == dtype:
        latent, scratch = workspace.latent[:m], workspace.scratch[:m]
        keys, values = workspace.keys[:m], workspace.values[:m]
    else:
        latent = torch.empty(m, 1, k_cache.shape[-1], dtype=dtype, device=k_cache.device)
        scratch = torch.empty(m, heads * (forms.nope + forms.v_head_dim), dtype=dtype,
                              device=k_cache.device)
        keys = torch.empty(m, heads, key_dim, dtype=dtype, device=k_cache.device)
        values = torch.zeros(m, heads, key_dim, dtype=dtype, device=k_cache.device)
    gather_kv_triton(k_cache, block_tables, work, out=latent, scale=k_scale, dtype=dtype)
    forms.expand_into(latent, scratch, keys, values)
    return keys, values


def run_latent_prefix(backend, plan: LatentPrefixPlan, q, k_cache, block_tables, scale: float,
                      forms, k_scale: float, workspace: LatentWorkspace | None):
    """out [N, H, v], lse [N, H] of q (expanded) over the planned prefixes. `backend` gives
    the library op (`full_op`) and the absorbed paged path (`_run_prefix_plan`)."""
    n, heads, dv = q.shape[0], q.shape[1], forms.v_head_dim
    parts = []
    if plan.groups:
        grouped = q if plan.rows is None else q.index_select(0, plan.rows)
        for group in plan.groups:
            rows = grouped[group.q_lo:group.q_hi]
            running = None
            for work in group.pieces:
                keys, values = _expanded_piece(work, k_cache, block_tables, forms, k_scale,
                                               q.dtype, workspace)
                out, lse = backend.full_op(rows, keys, values, False, scale)
                out = out[..., :dv]
                running = (out, lse) if running is None else merge_two_triton(*running, out, lse)
            parts.append(running)
        if plan.rows is None and plan.absorbed is None and len(parts) == 1:
            return parts[0]
    out = q.new_zeros(n, heads, dv)
    lse = torch.full((n, heads), float("-inf"), dtype=torch.float32, device=q.device)
    if parts:
        group_out = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        group_lse = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        if plan.rows is None:
            out[:group_out.shape[0]], lse[:group_lse.shape[0]] = group_out, group_lse
        else:
            out.index_copy_(0, plan.rows, group_out)
            lse.index_copy_(0, plan.rows, group_lse)
    if plan.absorbed is not None:
        rows = plan.absorbed_rows
        q_abs = forms.cached_query(q if rows is None else q.index_select(0, rows))
        latent = forms.latent_dim
        part_out, part_lse = backend._run_prefix_plan(plan.absorbed, q_abs, k_cache, None,
                                                      block_tables, scale, latent, latent,
                                                      k_scale, k_scale)
        part_out = forms.cached_output(part_out)
        if rows is None:
            return part_out, part_lse
        out.index_copy_(0, rows, part_out)
        lse.index_copy_(0, rows, part_lse)
    return out, lse
