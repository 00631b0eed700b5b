"""The ring exchange's running LSE merge keeps fp32 between ranks and rounds once at the end."""

from __future__ import annotations

import torch

from cpserve.attention.merge import fold_into, merge_attention_states, merge_two


def test_ring_folds_stay_fp32_and_equal_one_merge_of_all_parts():
    gen = torch.Generator().manual_seed(0)
    parts, n, heads, dim = 8, 5, 4, 64  # pcp = 8: one fold per rank
    outs = torch.randn(parts, n, heads, dim, generator=gen).to(torch.bfloat16)
    lses = torch.randn(parts, n, heads, generator=gen) * 2
    lses[3, 0] = float("-inf")  # a part that sees nothing for one query

    running = None
    for i in range(parts):
        running = fold_into(running, outs[i], lses[i])
    want_out, want_lse = merge_attention_states(outs.float(), lses)
    assert running[0].dtype == torch.float32
    # fp32 sums in another order: a few fp32 ulps of values of order 1.
    assert torch.allclose(running[0], want_out, atol=1e-6)
    assert torch.allclose(running[1], want_lse, atol=1e-6)

    # What rounding the running output to bf16 at every merge costs (the old ring): errors
    # of bf16's size, a thousand times the fold's.
    old_out, old_lse = outs[0], lses[0]
    for i in range(1, parts):
        old_out, old_lse = merge_two(old_out, old_lse, outs[i], lses[i])
    assert (old_out.float() - want_out).abs().max() > 1e-3
