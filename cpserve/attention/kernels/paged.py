"""Paged attention of queries over one shard's KV cache, returning LSE (Triton).

Contract: `TorchReferenceBackend.paged_attention`. Query i attends to the first
`query_kv_len[i]` local slots of sequence `query_seq[i]`, found through its block table.

One program = (query tile, KV head [, head part], split):

    query tile     1 query (decode mode) or up to BLOCK_Q consecutive rows of one sequence
                   (tiled mode: a chunk continuing over a cached prefix)
    KV head        the G = H / H_kv query heads sharing it are the rows of one matrix, so
                   each K/V block is read once for all of them:
                       rows = BLOCK_Q queries x BLOCK_G heads (>= 16 rows for tl.dot)
                   A group too wide for the accumulator budget (rows x DV fp32, TUNING
                   "acc_budget") is cut into head parts, one program each: MLA's 512-wide
                   values give 32 rows, so V3's 128 heads make 4 parts. Each part re-reads
                   the K/V blocks (L2 serves the repeats); splitting DV instead would also
                   recompute the 576-wide scores once per part.
    split          the tile's context is cut into `num_splits` equal ranges (split-K), so a
                   single long sequence still fills the GPU; each range gives a partial
                   (out, lse), merged afterwards by the LSE-merge kernel.

    context of a query:  |-- split 0 --|-- split 1 --|-- split 2 --|      ranges scale with
    slots:               [blk t[0]][blk t[1]][blk t[2]] ...               each query's length
                          B tokens   B tokens

Keys wider than 256 channels (MLA: 576 = 512 latent + 64 rope, one KV head, values = the
first 512 key channels, `v_cache=None`) are scored in 64-wide chunks (scores.py), so no
576-wide query or key tile is live; the value tile is then read at full DV width, mostly
from L1/L2 since the same bytes were just read as keys.

An FP8 cache (e4m3) is read as the query's dtype; its scales cost nothing per element:
k_scale joins the softmax scale, v_scale multiplies each output once.

Decode mode needs nothing from the host but shapes, so it is safe inside a CUDA graph: the
number of splits depends only on the block-table width, and each program sizes its range
from its own query's length at run time. Tiled mode needs its tiles (`PagedTiles`): the
engine plans them on the host with the step's metadata (kernels/prefix_plan.py), so no layer
waits for the host; a call without them plans them itself, which synchronises. A
verification step of speculative decoding (`queries_per_seq = q`: every sequence has exactly
q consecutive rows, padding rows of length 0) needs no host at all: its tiles follow from
shapes and their lengths are computed on the device (`uniform_tiles`), so it replays in a
CUDA graph too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cpserve.attention.kernels.merge import _merge_kernel
from cpserve.attention.kernels.scores import MAX_TILE_DIM, chunked_scores, dk_chunking, dot

LOG2E = 1.4426950408889634
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tuning knobs, read at every call (a benchmark may set them). A call's mode picks its prefix
# ("" decode, "tiled_", "verify_"; with wide heads "wide_", "wide_tiled_", "wide_verify_"); a
# knob its mode does not set is the unprefixed one.
TUNING = {
    "block_n": 64,  # KV tokens per inner step
    "rows_per_tile": 64,  # BLOCK_Q * BLOCK_G in tiled mode
    "target_programs_per_sm": 2,  # split-K until about this many programs per SM
    "min_split_tokens": 256,  # no split shorter than this
    "max_splits": 64,
    "num_warps": 4,
    "num_stages": 3,
    # fp32 accumulator elements per program (rows x value channels): bounds the rows of one
    # program, so latent attention's 512-wide values split query heads across programs.
    "acc_budget": 16384,
    # Head dims over 256 (latent attention, DK 576 / DV 512): own settings, since their
    # [rows, DV] accumulator and V tile are 2-4x those of a 128-wide head. Decode: 4 warps
    # read 8 x 32k latent tokens in 131 us against 175 us with 8 (H200, run 7).
    "wide_block_n": 32,
    "wide_num_warps": 4,
    "wide_num_stages": 2,
    "wide_tiled_block_n": 32,
    "wide_tiled_num_warps": 8,
    "wide_tiled_num_stages": 2,
    # Tiled mode (many queries of a sequence: a chunk over its prefix when the library path
    # is off, or too short for it), tuned apart from decode: its tiles are compute-bound.
    "tiled_block_n": 64,
    "tiled_num_warps": 4,
    "tiled_num_stages": 3,
    # Verification steps of speculative decoding (1 + K rows a sequence, `queries_per_seq`):
    # memory-bound like decode, with 2-8x its rows a program, tuned apart from both
    # (benchmarks/profile_spec_decode.py --paged-sweep, run 7): 8 x 32k x 5 rows of the 8B
    # shape in 310 us against 555 us with decode's settings (decode: 302 us for 1 row).
    "verify_block_n": 128,
    "verify_num_warps": 4,
    "verify_num_stages": 3,
    "verify_target_programs_per_sm": 8,
    "wide_verify_block_n": 32,
    "wide_verify_num_warps": 4,
    "wide_verify_num_stages": 2,
    # Latent attention's blocks read once for scores and values (the query in registers)
    # instead of in 64-wide chunks for the scores and again for the values: decode 8 x 32k
    # 132 -> 117 us, 1 x 32k 48.7 -> 44.0 us; verification no faster (402 -> 422 us), so it
    # keeps the chunks (run 7's third sweep).
    "latent_blocks": False,
    "wide_latent_blocks": True,
}
# A measured setting can be handed to every process of a run (benchmarks do).
TUNING.update(json.loads(os.environ.get("CPSERVE_PAGED_TUNING", "{}")))


def _knob(prefix: str, name: str) -> int:
    """The knob `name` of the mode whose prefix is `prefix` (else the unprefixed one)."""
    return TUNING.get(prefix + name, TUNING[name])


@triton.jit
def _paged_step(start, hi, lens, qv, q_pe, q_rows, row_ok, m_i, l_i, acc, table, k_cache,
                v_cache, kv_head, dv, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, scale_log2,
                PAGE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CHUNK_DK: tl.constexpr,
                NUM_DK_CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                LATENT: tl.constexpr, PE: tl.constexpr):
    """One block of BLOCK_N context tokens: online-softmax update of (m, l, acc)."""
    offs = start + tl.arange(0, BLOCK_N)
    valid = offs < hi
    block = tl.load(table + offs // PAGE, mask=valid, other=0).to(tl.int64)
    in_page = offs % PAGE
    k_cols = k_cache + block * sk_b + in_page * sk_s + kv_head * sk_h
    if LATENT:  # values = the first DV key channels: one [BLOCK_N, DV] load serves both dots
        kl = tl.load(k_cols[:, None] + dv[None, :], mask=valid[:, None],
                     other=0.0).to(qv.dtype)
        pe = DV + tl.arange(0, PE)
        kp = tl.load(k_cols[None, :] + pe[:, None], mask=valid[None, :],
                     other=0.0).to(qv.dtype)
        s = dot(qv, tl.trans(kl), IEEE) + dot(q_pe, kp, IEEE)
    elif NUM_DK_CHUNKS == 1:  # the query tile stays in registers across blocks
        dk = tl.arange(0, CHUNK_DK)
        kt = tl.load(k_cols[None, :] + dk[:, None], mask=valid[None, :] & (dk[:, None] < DK),
                     other=0.0).to(q_rows.dtype.element_ty)
        s = dot(qv, kt, IEEE)
    else:
        s = chunked_scores(q_rows, row_ok, k_cols, valid, DK, CHUNK_DK, NUM_DK_CHUNKS, IEEE)
    s = tl.where(offs[None, :] < lens[:, None], s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if LATENT:
        vt = kl
    else:
        vt = tl.load(v_cache + block[:, None] * sv_b + in_page[:, None] * sv_s
                     + kv_head * sv_h + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV),
                     other=0.0).to(q_rows.dtype.element_ty)
    pv = dot(p.to(vt.dtype), vt, IEEE)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _paged_kernel(q, k_cache, v_cache, block_tables, query_seq, kv_len, tile_first, tile_rows,
                  tile_lens, out, lse, part_out, part_lse, scale_log2, v_scale, num_splits,
                  sq_n, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sbt_s,
                  so_n, so_h, sl_n, spo_n, spo_h, spo_s, spl_n, spl_h,
                  G: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_PARTS: tl.constexpr,
                  BLOCK_Q: tl.constexpr, PAGE: tl.constexpr, DK: tl.constexpr,
                  DV: tl.constexpr, CHUNK_DK: tl.constexpr, NUM_DK_CHUNKS: tl.constexpr,
                  BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, TILED: tl.constexpr,
                  SPLIT: tl.constexpr, IEEE: tl.constexpr, INTERPRET: tl.constexpr,
                  LATENT: tl.constexpr, PE: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_PARTS
    head_part = tl.program_id(1) % HEAD_PARTS
    split = tl.program_id(2)
    if TILED:
        first = tl.load(tile_first + tile).to(tl.int64)
        count = tl.load(tile_rows + tile)
        tile_len = tl.load(tile_lens + tile)  # the longest context of the tile's rows
    else:
        first = tile.to(tl.int64)
        count = 1
        tile_len = tl.load(kv_len + first)
    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    head_in_group = head_part * BLOCK_G + rows % BLOCK_G
    row_ok = (rows // BLOCK_G < count) & (head_in_group < G)
    query = first + rows // BLOCK_G
    head = kv_head * G + head_in_group
    seq = tl.load(query_seq + first)
    lens = tl.load(kv_len + query, mask=row_ok, other=0)
    per_split = tl.cdiv(tl.cdiv(tile_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, tile_len)

    dv = tl.arange(0, BLOCK_DV)
    q_rows = q + query * sq_n + head * sq_h
    q_pe = 0.0
    if LATENT:  # the query's latent and rope parts stay in registers across blocks
        qv = tl.load(q_rows[:, None] + dv[None, :], mask=row_ok[:, None], other=0.0)
        pe = DV + tl.arange(0, PE)
        q_pe = tl.load(q_rows[:, None] + pe[None, :], mask=row_ok[:, None], other=0.0)
    elif NUM_DK_CHUNKS == 1:
        dk = tl.arange(0, CHUNK_DK)
        qv = tl.load(q_rows[:, None] + dk[None, :], mask=row_ok[:, None] & (dk[None, :] < DK),
                     other=0.0)
    else:  # wide keys: each step reads the query in chunks (scores.py)
        qv = 0.0
    m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_DV], tl.float32)
    table = block_tables + seq * sbt_s
    if INTERPRET:  # Triton's interpreter cannot take tensors as range() bounds
        start = lo
        while start < hi:
            m_i, l_i, acc = _paged_step(start, hi, lens, qv, q_pe, q_rows, row_ok, m_i, l_i,
                                        acc, table, k_cache, v_cache, kv_head, dv, sk_b, sk_s,
                                        sk_h, sv_b, sv_s, sv_h, scale_log2, PAGE, DK, DV,
                                        CHUNK_DK, NUM_DK_CHUNKS, BLOCK_N, IEEE, LATENT, PE)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _paged_step(start, hi, lens, qv, q_pe, q_rows, row_ok, m_i, l_i,
                                        acc, table, k_cache, v_cache, kv_head, dv, sk_b, sk_s,
                                        sk_h, sv_b, sv_s, sv_h, scale_log2, PAGE, DK, DV,
                                        CHUNK_DK, NUM_DK_CHUNKS, BLOCK_N, IEEE, LATENT, PE)

    seen = l_i > 0
    result = acc / tl.where(seen, l_i, 1.0)[:, None] * v_scale
    row_lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
    if SPLIT:
        tl.store(part_out + query[:, None] * spo_n + head[:, None] * spo_h + split * spo_s
                 + dv[None, :], result, mask=row_ok[:, None] & (dv[None, :] < DV))
        tl.store(part_lse + query * spl_n + head * spl_h + split, row_lse, mask=row_ok)
    else:
        tl.store(out + query[:, None] * so_n + head[:, None] * so_h + dv[None, :],
                 result.to(out.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
        tl.store(lse + query * sl_n + head, row_lse, mask=row_ok)


_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: small, so that the tests exercise split-K
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def num_splits_for(num_programs: int, max_len_bound: int, device: torch.device,
                   programs_per_sm: int | None = None) -> int:
    """Split-K factor from shapes alone: enough programs to fill the GPU (about
    `programs_per_sm` each, default TUNING's), no split shorter than `min_split_tokens` of the
    longest possible context."""
    per_sm = TUNING["target_programs_per_sm"] if programs_per_sm is None else programs_per_sm
    wanted = per_sm * _sm_count(device)
    if num_programs >= wanted:
        return 1
    by_length = max(1, max_len_bound // TUNING["min_split_tokens"])
    return max(1, min(-(-wanted // num_programs), by_length, TUNING["max_splits"]))


@dataclass(frozen=True)
class PagedTiles:
    """Tiled mode's work list, on the device: tile i is rows [first[i], first[i] + rows[i])
    of one sequence, whose longest context is tile_lens[i]; at most `queries` rows a tile."""

    first: torch.Tensor
    rows: torch.Tensor
    tile_lens: torch.Tensor
    queries: int

    @property
    def num_tiles(self) -> int:
        return self.first.numel()


def wants_tiles(num_queries: int, num_seqs: int) -> bool:
    """Tiled mode when queries are many per sequence: tiles share each K/V load."""
    return num_queries > max(2 * num_seqs, 64)


def tile_queries(group: int, v_dim: int, acc_budget: int | None = None) -> int:
    """Queries of one tile: `rows_per_tile` rows of BLOCK_G heads each, within the
    accumulator budget (wider values, fewer rows)."""
    budget = TUNING["acc_budget"] if acc_budget is None else acc_budget
    rows_cap = max(16, budget // triton.next_power_of_2(v_dim))
    return max(1, min(TUNING["rows_per_tile"], rows_cap) // triton.next_power_of_2(group))


def plan_tiles(query_seq: torch.Tensor, rows_per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of at most `rows_per_tile` consecutive query rows of one sequence.

        query_seq  0 0 0 0 0 1 1 2      rows_per_tile = 2
        tiles      [0 1][2 3][4][5 6][7]   -> first = 0 2 4 5 7, rows = 2 2 1 2 1
    """
    seq = query_seq.cpu()
    n = seq.numel()
    change = torch.nonzero(seq[1:] != seq[:-1]).squeeze(1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), change])
    ends = torch.cat([change, torch.tensor([n])])
    per_run = -(-(ends - starts) // rows_per_tile)
    run_of_tile = torch.repeat_interleave(torch.arange(len(starts)), per_run)
    before = torch.cumsum(per_run, 0) - per_run
    index_in_run = torch.arange(int(per_run.sum())) - before[run_of_tile]
    first = starts[run_of_tile] + index_in_run * rows_per_tile
    rows = torch.minimum(ends[run_of_tile] - first, torch.tensor(rows_per_tile))
    return first, rows.to(torch.int32)


def plan_tiles_now(query_seq: torch.Tensor, query_kv_len: torch.Tensor,
                   queries: int) -> PagedTiles:
    """Tiles of a call that brought none: host work on device tensors (a synchronisation)."""
    seq, lens = query_seq.cpu(), query_kv_len.cpu().long()
    first, rows = plan_tiles(seq, queries)
    tile_of_row = torch.repeat_interleave(torch.arange(first.numel()), rows.long())
    tile_lens = torch.zeros(first.numel(), dtype=torch.long).scatter_reduce(
        0, tile_of_row, lens, "amax")
    device = query_seq.device
    return PagedTiles(first.to(device), rows.to(device), tile_lens.to(device), queries)


def uniform_tiles(query_kv_len: torch.Tensor, queries_per_seq: int, queries: int) -> PagedTiles:
    """The tiles of a call whose sequences have exactly `queries_per_seq` consecutive rows
    each, at most `queries` rows a tile, computed on the device (no host sync, graph-safe):

        queries_per_seq = 5, queries = 4:   rows 0-4 of seq 0 -> tiles [0-3] [4]
                                            rows 5-9 of seq 1 -> tiles [5-8] [9]
    """
    q, device = queries_per_seq, query_kv_len.device
    num_seqs = query_kv_len.shape[0] // q
    per_seq = -(-q // queries)
    tile = torch.arange(num_seqs * per_seq, device=device)
    part = tile % per_seq
    first = (tile // per_seq) * q + part * queries
    rows = (q - part * queries).clamp(max=queries).to(torch.int32)
    lens = F.pad(query_kv_len.view(num_seqs, q), (0, per_seq * queries - q))
    return PagedTiles(first, rows, lens.view(num_seqs * per_seq, queries).amax(dim=1),
                      queries)


def verification_queries(queries_per_seq: int, group: int, v_dim: int) -> int:
    """Queries a tile of a verification step (`queries_per_seq` rows a sequence)."""
    prefix = "wide_verify_" if v_dim > MAX_TILE_DIM else "verify_"
    budget = _knob(prefix, "acc_budget")
    return min(triton.next_power_of_2(queries_per_seq), tile_queries(group, v_dim, budget))


def verification_tiles(query_kv_len: torch.Tensor, queries_per_seq: int, group: int,
                       v_dim: int) -> PagedTiles:
    """The tiles `paged_attention_triton` makes for a verification step, on the device from
    shapes. A caller with many layers over the same lengths makes them once and passes them
    as `tiles` with `queries_per_seq`."""
    return uniform_tiles(query_kv_len, queries_per_seq,
                         verification_queries(queries_per_seq, group, v_dim))


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                           block_tables: torch.Tensor, query_seq: torch.Tensor,
                           query_kv_len: torch.Tensor, scale: float, v_dim: int | None = None,
                           tiled: bool | None = None, tiles: PagedTiles | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0,
                           queries_per_seq: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `TorchReferenceBackend.paged_attention`.

    `tiles` given: tiled mode over them. `queries_per_seq > 1`: the rows are runs of exactly
    that many per sequence (a verification step, its own tuning), tiled on the device by
    `verification_tiles` unless `tiles` brings them. Otherwise `tiled=None`
    picks the mode from shapes: decode mode (no host synchronisation) unless the queries are
    many per sequence (`wants_tiles`), when tiles of consecutive rows share each K/V load;
    tiles planned here cost a host synchronisation.
    """
    num_queries, num_heads, dk = q.shape
    values_in_keys = v_cache is None
    if v_cache is None:  # latent attention: the values are key channels
        v_cache, v_scale = k_cache[..., :v_dim], k_scale
    dv = v_cache.shape[-1]
    page, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty(num_queries, num_heads, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_queries, num_heads, dtype=torch.float32, device=q.device)
    if num_queries == 0:
        return out, lse
    if q.stride(-1) != 1:
        q = q.contiguous()
    block_tables, query_seq = block_tables.contiguous(), query_seq.contiguous()
    query_kv_len = query_kv_len.contiguous()
    wide = max(dk, dv) > MAX_TILE_DIM
    verify = queries_per_seq > 1 and tiled is not False
    prefix = ("wide_" if wide else "") + ("verify_" if verify else "")

    def knob(name: str) -> int:
        return _knob(prefix, name)

    if verify and tiles is None:
        tiles = verification_tiles(query_kv_len, queries_per_seq, group, dv)
    if tiles is None and (wants_tiles(num_queries, block_tables.shape[0]) if tiled is None
                          else tiled):
        tiles = plan_tiles_now(query_seq, query_kv_len, tile_queries(group, dv))
    tiled = tiles is not None
    if tiled and not verify:
        prefix = "wide_tiled_" if wide else "tiled_"
    block_g = triton.next_power_of_2(group)
    block_dv = triton.next_power_of_2(dv)
    rows_cap = max(16, knob("acc_budget") // block_dv)
    if tiled:
        block_q, num_tiles = tiles.queries, tiles.num_tiles
        first, rows, tile_lens = tiles.first, tiles.rows, tiles.tile_lens
    else:
        block_q, num_tiles = 1, num_queries
        first = rows = tile_lens = query_seq  # unused
    # Heads of one KV head per program; a wide group is cut into parts, each re-reading the
    # K/V blocks (from L2) rather than splitting DV, which would recompute the scores.
    heads_per_part = min(block_g, max(1, rows_cap // block_q))
    head_parts = triton.cdiv(group, heads_per_part)
    heads_per_part = max(heads_per_part, 16 // block_q)
    chunk_dk, num_dk_chunks = dk_chunking(dk)
    # Latent blocks: values are the first DV key channels and the rest (rope) a power of two,
    # so each block is read once for both products, the query held across blocks.
    latent = (wide and values_in_keys and bool(knob("latent_blocks")) and dv == block_dv
              and dk - dv >= 16 and triton.next_power_of_2(dk - dv) == dk - dv)
    splits = num_splits_for(num_tiles * num_kv_heads * head_parts, block_tables.shape[1] * page,
                            q.device, knob("target_programs_per_sm"))
    if splits > 1:
        part_out = torch.empty(num_queries, num_heads, splits, dv, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(num_queries, num_heads, splits, dtype=torch.float32,
                               device=q.device)
    else:
        part_out, part_lse = out, lse  # unused
    _paged_kernel[(num_tiles, num_kv_heads * head_parts, splits)](
        q, k_cache, v_cache, block_tables, query_seq, query_kv_len, first, rows, tile_lens,
        out, lse, part_out, part_lse, scale * k_scale * LOG2E, float(v_scale), splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), lse.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2) if splits > 1 else 0,
        part_lse.stride(0), part_lse.stride(1),
        G=group, BLOCK_G=heads_per_part, HEAD_PARTS=head_parts, BLOCK_Q=block_q, PAGE=page,
        DK=dk, DV=dv, CHUNK_DK=chunk_dk, NUM_DK_CHUNKS=num_dk_chunks, BLOCK_DV=block_dv,
        BLOCK_N=knob("block_n"), TILED=tiled, SPLIT=splits > 1,
        IEEE=q.dtype == torch.float32, INTERPRET=INTERPRETING, LATENT=latent,
        PE=dk - dv if latent else 16, num_warps=knob("num_warps"),
        num_stages=knob("num_stages"))
    if splits > 1:
        _merge_kernel[(num_queries * num_heads,)](
            part_out, part_lse, out, lse, num_heads,
            part_out.stride(2), part_out.stride(0), part_out.stride(1),
            part_lse.stride(2), part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            S=splits, D=dv, BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=triton.next_power_of_2(dv), num_warps=1 if dv <= 128 else 4)
    return out, lse
