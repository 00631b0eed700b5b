"""Triton kernels of model layers (outside attention), each with the PyTorch reference it must
match and a test comparing the two (tests/test_fused_moe.py):

    kernel                    reference (same signature)
    fused_moe.fused_moe       cpserve.models.experts.experts_reference

They run on CUDA, and on CPU under Triton's interpreter (TRITON_INTERPRET=1).
"""
