"""Block tables of the live requests, on the driver, over the shared `BlockPool`.

A request's block table lists one physical block per *virtual* block of `B * C` tokens (see
`layout.py`); the same table is sent to every rank. With prefix caching on, each full virtual
block is named by a hash chain over its tokens:

    h_0 = H(salt, layout, "",  tokens[0 : V])
    h_j = H(salt, layout, h_{j-1}, tokens[j*V : (j+1)*V])         V = B * C

The salt is random per process, so a user cannot craft prompts whose hashes collide with
someone else's; the layout (B, C, I) is hashed in because it decides which rank holds which
token of a block.
"""

from __future__ import annotations

import hashlib
import os
import struct

from cpserve.kv.block_pool import BlockPool
from cpserve.kv.layout import KVLayout
from cpserve.request import Request


class KVCacheManager:
    def __init__(self, layout: KVLayout, num_blocks: int, enable_prefix_caching: bool = True,
                 salt: bytes | None = None) -> None:
        self.layout = layout
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self._salt = (salt if salt is not None else os.urandom(16)) + struct.pack(
            "<3q", layout.block_size, layout.num_shards, layout.interleave)
        self.block_tables: dict[str, list[int]] = {}
        # Blocks of finished requests held for another instance to read (kv_transfer leases).
        self.leased: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # chain of each request's full blocks
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.layout.virtual_block_size

    def block_table(self, request_id: str) -> list[int]:
        return self.block_tables.get(request_id, [])

    # Prefix caching -------------------------------------------------------------------------
    def _block_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the request's full virtual blocks, extended incrementally."""
        chain = self._hashes.setdefault(request.request_id, [])
        size = self.layout.virtual_block_size
        tokens = request.all_token_ids
        while (len(chain) + 1) * size <= len(tokens):
            start = len(chain) * size
            digest = hashlib.sha256(self._salt)
            digest.update(chain[-1] if chain else b"")
            digest.update(struct.pack(f"<{size}q", *tokens[start:start + size]))
            chain.append(digest.digest())
        return chain

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks already holding a prefix of the request's tokens (not yet acquired).

        At least one token is always left to compute, since its logits give the next token.
        """
        if not self.enable_prefix_caching:
            return []
        size = self.layout.virtual_block_size
        max_blocks = (request.num_tokens - 1) // size
        found = []
        for block_hash in self._block_hashes(request)[:max_blocks]:
            block = self.pool.cached_block(block_hash)
            if block is None:
                break
            found.append(block)
        return found

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count an admitted request's lookup (once, not at every retry while it waits)."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Register the blocks that computed tokens now fill, so later requests can hit them."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables.get(request.request_id, [])
        num_full = request.num_computed_tokens // self.layout.virtual_block_size
        for block, block_hash in zip(table[:num_full], self._block_hashes(request)[:num_full]):
            self.pool.register_hash(block, block_hash)

    # Allocation -----------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int,
                 cached_blocks: list[int] = ()) -> list[int] | None:
        """Grow the request's table to hold `num_computed + num_new` tokens.

        `cached_blocks` (only for a request with no blocks yet) become the table's head.
        Returns the block ids appended (cached ones included), or None, changing nothing, if
        the pool has too few free blocks.
        """
        table = self.block_tables.setdefault(request.request_id, [])
        assert not cached_blocks or not table, "cached prefix only for a fresh request"
        num_cached_tokens = len(cached_blocks) * self.layout.virtual_block_size
        total = max(request.num_computed_tokens, num_cached_tokens) + num_new_tokens
        needed = self.layout.num_blocks_for(total) - len(table) - len(cached_blocks)
        # Cached blocks that sit in the free queue stop being free once acquired.
        revived = sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)
        if needed + revived > self.pool.num_free:
            if not table:
                del self.block_tables[request.request_id]
            return None
        for block in cached_blocks:
            self.pool.acquire_cached(block)
        new_blocks = list(cached_blocks) + self.pool.allocate(max(needed, 0))
        table.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release every block of the request (tail first: see `BlockPool.release`)."""
        table = self.block_tables.pop(request.request_id, [])
        self.pool.release(reversed(table))
        if request.is_finished:
            self._hashes.pop(request.request_id, None)

    def lease(self, request: Request) -> list[int]:
        """Keep a finished request's blocks (cached hashes too) until `release_lease`."""
        table = self.block_tables.pop(request.request_id, [])
        self._hashes.pop(request.request_id, None)
        self.leased[request.request_id] = table
        return table

    def release_lease(self, request_id: str) -> None:
        self.pool.release(reversed(self.leased.pop(request_id, [])))

    def check_integrity(self) -> None:
        self.pool.check_integrity([*self.block_tables.values(), *self.leased.values()])
