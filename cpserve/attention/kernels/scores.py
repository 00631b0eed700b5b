"""Attention scores over head dims too wide for one tile (latent attention's 576-wide keys).

    s[rows, cols] = sum over chunks c of  q[rows, c] @ k[cols, c]^T        c = CHUNK_DK channels

Holding a [rows, 576] query tile and a [576, BLOCK_N] key tile at once would pad both to 1024
channels and spill registers; 64-wide chunks divide 576 (and 512) exactly, so nothing is
padded and only one small pair of tiles is live per step. The query chunks are re-read every
key block: they are a few KiB, served by L1/L2, against the key bytes that must come from HBM.
"""

from __future__ import annotations

import triton
import triton.language as tl

WIDE_CHUNK = 64  # channels per chunk when the head dim is over MAX_TILE_DIM
MAX_TILE_DIM = 256  # head dims up to this are one tile (one chunk), as before


def dk_chunking(dk: int) -> tuple[int, int]:
    """(CHUNK_DK, NUM_DK_CHUNKS) for a key dim: one power-of-two tile when it fits."""
    whole = triton.next_power_of_2(dk)
    if whole <= MAX_TILE_DIM:
        return whole, 1
    return WIDE_CHUNK, triton.cdiv(dk, WIDE_CHUNK)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        result = tl.dot(a, b, input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def chunked_scores(q_rows, q_ok, k_cols, k_ok, DK: tl.constexpr, CHUNK_DK: tl.constexpr,
                   NUM_DK_CHUNKS: tl.constexpr, IEEE: tl.constexpr):
    """q_rows [R] / k_cols [N]: pointers to each row's channel 0 (unit channel stride).
    Returns fp32 [R, N]; masked rows and columns contribute 0."""
    d = tl.arange(0, CHUNK_DK)
    qc = tl.load(q_rows[:, None] + d[None, :], mask=q_ok[:, None] & (d[None, :] < DK), other=0.0)
    kc = tl.load(k_cols[None, :] + d[:, None], mask=k_ok[None, :] & (d[:, None] < DK),
                 other=0.0).to(qc.dtype)  # an FP8 cache is read as the query's dtype
    s = dot(qc, kc, IEEE)
    for c in tl.static_range(1, NUM_DK_CHUNKS):
        d = c * CHUNK_DK + tl.arange(0, CHUNK_DK)
        qc = tl.load(q_rows[:, None] + d[None, :], mask=q_ok[:, None] & (d[None, :] < DK),
                     other=0.0)
        kc = tl.load(k_cols[None, :] + d[:, None], mask=k_ok[None, :] & (d[:, None] < DK),
                     other=0.0).to(qc.dtype)
        s += dot(qc, kc, IEEE)
    return s
