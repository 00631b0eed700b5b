"""The block pool and the KV cache manager, without a model."""

from __future__ import annotations

import pytest

from cpserve.kv.block_pool import BlockPool
from cpserve.kv.layout import KVLayout
from cpserve.kv.manager import KVCacheManager
from cpserve.request import Request, RequestStatus
from cpserve.sampling_params import SamplingParams


def test_allocate_release_and_integrity():
    pool = BlockPool(8)
    a, b = pool.allocate(3), pool.allocate(2)
    assert pool.num_free == 3 and len(set(a + b)) == 5
    pool.check_integrity([a, b])
    with pytest.raises(AssertionError):
        pool.check_integrity([a])  # b's blocks would be leaked
    pool.release(a)
    pool.check_integrity([b])
    with pytest.raises(RuntimeError, match="already free"):
        pool.release(a[:1])
    with pytest.raises(RuntimeError, match="asked for 7"):
        pool.allocate(7)
    assert pool.num_free == 6  # a failed allocation takes nothing


def test_shared_blocks_are_reference_counted():
    pool = BlockPool(4)
    [block] = pool.allocate(1)
    pool.register_hash(block, b"h")
    pool.acquire_cached(block)  # a second request shares it
    pool.check_integrity([[block], [block]])
    pool.release([block])
    assert pool.cached_block(b"h") == block and pool.num_free == 3
    pool.release([block])
    assert pool.num_free == 4 and pool.cached_block(b"h") == block  # free but still findable
    pool.acquire_cached(block)  # revived from the free queue
    pool.check_integrity([[block]])


def test_free_cached_blocks_are_evicted_least_recently_used():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        pool.register_hash(block, bytes([i]))
    pool.release([blocks[1]])
    pool.release([blocks[0]])
    pool.release([blocks[2]])
    [taken] = pool.allocate(1)  # the least recently freed goes first
    assert taken == blocks[1]
    assert pool.cached_block(bytes([1])) is None
    assert pool.cached_block(bytes([0])) == blocks[0]
    pool.check_integrity([[taken]])


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


@pytest.mark.parametrize("shards,interleave", [(1, 1), (2, 1), (4, 2)])
def test_manager_finds_full_virtual_blocks_only(shards, interleave):
    layout = KVLayout(block_size=4, num_shards=shards, interleave=interleave)
    size = layout.virtual_block_size
    kv = KVCacheManager(layout, num_blocks=64, salt=b"s")
    first = _request("a", list(range(3 * size + 1)))
    assert kv.allocate(first, first.num_tokens) is not None
    first.num_computed_tokens = first.num_tokens
    kv.cache_full_blocks(first)

    same_prefix = _request("b", list(range(2 * size)) + [999] * size)
    found = kv.find_cached_prefix(same_prefix)
    assert found == kv.block_table("a")[:2]
    # The whole prompt cached still leaves its last token to compute.
    exact = _request("c", list(range(3 * size)))
    assert len(kv.find_cached_prefix(exact)) == 2
    kv.check_integrity()


def test_salt_and_layout_change_the_hashes():
    tokens = list(range(16))
    hashes = []
    for salt, shards in ((b"x", 1), (b"y", 1), (b"x", 2)):
        kv = KVCacheManager(KVLayout(4, shards, 1), num_blocks=8, salt=salt)
        hashes.append(kv._block_hashes(_request("r", tokens))[0])
    assert len(set(hashes)) == 3


def test_manager_allocation_failure_changes_nothing():
    kv = KVCacheManager(KVLayout(4), num_blocks=3, salt=b"s")
    big = _request("big", list(range(20)))
    assert kv.allocate(big, 20) is None
    assert kv.pool.num_free == 3 and kv.block_table("big") == []
    small = _request("small", list(range(5)))
    assert kv.allocate(small, 5) is not None
    small.status = RequestStatus.FINISHED_ABORTED
    kv.free(small)
    kv.check_integrity()
    assert kv.pool.num_free == 3
