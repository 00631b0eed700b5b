"""FP8 checkpoints written by the tests, each beside the same model dequantized for
transformers.

The quantizers here are written independently of cpserve's (plain loops over blocks and rows),
so a test compares cpserve's loading of a format against an outside reading of it:

    make_fp8_pair(tmp, kind, fmt) -> (fp8 checkpoint, dequantized fp32 checkpoint)

    fmt "block"    {"quant_method": "fp8", "weight_block_size": [128, 128]}  weight_scale_inv
    fmt "tensor"   {"quant_method": "fp8", "activation_scheme": "static"}    weight_scale [],
                                                                             input_scale []
    fmt "channel"  compressed-tensors, channel weights, dynamic tokens       weight_scale [N, 1]
    fmt "online"   the bf16/fp32 checkpoint itself; the dequantized copy holds what per-channel
                   quantization at load (--quantization fp8) makes of it
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import make_checkpoint, make_deepseek_checkpoint

FP8 = torch.float8_e4m3fn
BLOCK = 128

# Llama with every TP-2 slice a whole number of 128 x 128 blocks: 2 heads of 128, 1 KV head
# (replicated at tp 2, so dcp 2 works), intermediate 256.
LLAMA_FP8 = dict(hidden_size=256, intermediate_size=256, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=128)
# DeepSeek-V3 (MLA + MoE) likewise: 8 heads of (96 + 32) query / (96 + 32) kv_b rows, values of
# 32 (o_proj takes 4 x 32 = 128 per rank), experts of 256; kv_a_proj_with_mqa has 160 rows
# (a short last block, whole on every rank), stacked under q_a_proj's 128 in one FP8 GEMM.
DEEPSEEK_FP8 = dict(hidden_size=256, intermediate_size=256, num_attention_heads=8,
                    num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=128,
                    qk_nope_head_dim=96, qk_rope_head_dim=32, v_head_dim=32,
                    moe_intermediate_size=256)


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """Projection weights (the layers FP8 checkpoints quantize, MLA's kv_a_proj_with_mqa
    included, as in DeepSeek's FP8 releases); not embeddings, norms, the LM head or the MoE
    router."""
    return tensor.dim() == 2 and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448.0, 448.0).to(FP8)


def quantize_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FP8, scale per 128 x 128 block, dequantized fp32), block by block."""
    rows, cols = w.shape
    nb, kb = -(-rows // BLOCK), -(-cols // BLOCK)
    q = torch.empty(rows, cols, dtype=FP8)
    scale = torch.empty(nb, kb)
    deq = torch.empty(rows, cols)
    for i in range(nb):
        for j in range(kb):
            r, c = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
            s = w[r, c].abs().max() / 448.0
            scale[i, j] = s
            q[r, c] = _e4m3(w[r, c] / s)
            deq[r, c] = q[r, c].float() * s
    return q, scale, deq


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(FP8, scale [N, 1], dequantized fp32), one scale per output row."""
    s = w.abs().amax(dim=1, keepdim=True) / 448.0
    q = _e4m3(w / s)
    return q, s, q.float() * s


def quantize_whole(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = w.abs().max() / 448.0
    q = _e4m3(w / s)
    return q, s, q.float() * s


QUANT_CONFIGS = {
    "block": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": [BLOCK, BLOCK]},
    "tensor": {"quant_method": "fp8", "activation_scheme": "static"},
    "channel": {"quant_method": "compressed-tensors", "format": "float-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                                "symmetric": True, "dynamic": False},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                          "symmetric": True, "dynamic": True}}}},
}


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for file in src.iterdir():
        if file.name not in ("model.safetensors", "config.json"):
            (dst / file.name).write_bytes(file.read_bytes())


def make_fp8_pair(tmp: Path, kind: str, fmt: str, seed: int = 0,
                  **overrides) -> tuple[Path, Path]:
    """A random `kind` model (tests.checkpoints) with the FP8-friendly shape (or `overrides`),
    written as an FP8 checkpoint of format `fmt` and as its dequantized fp32 twin."""
    if kind.startswith("deepseek"):
        source = make_deepseek_checkpoint(tmp / "source", kind, seed,
                                          **{**DEEPSEEK_FP8, **overrides})
    else:
        source = make_checkpoint(tmp / "source", kind, seed, **{**LLAMA_FP8, **overrides})
    tensors = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    fp8_dir, deq_dir = tmp / f"fp8-{fmt}", tmp / f"dequantized-{fmt}"
    for d in (fp8_dir, deq_dir):
        d.mkdir()
        _copy_tokenizer(source, d)
    quantized, dequantized = {}, {}
    g = torch.Generator().manual_seed(seed + 7)
    for name, w in tensors.items():
        if not is_linear_weight(name, w):
            quantized[name] = dequantized[name] = w
            continue
        if fmt == "block":
            q, s, deq = quantize_block(w.float())
            quantized[name], quantized[name + "_scale_inv"] = q, s
        elif fmt == "tensor":
            q, s, deq = quantize_whole(w.float())
            quantized[name], quantized[name + "_scale"] = q, s.reshape(())
            # Static activation scales (used by W8A8 only; the weight-only path ignores them).
            quantized[name.removesuffix("weight") + "input_scale"] = (
                0.02 + torch.rand((), generator=g) * 0.01)
        elif fmt in ("channel", "online"):
            q, s, deq = quantize_rows(w.float())
            # compressed-tensors keeps scales in the model's dtype: bf16 exercises the cast.
            s = s.to(torch.bfloat16)
            deq = q.float() * s.float()
            quantized[name], quantized[name + "_scale"] = q, s
        else:
            raise ValueError(fmt)
        dequantized[name] = deq
    if fmt == "online":  # cpserve quantizes the original weights itself (fp32 scales)
        for name, w in tensors.items():
            if is_linear_weight(name, w):
                dequantized[name] = quantize_rows(w.float())[2]
        quantized = tensors
    save_file(quantized, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, deq_dir / "model.safetensors", metadata={"format": "pt"})
    (deq_dir / "config.json").write_text(json.dumps(config))
    if fmt != "online":
        config = dict(config, quantization_config=QUANT_CONFIGS[fmt])
    (fp8_dir / "config.json").write_text(json.dumps(config))
    return fp8_dir, deq_dir
