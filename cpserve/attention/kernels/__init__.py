"""Triton kernels of the GPU attention backend, each with the PyTorch reference it must match.

    kernel                         reference (same signature)
    write_kv_triton                TorchReferenceBackend.write_kv
    paged_attention_triton         TorchReferenceBackend.paged_attention
    masked_attention_triton        TorchReferenceBackend.dense_attention
    merge_attention_states_triton  cpserve.attention.merge.merge_attention_states

They run on CUDA, and on CPU under Triton's interpreter (TRITON_INTERPRET=1), which is how the
CPU tests check them.
"""

from cpserve.attention.kernels.dense_masked import masked_attention_triton
from cpserve.attention.kernels.kv_write import write_kv_triton
from cpserve.attention.kernels.merge import merge_attention_states_triton
from cpserve.attention.kernels.paged import paged_attention_triton

__all__ = ["masked_attention_triton", "merge_attention_states_triton", "paged_attention_triton",
           "write_kv_triton"]
