"""`--kv-cache-dtype fp8`: half the bytes per token of bf16 (twice the tokens in the same
memory), scales from the checkpoint or a warm-up prefill, and results that do not depend on
how a prompt was chunked or whether its prefix came from the cache."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpserve import LLM, SamplingParams
from cpserve.config import ConfigError
from cpserve.quantization.fp8 import FP8
from tests.checkpoints import make_checkpoint, make_deepseek_checkpoint, random_prompts

COMMON = dict(block_size=4, num_kv_blocks=512, max_model_len=1024, enable_prefix_caching=False,
              seed=0)
PROMPTS = random_prompts([3, 19, 45, 70], seed=2)
NEW_TOKENS = 10
# fp32 model, FP8 cache on both sides: only summation order differs.
LOGPROB_TOL = 1e-4


def _greedy(llm: LLM, prompts=PROMPTS) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.engine.check_integrity()
    return [(o.outputs[0].token_ids,
             [o.outputs[0].logprobs[i][t].logprob for i, t in enumerate(o.outputs[0].token_ids)])
            for o in outs]


def _assert_same(results, reference, tol=LOGPROB_TOL) -> None:
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(results, reference):
        assert tokens == ref_tokens
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=tol)


def test_bytes_per_token_halved_and_capacity_doubled(capfd):
    with LLM("tiny", dtype="bfloat16", num_kv_blocks=256) as llm:
        bf16 = llm.engine.executor.runner.kv_spec
    per_block = bf16.bytes_per_token * 16 * llm.engine.config.model.num_layers
    memory = {"kv_cache_memory": 300 * per_block / 2**30, "block_size": 16}  # 300 blocks
    capfd.readouterr()
    with LLM("tiny", dtype="bfloat16", **memory) as llm:
        blocks_bf16 = llm.engine.executor.num_blocks
    with LLM("tiny", dtype="bfloat16", kv_cache_dtype="fp8", **memory) as llm:
        runner = llm.engine.executor.runner
        assert runner.kv_spec.dtype == FP8
        assert runner.kv_spec.bytes_per_token * 2 == bf16.bytes_per_token
        assert all(k.dtype == FP8 and v.dtype == FP8 for k, v in runner.kv_caches)
        blocks_fp8 = llm.engine.executor.num_blocks
    assert (blocks_bf16, blocks_fp8) == (300, 600)
    report = capfd.readouterr().err
    assert "KV cache dtype fp8 (e4m3)" in report and "2x the tokens" in report


def _prompt_logprobs(llm: LLM) -> torch.Tensor:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return torch.cat([torch.tensor([next(iter(e.values())).logprob for e in o.prompt_logprobs[1:]])
                      for o in outs])


def test_fp8_cache_is_close_to_the_model_dtype_cache():
    """Teacher-forced logprobs: rounding K/V to e4m3 (relative error up to 2^-4) moves the
    tiny model's by 0.006 on average (measured); its logprobs vary by 0.24 (std) over these
    positions, so a cache read back wrong would move them by about that."""
    with LLM("tiny", **COMMON) as llm:
        reference = _prompt_logprobs(llm)
    with LLM("tiny", kv_cache_dtype="fp8", **COMMON) as llm:
        fp8 = _prompt_logprobs(llm)
    diff = (fp8 - reference).abs()
    assert 0 < diff.mean() < 0.02


def test_same_results_whatever_the_chunking_or_prefix_hits():
    """Each step's new K/V are rounded to what the cache holds before attention, so a chunk
    that reads earlier tokens from the cache sees the same values as one prefill did."""
    shared = [PROMPTS[3][:48] + p for p in random_prompts([5, 9], seed=4)]
    with LLM("tiny", kv_cache_dtype="fp8", **{**COMMON, "max_num_batched_tokens": 16}) as llm:
        chunked = _greedy(llm)
        shared_cold = _greedy(llm, shared)
    with LLM("tiny", kv_cache_dtype="fp8", **{**COMMON, "enable_prefix_caching": True}) as llm:
        _assert_same(_greedy(llm), chunked)
        _assert_same(_greedy(llm, shared[:1]), shared_cold[:1])  # caches the shared prefix
        hits = llm.engine.stats().prefix_cache_hits_total
        _assert_same(_greedy(llm, shared[1:]), shared_cold[1:])
        assert llm.engine.stats().prefix_cache_hits_total - hits >= 48
        scales = llm.engine.executor.runner.kv_scales
    # Warm-up scales: powers of two, one per layer for K and for V.
    assert len(scales) == llm.engine.config.model.num_layers
    for k_scale, v_scale in scales:
        for s in (k_scale, v_scale):
            assert s > 0 and math.log2(s) == round(math.log2(s))


def _with_kv_scales(path, layers: range, value: float) -> None:
    tensors = load_file(path / "model.safetensors")
    for layer in layers:
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(value)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(2 * value)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_scales_from_the_checkpoint(tmp_path, capfd):
    path = make_checkpoint(tmp_path / "scaled", "llama3")
    _with_kv_scales(path, range(2), 0.03)
    small = {**COMMON, "max_model_len": 512}  # the checkpoint's positions
    with LLM(str(path), kv_cache_dtype="fp8", **small) as llm:
        assert llm.engine.executor.runner.kv_scales == [(pytest.approx(0.03),
                                                         pytest.approx(0.06))] * 2
        _greedy(llm, PROMPTS[:1])
    assert "scales from the checkpoint" in capfd.readouterr().err
    partial = make_checkpoint(tmp_path / "partial", "llama3")
    _with_kv_scales(partial, range(1), 0.03)
    with pytest.raises(ConfigError, match="model.layers.1.self_attn.k_scale"):
        LLM(str(partial), kv_cache_dtype="fp8", **small)


def test_mla_latent_fp8_cache_in_both_forms(tmp_path, monkeypatch):
    """DeepSeek's latent cache in FP8 under MLA's expanded prefill (attention/forms.py): the
    step's latents, rounded to what the cache holds, are up-projected for the dense part, and
    chunks read the cached ones absorbed. The tokens are those of the absorbed form with
    whole prompts (equal in exact arithmetic: fp32 summation order only)."""
    from cpserve.attention import forms

    path = str(make_deepseek_checkpoint(tmp_path / "ds", "deepseek-v3"))
    settings = dict(block_size=4, num_kv_blocks=512, enable_prefix_caching=False, seed=0,
                    kv_cache_dtype="fp8")
    monkeypatch.setenv("CPSERVE_MLA_EXPANDED_MIN_TOKENS", "1000000")
    with LLM(path, **settings) as llm:
        assert llm.engine.executor.runner.kv_spec.dtype == FP8
        absorbed = _greedy(llm)
    expanded_calls = []
    new_kv = forms.LatentForms.new_kv
    monkeypatch.setattr(forms.LatentForms, "new_kv",
                        lambda self, *a: expanded_calls.append(1) or new_kv(self, *a))
    monkeypatch.setenv("CPSERVE_MLA_EXPANDED_MIN_TOKENS", "16")
    with LLM(path, max_num_batched_tokens=32, **settings) as llm:
        _assert_same(_greedy(llm), absorbed)
    assert expanded_calls  # steps of 16 new tokens or more took the expanded form
