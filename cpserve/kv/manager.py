"""Block tables of the live requests, on the driver, over the shared `BlockPool`.

A request's block table lists one physical block per *virtual* block of `B * C` tokens (see
`layout.py`); the same table is sent to every rank. With prefix caching on, each full virtual
block is named by a hash chain over its tokens:

    h_0 = H(salt, layout, "",  tokens[0 : V])
    h_j = H(salt, layout, h_{j-1}, tokens[j*V : (j+1)*V])         V = B * C

The salt is random per process, so a user cannot craft prompts whose hashes collide with
someone else's; the layout (B, C, I) is hashed in because it decides which rank holds which
token of a block.

Everything the manager knows of one request is one `RequestKV` record, so freeing a request
is one call. Hashes are computed once per newly full block and registered once: a step costs
O(new blocks), not O(blocks held), however long the request has run.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

from cpserve.kv.block_pool import BlockPool
from cpserve.kv.layout import KVLayout
from cpserve.request import Request


@dataclass
class RequestKV:
    """One request's KV bookkeeping on the driver."""

    blocks: list[int] = field(default_factory=list)  # its block table
    # Hash chain of its full virtual blocks; survives a preemption (the tokens stay the same).
    hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0  # leading blocks of `blocks` whose hashes the pool knows


class KVCacheManager:
    def __init__(self, layout: KVLayout, num_blocks: int, enable_prefix_caching: bool = True,
                 salt: bytes | None = None) -> None:
        self.layout = layout
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self._salt = (salt if salt is not None else os.urandom(16)) + struct.pack(
            "<3q", layout.block_size, layout.num_shards, layout.interleave)
        self._requests: dict[str, RequestKV] = {}
        # Blocks of finished requests held for another instance to read (kv_transfer leases).
        self.leased: dict[str, list[int]] = {}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.layout.virtual_block_size

    def block_table(self, request_id: str) -> list[int]:
        held = self._requests.get(request_id)
        return held.blocks if held is not None else []

    @property
    def block_tables(self) -> dict[str, list[int]]:
        """The block table of every request holding blocks."""
        return {rid: held.blocks for rid, held in self._requests.items() if held.blocks}

    # Prefix caching -------------------------------------------------------------------------
    def _block_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the request's full virtual blocks, extended incrementally."""
        chain = self._requests.setdefault(request.request_id, RequestKV()).hashes
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
        """Register the blocks that computed tokens now fill, so later requests can hit them.

        Only blocks whose tokens are all known: with async scheduling a computed position may
        hold a token still being sampled. Its KV is written by a step queued before any step
        that could read the block, so registering it already is safe.
        """
        held = self._requests.get(request.request_id)
        if not self.enable_prefix_caching or held is None:
            return
        known = min(request.num_computed_tokens, request.num_tokens)
        num_full = min(known // self.layout.virtual_block_size, len(held.blocks))
        if num_full <= held.num_registered:
            return
        hashes = self._block_hashes(request)
        for j in range(held.num_registered, num_full):
            self.pool.register_hash(held.blocks[j], hashes[j])
        held.num_registered = num_full

    # Allocation -----------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int,
                 cached_blocks: list[int] = ()) -> list[int] | None:
        """Grow the request's table to hold `num_computed + num_new` tokens.

        `cached_blocks` (only for a request with no blocks yet) become the table's head.
        Returns the block ids appended (cached ones included), or None, changing nothing, if
        the pool has too few free blocks.
        """
        held = self._requests.setdefault(request.request_id, RequestKV())
        table = held.blocks
        assert not cached_blocks or not table, "cached prefix only for a fresh request"
        num_cached_tokens = len(cached_blocks) * self.layout.virtual_block_size
        total = max(request.num_computed_tokens, num_cached_tokens) + num_new_tokens
        needed = self.layout.num_blocks_for(total) - len(table) - len(cached_blocks)
        # Cached blocks that sit in the free queue stop being free once acquired.
        revived = sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)
        if needed + revived > self.pool.num_free:
            return None
        for block in cached_blocks:
            self.pool.acquire_cached(block)
        new_blocks = list(cached_blocks) + self.pool.allocate(max(needed, 0))
        table.extend(new_blocks)
        # Cached blocks are registered already (that is how they were found).
        held.num_registered = max(held.num_registered, len(cached_blocks))
        return new_blocks

    def free(self, request: Request) -> None:
        """Release every block of the request (tail first: see `BlockPool.release`). A
        finished request is forgotten; a preempted one keeps its hashes for its return."""
        held = self._requests.get(request.request_id)
        if held is None:
            return
        self.pool.release(reversed(held.blocks))
        held.blocks, held.num_registered = [], 0
        if request.is_finished:
            del self._requests[request.request_id]

    def lease(self, request: Request) -> list[int]:
        """Keep a finished request's blocks (cached hashes too) until `release_lease`."""
        held = self._requests.pop(request.request_id, None)
        table = held.blocks if held is not None else []
        self.leased[request.request_id] = table
        return table

    def release_lease(self, request_id: str) -> None:
        self.pool.release(reversed(self.leased.pop(request_id, [])))

    def check_integrity(self) -> None:
        self.pool.check_integrity([*(held.blocks for held in self._requests.values()),
                                   *self.leased.values()])
