"""Where each token's KV lives when a request's cache is spread over C shards.

With C = pcp * dcp shards and interleave size I, tokens go round-robin in runs of I:

    C = 2, I = 2, B = 4 (block_size per rank), virtual block = B * C = 8 tokens

    position t   0  1  2  3  4  5  6  7 | 8  9 10 11 12 13 14 15
    shard(t)     0  0  1  1  0  0  1  1 | 0  0  1  1  0  0  1  1
    local(t)     0  1  0  1  2  3  2  3 | 4  5  4  5  6  7  6  7
                 `-- block_table[0] ----' `-- block_table[1] ---'

    shard(t) = (t // I) % C
    local(t) = (t // (I * C)) * I + t % I      # index among the tokens this shard holds

Because I divides B, `local(t) // B == t // (B * C)`: logical block j of the request covers
positions [j*B*C, (j+1)*B*C) on every shard, and the same physical block id is used on every
rank. On shard(t), the token lives in slot `block_table[t // (B*C)] * B + local(t) % B`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    block_size: int  # B: tokens per physical block on one rank
    num_shards: int = 1  # C = pcp * dcp
    interleave: int = 1  # I

    def __post_init__(self) -> None:
        if self.block_size % self.interleave:
            raise ValueError(f"interleave {self.interleave} must divide block_size {self.block_size}")

    @property
    def virtual_block_size(self) -> int:
        return self.block_size * self.num_shards

    def num_blocks_for(self, num_tokens: int) -> int:
        """Block-table entries needed to hold `num_tokens` tokens of one request."""
        return -(-num_tokens // self.virtual_block_size)

    def shard_of(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions // self.interleave) % self.num_shards

    def local_index(self, positions: torch.Tensor) -> torch.Tensor:
        run = self.interleave * self.num_shards
        return (positions // run) * self.interleave + positions % self.interleave

    def local_count(self, num_tokens: torch.Tensor | int, shard: int) -> torch.Tensor | int:
        """How many of positions [0, num_tokens) live on `shard`.

        Since local(t) grows with t on a shard, these are that shard's first local slots.
        """
        run = self.interleave * self.num_shards
        full_runs = num_tokens // run
        rest = num_tokens - full_runs * run - shard * self.interleave
        if isinstance(rest, torch.Tensor):
            rest = rest.clamp(0, self.interleave)
        else:
            rest = min(max(rest, 0), self.interleave)
        return full_runs * self.interleave + rest

    def slot_mapping(self, positions: torch.Tensor, block_ids: torch.Tensor,
                     shard: int) -> torch.Tensor:
        """Cache slot of each position on `shard`, or -1 where the token lives elsewhere.

        `block_ids[i]` is the physical block holding position i's virtual block.
        """
        local = self.local_index(positions)
        slots = block_ids * self.block_size + local % self.block_size
        return torch.where(self.shard_of(positions) == shard, slots, torch.full_like(slots, -1))
