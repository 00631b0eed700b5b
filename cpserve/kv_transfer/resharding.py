"""Which blocks and heads each decode rank pulls from which prefill rank.

The two instances may spread a request's KV differently: other tp, pcp, dcp (DESIGN.md,
"Where a token's KV lives"). With the interleave I equal to the block size B, a run of B
tokens `g = t // B` lives whole in one physical block: on shard `g % C`, logical block
`g // C`, at the same offsets `t % B`. So blocks map to blocks, whatever the two layouts:

    B = 4, runs of 4 tokens; prefill C_P = 2 (-pcp 2), decode C_D = 4 (-tp 4 -dcp 4)

    run g                  0    1    2    3    4    5    6    7
    prefill shard, block  0:0  1:0  0:1  1:1  0:2  1:2  0:3  1:3     shard g % 2 : block g // 2
    decode shard, block   0:0  1:0  2:0  3:0  0:1  1:1  2:1  3:1     shard g % 4 : block g // 4

    decode shard 2 pulls runs 2 and 6: prefill shard 0's logical blocks 1 and 3, into its
    own logical blocks 0 and 1 (block ids: each instance's block table of the request).

With equal layouts every rank pulls its own blocks from the same rank of the other side (the
map is the identity, and any I works). Otherwise I == B on both sides is required.

Heads: each decode rank needs the KV heads of its TP slice. The prefill ranks of the right
shard whose heads cover them send those (a slice of theirs when the prefill TP is smaller, a
part each from several ranks when it is larger):

    8 KV heads     prefill tp 2: rank 0 heads 0-3, rank 1 heads 4-7
                   decode  tp 4: rank 0 heads 0-1 <- prefill rank 0, its heads 0-1
                                 rank 1 heads 2-3 <- prefill rank 0, its heads 2-3
                                 rank 2 heads 4-5 <- prefill rank 1, its heads 0-1 ...

A head held by several prefill ranks of one shard (GQA with tp > KV heads, or MLA's latent,
the same on every TP rank) is pulled from exactly one of them, chosen by the decode rank's
number so that decode ranks spread over the copies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cpserve.models.llama import kv_heads_of_rank


@dataclass(frozen=True)
class InstanceLayout:
    """How one instance spreads a request's KV over its ranks (rank = pcp_rank * tp + tp_rank,
    DESIGN.md "Rank layout")."""

    tp: int
    pcp: int
    dcp: int
    interleave: int
    block_size: int
    num_kv_heads: int  # of the model; MLA: 1 latent head, replicated on every TP rank
    latent: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pcp

    @property
    def num_shards(self) -> int:
        return self.pcp * self.dcp

    @property
    def virtual_block_size(self) -> int:
        return self.block_size * self.num_shards

    def cp_rank(self, rank: int) -> int:
        return (rank // self.tp) * self.dcp + (rank % self.tp) % self.dcp

    def heads(self, rank: int) -> range:
        """The KV heads `rank` holds, as indices into the model's KV heads."""
        if self.latent:
            return range(1)
        first, count = kv_heads_of_rank(self.num_kv_heads, self.tp, rank % self.tp)
        return range(first, first + count)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.virtual_block_size)

    def same_placement(self, other: InstanceLayout) -> bool:
        return (self.tp, self.pcp, self.dcp, self.interleave) == (
            other.tp, other.pcp, other.dcp, other.interleave)

    def describe(self) -> str:
        return (f"tp={self.tp} pcp={self.pcp} dcp={self.dcp} "
                f"cp_kv_cache_interleave_size={self.interleave} block_size={self.block_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> InstanceLayout:
        return InstanceLayout(**data)


@dataclass(frozen=True)
class Pull:
    """Blocks one decode rank copies from one prefill rank: heads
    [src_head, src_head + num_heads) of the source rank's cache into heads
    [dst_head, dst_head + num_heads) of its own, block src_blocks[i] into dst_blocks[i]."""

    src_rank: int
    src_head: int  # counted within the source rank's heads
    dst_head: int  # counted within this rank's heads
    num_heads: int
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]


