"""The re-sharding map: decode ranks that copy the blocks `plan_pulls` names from the prefill
ranks' caches end up with exactly the KV their own layout would have written, for every pair
of layouts, GQA and MLA; pulls never touch blocks outside the requested range.

Caches are simulated: each rank's cache is filled from one global K tensor with the rank's
slot mapping (`KVLayout`, as the engine writes it), so no model runs here.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from cpserve.kv.layout import KVLayout
from cpserve.kv_transfer.resharding import InstanceLayout, incompatibility, plan_pulls

BLOCK = 4
HEAD_DIM = 3


def _layouts(kv_heads: int, latent: bool, interleave: int) -> list[InstanceLayout]:
    """Every valid (tp, pcp, dcp) with at most 8 ranks, as config.py's rules allow."""
    out = []
    for tp, pcp in itertools.product((1, 2, 4), (1, 2)):
        for dcp in (1, 2, 4):
            if latent:
                ok = tp % dcp == 0
            elif tp >= kv_heads:
                ok = tp % kv_heads == 0 and (tp // kv_heads) % dcp == 0
            else:
                ok = kv_heads % tp == 0 and dcp == 1
            if ok:
                out.append(InstanceLayout(tp, pcp, dcp, interleave, BLOCK, kv_heads, latent))
    return out


def _caches(layout: InstanceLayout, kv: torch.Tensor, table: list[int],
            num_blocks: int) -> list[torch.Tensor]:
    """Each rank's cache [blocks, BLOCK, heads, dim] holding tokens of `kv` [T, H, D]."""
    kv_layout = KVLayout(BLOCK, layout.num_shards, layout.interleave)
    positions = torch.arange(kv.shape[0])
    block_ids = torch.tensor(table)[positions // layout.virtual_block_size]
    caches = []
    for rank in range(layout.world_size):
        heads = layout.heads(rank)
        cache = torch.full((num_blocks, BLOCK, len(heads), HEAD_DIM), float("nan"))
        slots = kv_layout.slot_mapping(positions, block_ids, layout.cp_rank(rank))
        mine = slots >= 0
        cache.view(-1, len(heads), HEAD_DIM)[slots[mine]] = kv[mine][:, heads.start:heads.stop]
        caches.append(cache)
    return caches


def _check(src: InstanceLayout, dst: InstanceLayout, num_tokens: int, first: int) -> None:
    heads = src.num_kv_heads
    kv = torch.randn(num_tokens, heads, HEAD_DIM)
    gen = torch.Generator().manual_seed(num_tokens)
    num_blocks = 64
    src_table = torch.randperm(num_blocks, generator=gen)[:src.num_blocks_for(num_tokens)].tolist()
    dst_table = torch.randperm(num_blocks, generator=gen)[:dst.num_blocks_for(num_tokens)].tolist()
    src_caches = _caches(src, kv, src_table, num_blocks)
    expected = _caches(dst, kv, dst_table, num_blocks)
    end = num_tokens - 1  # the decode instance computes the last prompt token itself
    sources_used = set()
    for rank in range(dst.world_size):
        got = torch.full_like(expected[rank], float("nan"))
        for pull in plan_pulls(src, dst, rank, first, end, src_table, dst_table):
            sources_used.add(pull.src_rank)
            part = src_caches[pull.src_rank][list(pull.src_blocks), :,
                                             pull.src_head:pull.src_head + pull.num_heads]
            dst_view = got[:, :, pull.dst_head:pull.dst_head + pull.num_heads]
            dst_view[list(pull.dst_blocks)] = part
        kv_layout = KVLayout(BLOCK, dst.num_shards, dst.interleave)
        positions = torch.arange(first, end)
        block_ids = torch.tensor(dst_table)[positions // dst.virtual_block_size]
        slots = kv_layout.slot_mapping(positions, block_ids, dst.cp_rank(rank))
        slots = slots[slots >= 0]
        flat_got = got.view(-1, *got.shape[2:])
        flat_expected = expected[rank].view(-1, *got.shape[2:])
        case = f"{src.describe()} -> {dst.describe()}, rank {rank}, tokens [{first}, {end})"
        assert not torch.isnan(flat_got[slots]).any(), f"{case}: a slot was not pulled"
        torch.testing.assert_close(flat_got[slots], flat_expected[slots], rtol=0, atol=0,
                                   msg=case)
        # Nothing outside the request's blocks from `first` on is written.
        touched = {int(b) for b in torch.nonzero(~torch.isnan(got).flatten(1).all(1)).squeeze(1)}
        allowed = set(dst_table[first // dst.virtual_block_size:])
        assert touched <= allowed, f"{case}: wrote blocks {sorted(touched - allowed)}"


@pytest.mark.parametrize(("kv_heads", "latent"), [(1, False), (2, False), (8, False),
                                                  (1, True)], ids=["kv1", "kv2", "kv8", "mla"])
def test_every_layout_pair_gets_its_own_layouts_kv(kv_heads, latent):
    layouts = _layouts(kv_heads, latent, BLOCK)
    for src, dst in itertools.product(layouts, layouts):
        for num_tokens in (2, BLOCK * 7 + 3):
            _check(src, dst, num_tokens, 0)
        # A decode-side prefix hit: pull from the next decode block on.
        _check(src, dst, BLOCK * 16 + 1, dst.virtual_block_size)


def test_equal_layouts_move_blocks_as_they_are_with_any_interleave():
    for layout in _layouts(2, False, 1) + _layouts(2, False, 2):
        _check(layout, layout, 23, 0)
        pulls = plan_pulls(layout, layout, 0, 0, 23, list(range(20)), list(range(20, 40)))
        assert [p.src_rank for p in pulls] == [0]


def test_each_head_comes_from_one_source_and_copies_are_spread():
    src = InstanceLayout(tp=4, pcp=1, dcp=1, interleave=BLOCK, block_size=BLOCK,
                         num_kv_heads=1, latent=True)  # MLA: the latent on all 4 TP ranks
    dst = InstanceLayout(tp=2, pcp=1, dcp=1, interleave=BLOCK, block_size=BLOCK,
                         num_kv_heads=1, latent=True)
    per_rank = [plan_pulls(src, dst, rank, 0, 40, list(range(10)), list(range(10)))
                for rank in range(2)]
    assert [len(p) for p in per_rank] == [1, 1]
    assert per_rank[0][0].src_rank != per_rank[1][0].src_rank
    wide = InstanceLayout(tp=2, pcp=1, dcp=1, interleave=BLOCK, block_size=BLOCK, num_kv_heads=8)
    narrow = InstanceLayout(tp=4, pcp=1, dcp=1, interleave=BLOCK, block_size=BLOCK,
                            num_kv_heads=8)
    pulls = plan_pulls(wide, narrow, 2, 0, 40, list(range(10)), list(range(10)))
    assert [(p.src_rank, p.src_head, p.dst_head, p.num_heads) for p in pulls] == [(1, 0, 0, 2)]
    pulls = plan_pulls(narrow, wide, 1, 0, 40, list(range(10)), list(range(10)))
    assert sorted((p.src_rank, p.src_head, p.dst_head, p.num_heads) for p in pulls) == [
        (2, 0, 0, 2), (3, 0, 2, 2)]


@pytest.mark.parametrize(("src", "dst", "message"), [
    (InstanceLayout(1, 2, 1, 1, BLOCK, 1), InstanceLayout(2, 1, 2, BLOCK, BLOCK, 1),
     "--cp-kv-cache-interleave-size equal to --block-size (4) on both"),
    (InstanceLayout(1, 1, 1, 1, BLOCK, 1), InstanceLayout(1, 1, 1, 1, 8, 1),
     "block_size differs"),
    (InstanceLayout(1, 1, 1, 1, BLOCK, 1), InstanceLayout(1, 1, 1, 1, BLOCK, 2),
     "different KV heads"),
])
def test_incompatible_layouts_are_named(src, dst, message):
    assert message in incompatibility(src, dst)
    with pytest.raises(ValueError, match="."):
        plan_pulls(src, dst, 0, 0, 10, list(range(10)), list(range(10)))
