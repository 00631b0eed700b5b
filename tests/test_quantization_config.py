"""Quantized checkpoints and flags the engine cannot honour are refused at start-up with a
message naming them; the loader errors on missing tensors and warns about unused ones."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from cpserve import LLM
from cpserve.config import ConfigError
from cpserve.distributed.groups import ParallelGroups
from cpserve.entrypoints.cli import main
from cpserve.models.checkpoint import checkpoint_index
from cpserve.models.llama import LlamaForCausalLM
from cpserve.quantization.config import resolve_quantization
from cpserve.quantization.weights import prepare_fp8_layers
from tests.checkpoints import make_checkpoint
from tests.fp8_checkpoints import QUANT_CONFIGS, make_fp8_pair

CT = QUANT_CONFIGS["channel"]


def _ct(weights=None, acts=None, **top):
    group = dict(CT["config_groups"]["group_0"])
    group["weights"] = {**group["weights"], **(weights or {})}
    if acts is not None:
        group["input_activations"] = acts
    return {**CT, **top, "config_groups": {"group_0": group}}


@pytest.mark.parametrize("qc,flag,words", [
    ({"quant_method": "awq", "bits": 4}, None, ["'awq'", "fp8"]),
    ({"quant_method": "gptq", "bits": 4}, None, ["'gptq'"]),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None, ["'bitsandbytes'"]),
    (None, "ascend", ["Ascend"]),
    (None, "awq", ["--quantization 'awq'"]),
    (None, "compressed-tensors", ["no quantization_config"]),
    (CT, "fp8", ["does not match", "compressed-tensors"]),
    ({"quant_method": "fp8", "fmt": "e5m2"}, None, ["e4m3"]),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]},
     None, ["activation_scheme 'dynamic'"]),
    ({"quant_method": "fp8", "weight_block_size": [128, 100]}, None, ["weight_block_size"]),
    (_ct(weights={"num_bits": 8, "type": "int"}), None, ["float 8-bit"]),
    (_ct(weights={"strategy": "group", "group_size": 128}), None, ["strategy='group'"]),
    (_ct(format="pack-quantized"), None, ["pack-quantized"]),
    (_ct(acts={"num_bits": 8, "type": "float", "strategy": "token", "dynamic": False}), None,
     ["per tensor"]),
], ids=lambda x: None)
def test_unsupported_quantization_is_refused_by_name(qc, flag, words):
    hf = {} if qc is None else {"quantization_config": qc}
    with pytest.raises(ConfigError) as err:
        resolve_quantization(hf, flag)
    for word in words:
        assert word in str(err.value)


def test_supported_formats_resolve():
    block = resolve_quantization({"quantization_config": QUANT_CONFIGS["block"]}, None)
    assert (block.weights, block.block, block.scale_name) == ("block", (128, 128),
                                                              "weight_scale_inv")
    assert resolve_quantization({"quantization_config": QUANT_CONFIGS["tensor"]},
                                "fp8").activations == "static"
    assert resolve_quantization({"quantization_config": CT}, None).weights == "channel"
    no_acts = {**CT, "config_groups": {"g": {"targets": ["Linear"],
                                             "weights": CT["config_groups"]["group_0"]["weights"]}}}
    assert resolve_quantization({"quantization_config": no_acts}, None).activations == "none"
    online = resolve_quantization({}, "fp8")
    assert online.online and online.weights == "channel"
    assert resolve_quantization({}, None) is None


def test_checkpoint_and_flags_refused_at_start_up(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "awq", "llama3")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="quant_method='awq'"):
        LLM(str(path))
    assert main(["generate", "--prompt", "x", "--quantization", "ascend"]) == 2
    assert "Ascend" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--kv-cache-dtype", "fp8_e5m2"]) == 2
    assert "kv_cache_dtype='fp8_e5m2'" in capsys.readouterr().err


# The loader ----------------------------------------------------------------------------------
def _rewrite(path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_an_error_naming_it(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama3")
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ConfigError, match="model.layers.1.mlp.down_proj.weight"):
        LLM(str(path), num_kv_blocks=32)


def test_unused_tensors_are_listed_in_a_warning(tmp_path, caplog):
    path = make_checkpoint(tmp_path / "m", "llama3")

    def add(tensors):
        tensors["model.layers.0.mlp.extra_adapter.weight"] = torch.zeros(4, 4)
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)  # known
        tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(1.0)  # KV-cache scale

    _rewrite(path, add)
    with caplog.at_level(logging.WARNING, logger="cpserve.models.loader"):
        LLM(str(path), num_kv_blocks=32).shutdown()
    warnings = [r.getMessage() for r in caplog.records if r.name == "cpserve.models.loader"]
    assert len(warnings) == 1
    assert "1 checkpoint tensor(s) were not used" in warnings[0]
    assert "model.layers.0.mlp.extra_adapter.weight" in warnings[0]


@pytest.mark.parametrize("dtype,words", [(torch.int32, "a quantized format"),
                                         (torch.float8_e5m2, "only e4m3")])
def test_tensors_a_cast_would_garble_are_refused(tmp_path, dtype, words):
    """Packed integer weights (GPTQ's, AWQ's) or e5m2: refused, not cast."""
    path = make_checkpoint(tmp_path / "m", "llama3")
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(path, lambda t: t.update({name: t[name].to(dtype)}))
    with pytest.raises(ConfigError, match=f"{name}.*{words}"):
        LLM(str(path), num_kv_blocks=32)


@pytest.fixture(scope="module")
def block_pair(tmp_path_factory):
    return make_fp8_pair(tmp_path_factory.mktemp("block"), "llama3", "block")


def test_fp8_tensors_without_their_scales_are_refused(block_pair, tmp_path):
    fp8_dir, _ = block_pair
    for name, change, words in [
        ("no-config", None, "no quantization_config"),
        ("no-scale", lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale_inv"),
         "has no 'model.layers.0.mlp.up_proj.weight_scale_inv'"),
        ("bad-scale", lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale_inv":
                                          torch.ones(3, 2)}), "needs [2, 2]"),
    ]:
        path = tmp_path / name
        path.mkdir()
        for file in fp8_dir.iterdir():
            (path / file.name).write_bytes(file.read_bytes())
        if change is None:
            config = json.loads((path / "config.json").read_text())
            del config["quantization_config"]
            (path / "config.json").write_text(json.dumps(config))
        else:
            _rewrite(path, change)
        with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
            LLM(str(path), num_kv_blocks=32)


def test_tp_shard_must_cover_whole_blocks(tmp_path):
    """4 heads of 64 and 2 KV heads: at tp 2 each rank holds 64 rows of k_proj, half of a
    128-row scale block. Built on rank 1 of a pretend tp-2 layout (no processes needed)."""
    fp8_dir, _ = make_fp8_pair(tmp_path, "llama3", "block", num_attention_heads=4,
                               num_key_value_heads=2, head_dim=64)
    from cpserve.config import ModelConfig

    config = ModelConfig.from_pretrained(fp8_dir)
    model = LlamaForCausalLM(config, ParallelGroups(rank=1, tp=2, pcp=1, dcp=1))
    with pytest.raises(ConfigError) as err:
        prepare_fp8_layers(model, config.quant_config, checkpoint_index(fp8_dir))
    message = str(err.value)
    assert "k_proj.weight" in message and "[64, 128)" in message and "size 128" in message


def test_merged_layer_of_fp8_and_other_tensors_runs_dequantized(tmp_path, caplog):
    """MLA's q_a_proj and kv_a_proj_with_mqa run as one GEMM: a checkpoint that quantized only
    one of them loads that layer in the compute dtype (its FP8 part dequantized, with a
    warning), and gives the tokens of the all-FP8 checkpoint (weight-only on CPU: the same
    dequantized weights)."""
    from cpserve import SamplingParams

    fp8_dir, deq_dir = make_fp8_pair(tmp_path / "pair", "deepseek-v3", "block")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for file in fp8_dir.iterdir():
        (mixed / file.name).write_bytes(file.read_bytes())
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    twin = load_file(deq_dir / "model.safetensors")[kv_a]

    def unquantize(tensors):
        tensors[kv_a] = twin
        tensors.pop(kv_a + "_scale_inv")

    _rewrite(mixed, unquantize)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 17, 30, 42, 7]}]
    results = []
    for path in (fp8_dir, mixed):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cpserve.quantization.weights"):
            with LLM(str(path), num_kv_blocks=64, block_size=4, max_model_len=256) as llm:
                attn = llm.engine.executor.runner.model.model.layers[0].self_attn
                fused = attn.fused_qkv_a_proj
                results.append(llm.generate(prompts, params, use_tqdm=False)[0]
                               .outputs[0].token_ids)
        warned = [r.getMessage() for r in caplog.records
                  if r.name == "cpserve.quantization.weights"]
        assert fused.weight.dtype == torch.float32  # CPU: weight-only either way
        if path == mixed:
            assert not hasattr(fused, "weight_scale_inv")  # no FP8 parameters for it
            assert len(warned) == 1 and "self_attn.fused_qkv_a_proj" in warned[0]
        else:
            assert not warned
    assert results[0] == results[1]
