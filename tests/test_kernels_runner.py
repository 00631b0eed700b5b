"""The model runner's GPU paths, checked on CPU where they can be: dummy weights, and the
static buffers of decode CUDA graphs (padding rows, block tables), with graph capture replaced
by a plain re-run. On CUDA the real capture is compared with eager steps."""

from __future__ import annotations

import json

import pytest
import torch

from cpserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from cpserve.distributed.groups import single_process_groups
from cpserve.distributed.plan import PlannedRequest, StepPlan
from cpserve.engine import cuda_graphs
from cpserve.engine.cuda_graphs import DecodeGraphs
from cpserve.engine.model_runner import ModelRunner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
            torch_dtype="float32")


class ReplayByRerun:
    """Stands in for a CUDA graph on CPU: replay re-runs the captured function."""

    def __init__(self, forward, out):
        self.forward, self.out = forward, out

    def replay(self):
        self.out.copy_(self.forward())


def fake_capture(self, bucket, q=1, variant=0):
    def forward():
        return self.forward(bucket, q, variant)

    key = (bucket, q, variant)
    self.outputs[key] = forward()
    self.graphs[key] = ReplayByRerun(forward, self.outputs[key])


def make_runner(tmp_path, graphs: bool) -> ModelRunner:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    config = EngineConfig(ModelConfig.from_pretrained(tmp_path, "float32", 512),
                          ParallelConfig(), CacheConfig(block_size=4, num_blocks=64),
                          SchedulerConfig(max_num_seqs=8), device=DEVICE, load_format="dummy")
    runner = ModelRunner(config, single_process_groups(), torch.device(DEVICE))
    if graphs and runner.graphs is None:
        runner.graphs = DecodeGraphs(runner)
    if not graphs:
        runner.graphs = None
    return runner


def test_dummy_weights_are_random_and_shared_by_seed(tmp_path):
    a, b = make_runner(tmp_path, False), make_runner(tmp_path, False)
    wa = a.model.model.layers[0].mlp.gate_up_proj.weight
    wb = b.model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(wa, wb) and 0.01 < wa.std().item() < 0.03
    assert (a.model.model.norm.weight == 1).all()
    assert a.kv_caches[0][0].std().item() > 0.5  # random, not zeros


def test_decode_graph_buffers_match_eager_steps(tmp_path, monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setattr(DecodeGraphs, "_capture", fake_capture)
    graphed, eager = make_runner(tmp_path, True), make_runner(tmp_path, False)
    prompts = {"a": list(range(3, 12)), "b": list(range(40, 45)), "c": list(range(7, 26))}
    tables = {"a": [5, 6, 7, 8, 9, 10], "b": [0, 1, 2, 3], "c": [20, 21, 22, 23, 24, 25, 26]}
    plan = StepPlan([PlannedRequest(r, p, 0, tables[r], True, 1) for r, p in prompts.items()])
    first = [runner.execute(plan) for runner in (graphed, eager)]
    torch.testing.assert_close(first[0], first[1], rtol=0, atol=0)
    lengths = {r: len(p) for r, p in prompts.items()}
    batches = [["a", "b", "c"], ["a", "c"], ["b"], ["a", "b", "c"]]  # buckets 4, 2, 1, 4
    for step, batch in enumerate(batches):
        plan = StepPlan([PlannedRequest(r, [step + 1], lengths[r], [], False, 1) for r in batch])
        out = [runner.execute(plan) for runner in (graphed, eager)]
        # fp32: the same kernels on the same values; only padding rows differ.
        torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)
        for r in batch:
            lengths[r] += 1
    assert {key for key, n in graphed.graphs.replays.items() if n} == {(1, 1, 0), (2, 1, 0),
                                                                       (4, 1, 0)}
    for (k_g, v_g), (k_e, v_e) in zip(graphed.kv_caches, eager.kv_caches):
        # Same slots written; values may differ in the last bit (matmuls of padded batches).
        torch.testing.assert_close(k_g, k_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v_g, v_e, rtol=1e-5, atol=1e-6)


