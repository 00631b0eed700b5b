"""Shared check: after a prefill, each rank's cache holds exactly its shard of the tokens."""

from __future__ import annotations

import torch

from cpserve import LLM, SamplingParams
from cpserve.distributed.groups import ParallelGroups
from cpserve.kv.layout import KVLayout


def assert_each_rank_holds_its_shard(llm: LLM, block_size: int, interleave: int,
                                     num_tokens: int = 37) -> list[int]:
    """Prefill one request, read which cache slots each rank wrote, and check them against
    DESIGN.md's placement. Returns the number of tokens each rank holds."""
    engine = llm.engine
    engine.add_request("placement", list(range(10, 10 + num_tokens)),
                       SamplingParams(max_tokens=4))
    engine.step()  # the whole prompt in one step; the request stays running
    table = torch.tensor(engine.kv.block_table("placement"))
    written = engine.executor.written_slots_per_rank()
    engine.abort_request(["placement"])
    engine.check_integrity()

    p = engine.config.parallel
    layout = KVLayout(block_size, p.num_kv_shards, interleave)
    positions = torch.arange(num_tokens)
    blocks = table[positions // layout.virtual_block_size]
    held_by_shard = {}
    for rank, slots in enumerate(written):
        cp_rank = ParallelGroups(rank=rank, tp=p.tp, pcp=p.pcp, dcp=p.dcp).cp_rank
        expected = layout.slot_mapping(positions, blocks, cp_rank)
        mine = expected >= 0
        assert sorted(slots.tolist()) == sorted(expected[mine].tolist()), f"rank {rank}"
        assert len(slots) == layout.local_count(num_tokens, cp_rank)
        held_by_shard[cp_rank] = set(positions[mine].tolist())
    # The shards partition the tokens: every token on exactly one shard.
    assert sum(len(s) for s in held_by_shard.values()) == num_tokens
    assert set().union(*held_by_shard.values()) == set(range(num_tokens))
    return [len(slots) for slots in written]
