"""The pool of physical KV blocks, owned by the driver and shared by all ranks.

Block ids are the same on every rank (each rank's copy holds its own shard of the tokens), so
one pool on the driver serves the whole layout. A block is either in use (ref count >= 1, by
one or more requests sharing a cached prefix) or free. Free blocks wait in least-recently-used
order; a free block may still carry a prefix hash and be found again by a later request until
it is handed out for something else (evicted).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Insertion order is eviction order: the first key is the least recently freed.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        """Take `count` free blocks, evicting their cached hashes. Raises if too few."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._forget_hash(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block. Pass a request's blocks tail first, so that the
        end of a prefix is evicted before its start (a start is more likely to be shared)."""
        for block in blocks:
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"KV block {block} released while already free")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None

    # Prefix caching -------------------------------------------------------------------------
    def cached_block(self, block_hash: bytes) -> int | None:
        return self._block_of_hash.get(block_hash)

    def acquire_cached(self, block: int) -> None:
        """Take a reference to a block found by hash, pulling it out of the free queue."""
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def register_hash(self, block: int, block_hash: bytes) -> None:
        """Mark a full block as holding the tokens that `block_hash` names."""
        if self._hash_of[block] is not None or block_hash in self._block_of_hash:
            return  # already cached (maybe in another block computed at the same time)
        self._hash_of[block] = block_hash
        self._block_of_hash[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in range(self.num_blocks):
            self._forget_hash(block)

    def _forget_hash(self, block: int) -> None:
        block_hash = self._hash_of[block]
        if block_hash is not None:
            del self._block_of_hash[block_hash]
            self._hash_of[block] = None

    # Self-check -----------------------------------------------------------------------------
    def check_integrity(self, owners: Iterable[list[int]] = ()) -> None:
        """Assert the pool is consistent with the block lists of the live requests.

        Every block's ref count equals the number of requests holding it; free blocks are
        exactly those with ref count 0; the hash index and the per-block hashes agree.
        """
        expected = [0] * self.num_blocks
        for blocks in owners:
            if len(set(blocks)) != len(blocks):
                raise AssertionError(f"a request holds a block twice: {blocks}")
            for block in blocks:
                expected[block] += 1
        for block in range(self.num_blocks):
            if expected[block] != self.ref_counts[block]:
                raise AssertionError(f"block {block}: ref count {self.ref_counts[block]}, "
                                     f"held by {expected[block]} requests")
            if (self.ref_counts[block] == 0) != (block in self._free):
                raise AssertionError(f"block {block}: ref count {self.ref_counts[block]} but "
                                     f"{'' if block in self._free else 'not '}in the free queue")
        for block_hash, block in self._block_of_hash.items():
            if self._hash_of[block] != block_hash:
                raise AssertionError(f"hash index points at block {block}, which has another hash")
        if sum(h is not None for h in self._hash_of) != len(self._block_of_hash):
            raise AssertionError("a block carries a hash missing from the hash index")