def test_graphs_only_for_single_rank_cuda_without_enforce_eager(tmp_path, monkeypatch):
    runner = make_runner(tmp_path, False)
    groups = single_process_groups()
    cuda = torch.device("cuda")
    assert cuda_graphs.graphs_enabled(runner.config, groups, cuda)
    assert not cuda_graphs.graphs_enabled(runner.config, groups, torch.device("cpu"))
    eager = EngineConfig(runner.config.model, ParallelConfig(), runner.config.cache,
                         runner.config.scheduler, device=DEVICE, enforce_eager=True)
    assert not cuda_graphs.graphs_enabled(eager, groups, cuda)
    two = type(groups)(rank=0, tp=2, pcp=1, dcp=1)
    monkeypatch.delenv("CPSERVE_CUDA_GRAPH_COLLECTIVES", raising=False)
    assert not cuda_graphs.graphs_enabled(runner.config, two, cuda)
    monkeypatch.setenv("CPSERVE_CUDA_GRAPH_COLLECTIVES", "1")
    assert cuda_graphs.graphs_enabled(runner.config, two, cuda)


@pytest.mark.skipif(DEVICE != "cuda", reason="profiling sizes the cache from GPU memory")
def test_profiled_kv_budget_is_positive(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    config = EngineConfig(ModelConfig.from_pretrained(tmp_path, "float32", 512),
                          ParallelConfig(), CacheConfig(block_size=4, gpu_memory_utilization=0.3),
                          SchedulerConfig(max_num_batched_tokens=256), device="cuda",
                          load_format="dummy")
    runner = ModelRunner(config, single_process_groups(), torch.device("cuda"))
    free, total = torch.cuda.mem_get_info()
    # The profiled budget itself, not a block count clamped to at least one.
    assert 0 < runner.profiled_kv_budget < 0.3 * total
    assert runner.num_blocks == int(runner.profiled_kv_budget // runner.bytes_per_block) >= 1
    assert "profiled a 256-token step" in runner.profile_report


def test_rotary_tables_are_computed_once_per_forward_pass(tmp_path, monkeypatch):
    """All layers share one step's cos/sin; the next step computes its own."""
    from cpserve.models.rope import RotaryEmbedding

    calls = []
    original = RotaryEmbedding.cos_sin
    monkeypatch.setattr(RotaryEmbedding, "cos_sin",
                        lambda self, *a: calls.append(1) or original(self, *a))
    runner = make_runner(tmp_path, False)
    assert len(runner.model.model.layers) == 2
    calls.clear()  # on CUDA, start-up captured every decode graph bucket (forward passes)
    runner.execute(StepPlan([PlannedRequest("a", list(range(3, 12)), 0, [0, 1, 2], True, 1)]))
    assert len(calls) == 1
    runner.execute(StepPlan([PlannedRequest("a", [5], 9, [], False, 1)]))
    assert len(calls) == 2


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a CUDA matter")
def test_steps_and_sampling_are_queued_without_host_synchronisation(tmp_path):
    """What async scheduling relies on: planning, preparing and running a decode step (its
    tokens pending on the device), a mixed step, and sampling with every kind of row, all
    under sync debug mode "error" (any host synchronisation raises)."""
    from cpserve.engine.sampler import Sampler, SamplingRow
    from cpserve.engine.step_inputs import PendingTokens
    from cpserve.sampling_params import SamplingParams

    runner = make_runner(tmp_path, True)
    prompts = {"a": list(range(3, 12)), "b": list(range(40, 45)), "c": list(range(7, 26))}
    plan = StepPlan([PlannedRequest(r, p, 0, [i * 8 + j for j in range(8)], True, 1)
                     for i, (r, p) in enumerate(prompts.items())])
    sampler = Sampler(seed=0)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=5, top_p=0.9, seed=3),
              SamplingParams(top_p=0.8, repetition_penalty=1.2, logit_bias={7: 3.0},
                             min_tokens=2, logprobs=2)]
    rows = [SamplingRow(p, None, [], prompts[r]) for p, r in zip(params, prompts)]
    samples = sampler.sample(runner.execute(plan), rows)
    lengths = {r: len(p) for r, p in prompts.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            decode = StepPlan([PlannedRequest(r, [-1], lengths[r], [], False, 1)
                               for r in prompts])
            logits = runner.execute(decode, pending_tokens=PendingTokens(samples.token_ids,
                                                                         [0, 1, 2]))
            samples = sampler.sample(logits, rows)
            lengths = {r: n + 1 for r, n in lengths.items()}
        mixed = StepPlan([PlannedRequest("a", [5], lengths["a"], [], False, 1),
                          PlannedRequest("d", list(range(60, 67)), 0, [30, 31], True, 1)])
        sampler.sample(runner.execute(mixed), rows[:2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert {key[0] for key, n in runner.graphs.replays.items() if n} == {4}
    assert all(t.finite for t in samples.resolve())
