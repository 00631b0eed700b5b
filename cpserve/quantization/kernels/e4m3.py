"""Rounding to e4m3 inside Triton kernels, the same bits on the GPU and in the interpreter.

Triton's interpreter truncates float -> fp8 casts (and does not saturate), so a kernel that
cast directly would give other values on CPU than on the GPU. Rounding in fp32 first makes the
cast exact everywhere: the value is already an e4m3 number.

    spacing of e4m3 numbers near v:  2^(e - 3) for |v| in [2^e, 2^(e+1)), e >= -6
                                     2^-9 below 2^-6 (subnormals)
    round(v) = (v + M) - M,  M = 1.5 * 2^23 * spacing: fp32 addition rounds to nearest even
    at exactly the spacing, as long as |v| < 2^22 * spacing (always, after the clamp).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(v):
    """fp32 `v` clamped to +-448 and rounded to the nearest e4m3 value (ties to even), as
    fp32; `.to(tl.float8e4nv)` of the result is exact."""
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    biased_exp = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
    spacing_exp = tl.maximum(biased_exp, 127 - 6) - 3  # biased exponent of the spacing
    magic = ((spacing_exp + 23) << 23).to(tl.float32, bitcast=True) * 1.5
    return (v + magic) - magic
