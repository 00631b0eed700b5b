"""The paged kernel's verification mode (q rows per sequence, tiles made on the device)
against the PyTorch reference, and the padded step layout it reads (Triton's interpreter on
CPU; tolerances as in tests/test_kernels.py)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from cpserve.attention.kernels import paged as paged_module  # noqa: E402
from cpserve.attention.kernels import paged_attention_triton  # noqa: E402
from cpserve.attention.kernels.paged import uniform_tiles  # noqa: E402
from cpserve.attention.metadata import PlannedSeq  # noqa: E402
from cpserve.distributed.groups import ParallelGroups  # noqa: E402
from cpserve.kv.layout import KVLayout  # noqa: E402
from tests.test_kernels import REF, assert_attention_close, rand  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_uniform_tiles_cover_each_sequence_rows_in_order():
    lens = torch.tensor([3, 4, 5, 0, 0, 9, 10, 11, 12, 13])  # 2 sequences of 5 rows
    tiles = uniform_tiles(lens, queries_per_seq=5, queries=4)
    first, rows, tile_lens = tiles.first, tiles.rows, tiles.tile_lens
    assert first.tolist() == [0, 4, 5, 9] and rows.tolist() == [4, 1, 4, 1]
    assert tile_lens.tolist() == [5, 0, 12, 13]


# Triton's interpreter takes no bf16 dot products (tests/test_kernels.py): fp32 on CPU.
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,latent,splits", [(1, False, 3), (4, False, 1), (4, True, 3)])
def test_verification_mode_matches_reference(group, latent, splits, dtype, monkeypatch):
    """Three sequences of q = 5 rows each: lengths growing by one row to the next (a
    verification step), a padding row of length 0, and a sequence with nothing cached."""
    # Verification's own knobs (TUNING "verify_*"): several blocks and splits a sequence.
    monkeypatch.setitem(paged_module.TUNING, "verify_target_programs_per_sm",
                        0 if splits == 1 else 64)
    monkeypatch.setitem(paged_module.TUNING, "min_split_tokens", 4)
    monkeypatch.setitem(paged_module.TUNING, "max_splits", splits)
    monkeypatch.setitem(paged_module.TUNING, "verify_block_n", 16)
    gen = torch.Generator().manual_seed(group * 10 + splits)
    q_rows, page, blocks, width, kv_heads = 5, 4, 24, 5, 1 if latent else 2
    dk, dv = (40, 24) if latent else (32, 32)
    k_cache = rand(blocks, page, kv_heads, dk, dtype=dtype, gen=gen)
    v_cache = None if latent else rand(blocks, page, kv_heads, dv, dtype=dtype, gen=gen)
    tables = torch.randperm(blocks, generator=gen)[:3 * width].view(3, width).to(DEVICE)
    seq = torch.arange(3).repeat_interleave(q_rows).to(DEVICE)
    lengths = torch.tensor([11, 12, 13, 14, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0]).to(DEVICE)
    q = rand(3 * q_rows, kv_heads * group, dk, dtype=dtype, gen=gen)
    v_dim = dv if latent else None
    got = paged_attention_triton(q, k_cache, v_cache, tables, seq, lengths, 0.3, v_dim,
                                 queries_per_seq=q_rows)
    want = REF.paged_attention(q, k_cache, v_cache, tables, seq, lengths, 0.3, v_dim)
    assert_attention_close(got, want, dtype)


def test_verification_step_is_padded_to_q_rows_per_request():
    """Requests of 1 and 3 new tokens with q = 3 (1 + K, K = 2): 3 rows each, over the
    persistent tables; padding rows (position -1) repeat the last token, write no KV and see
    nothing; a step of one token each stays unpadded; a longer chunk takes the dense path."""
    from cpserve.distributed.plan import PlannedRequest, StepPlan
    from cpserve.engine.step_inputs import RequestRows, prepare_inputs

    layout, groups = KVLayout(4, 2, 1), ParallelGroups(rank=0, tp=1, pcp=1, dcp=1)
    cpu = torch.device("cpu")

    def inputs(requests, max_q=3):
        rows = RequestRows(4, 8, cpu)
        plan = StepPlan([PlannedRequest(rid, ids, start, blocks, True, len(ids))
                         for rid, ids, start, blocks in requests])
        seqs = [PlannedSeq(r.start, len(r.token_ids), False) for r in plan.requests]
        return rows, prepare_inputs(plan, seqs, rows, rows.apply(plan), layout, groups, cpu,
                                    max_paged_queries=max_q)

    rows, step = inputs([("a", [7], 9, [0, 1, 2]), ("b", [5, 6, 8], 20, [3, 4, 5])])
    meta = step.metadata
    assert meta.rep_decode_only and meta.rep_queries_per_seq == 3
    assert step.local_seq.tolist() == [0, 0, 0, 1, 1, 1]
    assert step.local_offset.tolist() == [0, 1, 2] * 2
    assert step.token_ids.tolist() == [7, 7, 7, 5, 6, 8]
    assert step.decode_vectors[1].tolist() == [9, -1, -1, 20, 21, 22]
    assert meta.rep_seq.tolist() == [rows.row("a")] * 3 + [rows.row("b")] * 3
    assert (meta.rep_slots[1:3] == -1).all() and (meta.rep_kv_len[1:3] == 0).all()
    # On shard 0 of 2 (interleave 1), query at position p sees local_count(p + 1) tokens.
    assert meta.rep_kv_len[[0, 3, 4, 5]].tolist() == [5, 11, 11, 12]
    _, decode = inputs([("a", [7], 9, [0, 1, 2]), ("b", [5], 9, [3, 4, 5])])
    assert decode.metadata.rep_queries_per_seq == 1 and len(decode.local_seq) == 2
    _, longer = inputs([("a", [1, 2, 3, 4], 9, [0, 1, 2])])
    assert not longer.metadata.rep_decode_only and longer.decode_vectors is None


def test_verification_graphs_match_eager_steps(tmp_path, monkeypatch):
    """Replayed verification steps (q = 1 + K rows a request, padded) give the eager logits,
    with requests of different draft counts and batches of different buckets; decode steps
    of the same engine keep their own graphs. On CPU a replay re-runs the captured forward
    on the graph's static buffers (tests/test_kernels_runner.py)."""
    import dataclasses

    from cpserve.distributed.plan import PlannedRequest, StepPlan
    from cpserve.engine.cuda_graphs import DecodeGraphs
    from cpserve.spec_decode.config import SpeculativeConfig
    from tests.test_kernels_runner import fake_capture, make_runner

    if DEVICE == "cpu":
        monkeypatch.setattr(DecodeGraphs, "_capture", fake_capture)
    runners = []
    for graphs in (True, False):
        runner = make_runner(tmp_path, False)
        runner.config = dataclasses.replace(runner.config,
                                            speculative=SpeculativeConfig("ngram", 3, 3, 1))
        runner.graphs = DecodeGraphs(runner) if graphs else None
        runners.append(runner)
    prompts = {"a": list(range(3, 12)), "b": list(range(40, 45)), "c": list(range(7, 26))}
    tables = {"a": [5, 6, 7, 8, 9, 10], "b": [0, 1, 2, 3], "c": [20, 21, 22, 23, 24, 25, 26]}
    plan = StepPlan([PlannedRequest(r, p, 0, tables[r], True, 1) for r, p in prompts.items()])
    for runner in runners:
        runner.execute(plan)
    lengths = {r: len(p) for r, p in prompts.items()}
    steps = [{"a": 3, "b": 0, "c": 2}, {"a": 1}, {"b": 3, "c": 3}, {"a": 0, "b": 0, "c": 0}]
    for step, drafts in enumerate(steps):
        plan = StepPlan([PlannedRequest(r, [step + 1] + [50 + d for d in range(n)], lengths[r],
                                        [], False, 1 + n, n) for r, n in drafts.items()])
        graphed, eager = (runner.execute(plan) for runner in runners)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
        for r in drafts:
            lengths[r] += 1  # one token kept: the drafts' slots are written again
    assert sorted(runners[0].graphs.graphs) == [(1, 4, 0), (2, 4, 0), (4, 1, 0), (4, 4, 0)]


