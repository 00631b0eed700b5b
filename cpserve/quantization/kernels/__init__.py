"""FP8 kernels, each with the PyTorch reference it must match (tests compare them).

    kernel                        reference (same signature)
    quantize_groups_triton        cpserve.quantization.fp8.quantize_groups
    block_scaled_mm_triton        cpserve.quantization.fp8.block_scaled_mm_reference
    rowwise_scaled_mm             cpserve.quantization.fp8.rowwise_scaled_mm_reference
                                  (torch._scaled_mm)

The Triton ones run on CUDA and in Triton's interpreter (TRITON_INTERPRET=1) on CPU.
"""
