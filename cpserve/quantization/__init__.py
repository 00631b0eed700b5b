"""Quantized weights and KV cache: FP8 (e4m3) on Hopper GPUs, dequantized on CPU.

    config.py      which format a checkpoint (or --quantization) asks for; every refusal
    fp8.py         quantize / dequantize in PyTorch: the references of the kernels
    linear.py      how a linear layer computes: unquantized, or W8A8 with FP8 kernels
    weights.py     FP8 weight and scale parameters, their TP slices, what loading makes of them
    kv_cache.py    the FP8 KV cache: per-layer scales from the checkpoint or a warm-up step
    kernels/       Triton activation quantization and block-scaled GEMM; torch._scaled_mm
"""
