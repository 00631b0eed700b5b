"""How far FP8 re-rounding carries a summation-order-sized difference, on CPU: the grounds
of tests/test_gpu_fp8.py's tolerances (kernels against references, GPU against CPU).

    python benchmarks/fp8_noise.py [--eps-exp -22] [--parts w8a8,kv] [--defect]

The tiny models of tests/test_gpu_fp8.py run on CPU, teacher-forced over the same prompts,
once as they are and once with every GEMM output times (1 + u), u uniform in +-2^eps_exp
(what another summation order does: fp32 sums differ by ~2^-22 relative; GPU and CPU kernels
also differ in exp, rope and attention, ~2^-18). Printed: max and mean |logprob difference|.

    w8a8    bf16, activations quantized at every linear (CPSERVE_FP8_COMPUTE=w8a8, the
            PyTorch reference kernels), per-channel and block checkpoints; then weight-only
    kv      fp32, FP8 KV cache against an fp32 cache
    --defect  for scale: W8A8 with a defect against the plain run (block scales transposed,
            per-channel scales in reverse row order): what a real layout bug gives
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CPSERVE_DIST_TIMEOUT", "120")

from cpserve import LLM, SamplingParams  # noqa: E402
from cpserve.quantization import linear  # noqa: E402
from cpserve.quantization.fp8 import (  # noqa: E402
    block_scaled_mm_reference,
    quantize_groups,
    rowwise_scaled_mm_reference,
)
from tests.checkpoints import random_prompts  # noqa: E402
from tests.fp8_checkpoints import make_fp8_pair  # noqa: E402

SEQUENCES = random_prompts([40, 300, 700], seed=11)  # as tests/test_gpu_fp8.py
COMMON = dict(num_kv_blocks=512, max_num_batched_tokens=256, enable_prefix_caching=False,
              device="cpu")
PLAIN = linear.Fp8Kernels(quantize_groups, block_scaled_mm_reference,
                          rowwise_scaled_mm_reference)
UNQUANTIZED_APPLY = linear.UnquantizedLinearMethod.apply


def jittered(eps: float):
    gen = torch.Generator().manual_seed(99)

    def jitter(y: torch.Tensor) -> torch.Tensor:
        noise = (torch.rand(y.shape, generator=gen) * 2 - 1) * eps
        return (y.float() * (1 + noise)).to(y.dtype)

    def block(a, sa, b, sb, blk, out):
        return jitter(block_scaled_mm_reference(a, sa, b, sb, blk, torch.float32)).to(out)

    def rowwise(a, sa, b, sb, out):
        return jitter(rowwise_scaled_mm_reference(a, sa, b, sb, torch.float32)).to(out)

    def apply(self, layer, x, bias):
        wide = F.linear(x.float(), layer.weight.float(), None if bias is None else bias.float())
        return jitter(wide).to(x.dtype)

    return linear.Fp8Kernels(quantize_groups, block, rowwise), apply


def defective() -> linear.Fp8Kernels:
    def block(a, sa, b, sb, blk, out):
        square = sb.shape[0] == sb.shape[1]
        return block_scaled_mm_reference(a, sa, b, sb.T if square else sb.flip(0), blk, out)

    def rowwise(a, sa, b, sb, out):
        return rowwise_scaled_mm_reference(a, sa, b, sb.flip(0), out)

    return linear.Fp8Kernels(quantize_groups, block, rowwise)


def forced(path: str, kernels: linear.Fp8Kernels, apply, **kw) -> torch.Tensor:
    """Teacher-forced logprobs; `kernels` and `apply` stand in for the references' and
    F.linear's (the FP8 layers take them at load)."""
    linear.REFERENCE_KERNELS, linear.UnquantizedLinearMethod.apply = kernels, apply
    try:
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        with LLM(path, **COMMON, **kw) as llm:
            outs = llm.generate([{"prompt_token_ids": s} for s in SEQUENCES], params,
                                use_tqdm=False)
    finally:
        linear.REFERENCE_KERNELS, linear.UnquantizedLinearMethod.apply = PLAIN, UNQUANTIZED_APPLY
    return torch.cat([torch.tensor([o.prompt_logprobs[i][t].logprob
                                    for i, t in enumerate(s) if i > 0])
                      for o, s in zip(outs, SEQUENCES)])


def compare(results: dict, what: str, a: torch.Tensor, b: torch.Tensor) -> None:
    d = (a - b).abs()
    results[what] = dict(max=d.max().item(), mean=d.mean().item())
    print(f"{what}: max {d.max():.4f}, mean {d.mean():.5f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eps-exp", type=float, default=-22.0)
    parser.add_argument("--parts", default="w8a8,kv")
    parser.add_argument("--defect", action="store_true")
    args = parser.parse_args()
    noisy, noisy_apply = jittered(2.0 ** args.eps_exp)
    tmp, results = Path(tempfile.mkdtemp(prefix="cpserve-fp8-noise-")), {}
    parts = args.parts.split(",")
    if "w8a8" in parts:
        os.environ["CPSERVE_FP8_COMPUTE"] = "w8a8"
        for fmt in ("channel", "block"):
            path = str(make_fp8_pair(tmp / fmt, "llama3", fmt, max_position_embeddings=2048)[0])
            plain = forced(path, PLAIN, UNQUANTIZED_APPLY, dtype="bfloat16")
            compare(results, f"W8A8 {fmt} bf16, 2^{args.eps_exp:g} noise", plain,
                    forced(path, noisy, noisy_apply, dtype="bfloat16"))
            if args.defect:
                compare(results, f"W8A8 {fmt} bf16, scale layout defect", plain,
                        forced(path, defective(), UNQUANTIZED_APPLY, dtype="bfloat16"))
        os.environ["CPSERVE_FP8_COMPUTE"] = "weight-only"
        compare(results, f"weight-only block bf16, 2^{args.eps_exp:g} noise",
                forced(path, PLAIN, UNQUANTIZED_APPLY, dtype="bfloat16"),
                forced(path, noisy, noisy_apply, dtype="bfloat16"))
        del os.environ["CPSERVE_FP8_COMPUTE"]
    if "kv" in parts:
        path = str(make_fp8_pair(tmp / "fp32", "llama3", "block", max_position_embeddings=2048)[1])
        for kv in ("auto", "fp8"):
            compare(results, f"fp32, KV cache {kv}, 2^{args.eps_exp:g} noise",
                    forced(path, PLAIN, UNQUANTIZED_APPLY, dtype="float32", kv_cache_dtype=kv),
                    forced(path, noisy, noisy_apply, dtype="float32", kv_cache_dtype=kv))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