def incompatibility(src: InstanceLayout, dst: InstanceLayout) -> str | None:
    """Why KV cannot move from `src` (prefill) to `dst` (decode), or None."""
    if src.block_size != dst.block_size:
        return (f"block_size differs: the prefill instance uses {src.block_size}, this one "
                f"{dst.block_size}; start both with the same --block-size")
    if (src.num_kv_heads, src.latent) != (dst.num_kv_heads, dst.latent):
        return (f"the instances cache different KV heads ({src.num_kv_heads} against "
                f"{dst.num_kv_heads}): are they serving the same model?")
    if src.same_placement(dst):
        return None
    if src.interleave != src.block_size or dst.interleave != dst.block_size:
        return (f"the layouts differ (prefill {src.describe()}, decode {dst.describe()}): "
                f"KV moves between different layouts only with "
                f"--cp-kv-cache-interleave-size equal to --block-size ({dst.block_size}) on "
                "both instances")
    return None


def plan_pulls(src: InstanceLayout, dst: InstanceLayout, dst_rank: int, first_token: int,
               end_token: int, src_blocks: list[int], dst_blocks: list[int]) -> list[Pull]:
    """What decode rank `dst_rank` pulls to hold tokens [first_token, end_token) of a request.

    `src_blocks` / `dst_blocks`: the request's block table on each instance. `first_token` is
    a multiple of the decode instance's virtual block (its own blocks before it, a prefix-cache
    hit, stay untouched). Whole blocks move, so a block's slots past `end_token` may get
    whatever the prefill block held there: nothing reads them before they are written.
    """
    why = incompatibility(src, dst)
    if why is not None:
        raise ValueError(why)
    if first_token % dst.virtual_block_size:
        raise ValueError(f"first_token {first_token} is not at a decode block boundary")
    if end_token <= first_token:
        return []
    for name, layout, table in (("prefill", src, src_blocks), ("decode", dst, dst_blocks)):
        if len(table) < layout.num_blocks_for(end_token):
            raise ValueError(f"the {name} block table has {len(table)} blocks, fewer than "
                             f"{end_token} tokens need ({layout.num_blocks_for(end_token)})")
    if src.same_placement(dst):
        size = dst.virtual_block_size
        blocks = range(first_token // size, -(-end_token // size))
        return [Pull(dst_rank, 0, 0, len(dst.heads(dst_rank)),
                     tuple(src_blocks[j] for j in blocks), tuple(dst_blocks[j] for j in blocks))]
    size, my_shard = dst.block_size, dst.cp_rank(dst_rank)
    copies: dict[tuple[int, int, int, int], tuple[list[int], list[int]]] = {}
    sources: dict[int, list[tuple[int, int, int, int]]] = {}
    for run in range(first_token // size, -(-end_token // size)):
        if run % dst.num_shards != my_shard:
            continue
        shard = run % src.num_shards
        if shard not in sources:
            sources[shard] = head_sources(src, dst, dst_rank, shard)
        for key in sources[shard]:
            from_blocks, to_blocks = copies.setdefault(key, ([], []))
            from_blocks.append(src_blocks[run // src.num_shards])
            to_blocks.append(dst_blocks[run // dst.num_shards])
    return [Pull(*key, tuple(a), tuple(b)) for key, (a, b) in copies.items()]


def head_sources(src: InstanceLayout, dst: InstanceLayout, dst_rank: int,
                 shard: int) -> list[tuple[int, int, int, int]]:
    """(src_rank, src_head, dst_head, num_heads) segments that cover `dst_rank`'s heads from
    the prefill ranks holding `shard`, one source per head."""
    holders = [r for r in range(src.world_size) if src.cp_rank(r) == shard]
    mine = dst.heads(dst_rank)
    segments: list[tuple[int, int, int, int]] = []
    for head in mine:
        candidates = [r for r in holders if head in src.heads(r)]
        if not candidates:
            raise ValueError(f"no prefill rank of shard {shard} holds KV head {head}")
        rank = candidates[dst_rank % len(candidates)]
        src_head, dst_head = head - src.heads(rank).start, head - mine.start
        if segments:
            last = segments[-1]
            if last[0] == rank and last[1] + last[3] == src_head and last[2] + last[3] == dst_head:
                segments[-1] = (rank, last[1], last[2], last[3] + 1)
                continue
        segments.append((rank, src_head, dst_head, 1))
    return segments
