"""DeepSeek model plumbing: the latent KV cache, the MLA start-up rules, random weights."""

from __future__ import annotations

import json
import shutil

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
from cpserve.models.layers import RMSNorm
from tests.checkpoints import TOKENIZER_FILES, make_deepseek_checkpoint, random_prompts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_deepseek_checkpoint(tmp_path_factory.mktemp("deepseek-v2"), "deepseek-v2")


def test_kv_cache_holds_one_latent_per_token_and_layer(checkpoint):
    hf = json.loads((checkpoint / "config.json").read_text())
    latent = hf["kv_lora_rank"] + hf["qk_rope_head_dim"]
    layers, block_size, blocks, fp32 = hf["num_hidden_layers"], 4, 64, 4
    with LLM(str(checkpoint), block_size=block_size, num_kv_blocks=blocks,
             max_model_len=blocks * block_size) as llm:
        runner = llm.engine.executor.runner
        assert runner.kv_spec.bytes_per_token * layers == latent * layers * fp32
        assert runner.bytes_per_block == latent * layers * fp32 * block_size
        assert len(runner.kv_caches) == layers
        for k_cache, v_cache in runner.kv_caches:
            assert v_cache is None  # the values are the latent channels of the keys
            assert k_cache.shape == (blocks, block_size, 1, latent)
            assert k_cache.dtype == torch.float32


def _engine_config(model: ModelConfig, tp: int, dcp: int) -> EngineConfig:
    return EngineConfig(model, ParallelConfig(tp, 1, dcp), CacheConfig(), SchedulerConfig())


def test_mla_rules_at_start_up(checkpoint):
    model = ModelConfig.from_pretrained(checkpoint)
    assert model.is_mla and model.num_kv_heads == 1
    # The config's num_key_value_heads (4) counts expanded heads: under the GQA rule tp=2
    # would force dcp=1. For MLA every TP rank holds the latent, so dcp may be any divisor.
    for tp, dcp in [(2, 2), (4, 2), (4, 4)]:
        _engine_config(model, tp, dcp)
    with pytest.raises(ConfigError, match="decode_context_parallel_size=3 must divide"):
        _engine_config(model, 4, 3)
    uneven = ModelConfig(model.path, model.architecture,
                         {**model.hf_config, "moe_intermediate_size": 30}, model.dtype,
                         model.max_model_len, model.eos_token_ids)
    with pytest.raises(ConfigError, match="moe_intermediate_size=30"):
        _engine_config(uneven, 4, 1)


def test_dummy_load_format_builds_random_weights_without_a_checkpoint(checkpoint, tmp_path):
    """What the GPU benchmark uses: config.json only, random weights made in place by the
    model runner (load_format="dummy")."""
    hf = json.loads((checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(hf))
    for name in TOKENIZER_FILES:
        shutil.copy(checkpoint / name, tmp_path / name)
    assert not (tmp_path / "model.safetensors").exists()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    with LLM(str(tmp_path), block_size=4, num_kv_blocks=64, max_model_len=256,
             load_format="dummy") as llm:
        model = llm.engine.executor.runner.model
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, RMSNorm):
                    assert torch.equal(p, torch.ones_like(p)), name
                elif p.dim() >= 2:
                    assert 0.015 < p.float().std().item() < 0.025, name
        outputs = llm.generate([{"prompt_token_ids": p} for p in random_prompts([9, 30])], params,
                               use_tqdm=False)
    for out in outputs:
        completion = out.outputs[0]
        assert len(completion.token_ids) == 4
        assert all(0 <= t < hf["vocab_size"] for t in completion.token_ids)
        assert all(torch.isfinite(torch.tensor(completion.logprobs[i][t].logprob))
                   for i, t in enumerate(completion.token_ids))