def test_mtp_drafting_graphs_match_eager_drafting(tmp_path, monkeypatch):
    """The MTP module over a replayed step's rows and its chain of decode steps, from graphs
    (CPU stand-in), give the eager drafts and write the same module cache."""
    from cpserve.config import (
        CacheConfig,
        EngineConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
    )
    from cpserve.distributed.groups import single_process_groups
    from cpserve.distributed.plan import PlannedRequest, StepPlan
    from cpserve.engine.cuda_graphs import DecodeGraphs
    from cpserve.engine.model_runner import ModelRunner
    from cpserve.spec_decode.config import SpeculativeConfig
    from tests.checkpoints import add_mtp_modules, make_deepseek_checkpoint
    from tests.test_kernels_runner import fake_capture

    if DEVICE == "cpu":
        monkeypatch.setattr(DecodeGraphs, "_capture", fake_capture)
    path = add_mtp_modules(make_deepseek_checkpoint(tmp_path / "v3", "deepseek-v3"))
    config = EngineConfig(ModelConfig.from_pretrained(path, "float32", 256), ParallelConfig(),
                          CacheConfig(block_size=4, num_blocks=64), SchedulerConfig(max_num_seqs=4),
                          device=DEVICE, speculative=SpeculativeConfig("mtp", 3))
    runners = [ModelRunner(config, single_process_groups(), torch.device(DEVICE))
               for _ in range(2)]
    runners[0].graphs = DecodeGraphs(runners[0])
    runners[0].drafter._use_graphs = True
    prompts = {"a": list(range(3, 12)), "b": list(range(40, 45)), "c": list(range(7, 26))}
    tables = {"a": [5, 6, 7, 8, 9, 10], "b": [0, 1, 2, 3], "c": [20, 21, 22, 23, 24, 25, 26]}
    plans = [StepPlan([PlannedRequest(r, p, 0, tables[r], True, 1) for r, p in prompts.items()])]
    entries = [[[[t + 1 for t in p], len(p) - 1, 3] for p in prompts.values()]]
    # A verification step (graphed), each request with a different number of rows.
    lengths = {r: len(p) for r, p in prompts.items()}
    drafts = {"a": 3, "b": 1, "c": 2}
    plans.append(StepPlan([PlannedRequest(r, [60] + [61] * n, lengths[r], [], False, 1 + n, n)
                           for r, n in drafts.items()]))
    entries.append([[[61] * n + [62], n, 2] for n in drafts.values()])
    for plan, entry in zip(plans, entries):
        results = []
        for runner in runners:
            runner.execute(plan)
            results.append(runner.propose_drafts(entry))
        assert results[0] == results[1] and all(len(d) == e[2] for d, e in zip(results[0], entry))
    assert {key[2] for key in runners[0].drafter.graphs.graphs} == {0}
    assert any(key[1] == 4 for key in runners[0].drafter.graphs.graphs)  # the verification rows
    layer = config.model.num_layers  # the MTP module's cache
    torch.testing.assert_close(runners[0].kv_caches[layer][0], runners[1].kv_caches[layer][0],
                               rtol=1e-5, atol=1e-5)
