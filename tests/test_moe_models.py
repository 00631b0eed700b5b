"""Qwen2-MoE and Qwen3-MoE against transformers, and the start-up rules of MoE layouts.

The checkpoints (tests/checkpoints.py): Qwen2-MoE with a sigmoid-gated shared expert, q/k/v
biases and one dense layer (`mlp_only_layers`); Qwen3-MoE with q/k norms and renormalised
top-k weights (`norm_topk_prob`). Both: 8 experts, 2 per token.
"""

from __future__ import annotations

import pytest
import torch

from cpserve import LLM, SamplingParams
from cpserve.config import (
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from cpserve.engine.args import EngineArgs
from cpserve.models.moe import MoE
from tests.checkpoints import hf_greedy, load_hf_model, make_checkpoint, random_prompts

NEW_TOKENS = 24
PROMPT_LENGTHS = [1, 5, 17, 40, 64]
# fp32 end to end; only the order of sums differs.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module", params=["qwen2-moe", "qwen3-moe"])
def checkpoint(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    prompts = random_prompts(PROMPT_LENGTHS)
    return path, prompts, hf_greedy(load_hf_model(path), prompts, NEW_TOKENS)


@pytest.mark.parametrize("block_size,max_batched", [(16, 8192), (1, 8)],
                         ids=["bs16", "bs1-chunked"])
def test_greedy_matches_transformers(checkpoint, block_size, max_batched):
    path, prompts, reference = checkpoint
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    with LLM(str(path), block_size=block_size, max_num_batched_tokens=max_batched,
             num_kv_blocks=4096 // block_size, enable_prefix_caching=False) as llm:
        model = llm.engine.executor.runner.model
        sparse = [isinstance(layer.mlp, MoE) for layer in model.model.layers]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        llm.engine.check_integrity()
    assert sparse == ([True, False] if "qwen2" in path.name else [True, True])
    for out, (ref_tokens, ref_logprobs) in zip(outputs, reference):
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        ours = [completion.logprobs[i][t].logprob for i, t in enumerate(completion.token_ids)]
        assert torch.allclose(torch.tensor(ours), torch.tensor(ref_logprobs), atol=LOGPROB_TOL)


def _config(model: ModelConfig, tp: int, pcp: int = 1, ep: bool = False) -> EngineConfig:
    return EngineConfig(model, ParallelConfig(tp, pcp, 1, enable_expert_parallel=ep),
                        CacheConfig(), SchedulerConfig())


def _with(model: ModelConfig, **changes) -> ModelConfig:
    return ModelConfig(model.path, model.architecture, {**model.hf_config, **changes},
                       model.dtype, model.max_model_len, model.eos_token_ids)


def test_moe_rules_at_start_up(checkpoint):
    model = ModelConfig.from_pretrained(checkpoint[0])
    assert model.num_experts == 8
    _config(model, 2, 2, ep=True)  # 4 ranks, 2 experts each
    with pytest.raises(ConfigError, match="= 4 must divide the 6 routed experts"):
        _config(_with(model, num_experts=6, num_local_experts=6), 2, 2, ep=True)
    # TP slices every expert; expert parallelism keeps them whole, so only TP needs this.
    odd = _with(model, moe_intermediate_size=30)
    with pytest.raises(ConfigError, match="moe_intermediate_size=30"):
        _config(odd, 4)
    _config(odd, 4, ep=True)
    with pytest.raises(ConfigError, match="sliding-window"):
        _config(_with(model, use_sliding_window=True), 1)
    with pytest.raises(ConfigError, match="sliding-window"):
        _config(_with(model, layer_types=["full_attention", "sliding_attention"]), 1)


def test_expert_parallel_flag_refuses_a_dense_model(tmp_path):
    path = make_checkpoint(tmp_path / "qwen3", "qwen3")
    with pytest.raises(ConfigError, match="enable_expert_parallel: Qwen3ForCausalLM has no "
                                          "experts"):
        EngineArgs(model=str(path), enable_expert_parallel=True).create_engine_config()


def test_expert_parallel_flag_on_the_command_line():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    for argv in (["--enable-expert-parallel"], ["-ep"]):
        assert EngineArgs.from_cli_args(parser.parse_args(argv)).enable_expert_parallel
    assert not EngineArgs.from_cli_args(parser.parse_args([])).enable_expert_parallel


def test_expert_count_under_either_key(checkpoint):
    """The hub's Qwen-MoE configs say num_experts, transformers 5 writes num_local_experts."""
    model = ModelConfig.from_pretrained(checkpoint[0])
    hf = {k: v for k, v in model.hf_config.items() if k not in ("num_experts",
                                                                 "num_local_experts")}
    for key in ("num_experts", "num_local_experts"):
        assert _with(ModelConfig(model.path, model.architecture, hf, model.dtype,
                                 model.max_model_len, ()), **{key: 8}).num_experts == 8
