"""Micro-benchmark of the attention kernels on one GPU: paged decode bandwidth (with a sweep of
the Triton tuning knobs) and dense prefill throughput of the library ops.

    python benchmarks/bench_kernels.py --out results.json

Paged decode moves K and V of every visible token once: bytes = batch * context * H_kv * D *
2 (K, V) * 2 (bf16). Its ceiling is SDPA's flash decode over contiguous KV, timed here on the
same shapes (DESIGN.md measured 4.06 TB/s for batch 8, 32k, GQA 32/8).

Latent (MLA) decode, DeepSeek-V2-Lite absorbed (H=16 over one 576-wide latent head, values =
its first 512 channels) reads each cached token once: bytes = batch * context * 576 * 2.

    python benchmarks/bench_kernels.py --mla-only     # just the MLA decode sweep
"""

# ruff: noqa: B023 - the lambdas are timed inside the loop that binds them
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpserve.attention.gpu_backend import GPUBackend
from cpserve.attention.kernels import paged as paged_module
from cpserve.attention.kernels.library_ops import cudnn_attention, flash_varlen_attention

PAGED_SHAPES = [  # (batch, context, heads, kv_heads)
    (1, 32768, 32, 8), (8, 131072, 32, 1)]
MLA_SHAPES = [  # (batch, context, heads): DeepSeek-V2-Lite decode
    (1, 32768, 16), (16, 32768, 16)]
MLA_SWEEP = dict(wide_block_n=[16, 32, 64], wide_num_warps=[4, 8], wide_num_stages=[1, 2, 3])
SWEEP = dict(block_n=[32, 64, 128], num_warps=[4], num_stages=[2, 3],
             target_programs_per_sm=[2, 4])


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def paged_case(batch, context, heads, kv_heads, page=16):
    blocks_per_seq = context // page
    k_cache = torch.randn(batch * blocks_per_seq, page, kv_heads, 128, dtype=torch.bfloat16,
                          device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, -1)
    q = torch.randn(batch, heads, 128, dtype=torch.bfloat16, device="cuda")
    seq = torch.arange(batch, device="cuda")
    lengths = torch.full((batch,), context, device="cuda")
    return q, k_cache, v_cache, tables, seq, lengths


def paged_sweep(backend: GPUBackend) -> list[dict]:
    rows = []
    base = dict(paged_module.TUNING)
    for batch, context, heads, kv_heads in PAGED_SHAPES:
        case = paged_case(batch, context, heads, kv_heads)
        nbytes = batch * context * kv_heads * 128 * 2 * 2
        # Ceiling: SDPA flash decode over contiguous K/V of the same size (GQA expanded by
        # the op itself with enable_gqa).
        k = case[1].view(batch, context, kv_heads, 128).transpose(1, 2)
        v = case[2].view(batch, context, kv_heads, 128).transpose(1, 2)
        q = case[0].unsqueeze(2)
        try:
            sdpa_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, enable_gqa=True))
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"sdpa ceiling failed: {exc}")
            sdpa_ms = float("nan")
        best = None
        for values in itertools.product(*SWEEP.values()):
            paged_module.TUNING.update(dict(zip(SWEEP, values)))
            try:
                ms = bench(lambda: backend.paged_attention(*case, 0.088))
            except Exception as exc:  # noqa: BLE001 - a config may not compile
                print(f"config {values} failed: {exc}")
                continue
            row = dict(batch=batch, context=context, heads=heads, kv_heads=kv_heads,
                       **dict(zip(SWEEP, values)), ms=ms, tb_s=nbytes / ms / 1e9,
                       sdpa_ms=sdpa_ms, sdpa_tb_s=nbytes / sdpa_ms / 1e9)
            rows.append(row)
            if best is None or ms < best["ms"]:
                best = row
        paged_module.TUNING.update(base)
        print(f"paged b={batch} ctx={context} {heads}/{kv_heads}: best {best['ms']:.3f} ms "
              f"{best['tb_s']:.2f} TB/s ({ {k: best[k] for k in SWEEP} }); SDPA contiguous "
              f"{sdpa_ms:.3f} ms "
              f"{nbytes / sdpa_ms / 1e9:.2f} TB/s", flush=True)
    return rows


def mla_sweep(backend: GPUBackend) -> list[dict]:
    rows = []
    base = dict(paged_module.TUNING)
    for batch, context, heads in MLA_SHAPES:
        page, blocks_per_seq = 64, context // 64
        k_cache = torch.randn(batch * blocks_per_seq, page, 1, 576, dtype=torch.bfloat16,
                              device="cuda")
        tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, -1)
        q = torch.randn(batch, heads, 576, dtype=torch.bfloat16, device="cuda")
        seq = torch.arange(batch, device="cuda")
        lengths = torch.full((batch,), context, device="cuda")
        nbytes = batch * context * 576 * 2
        best = None
        for values in itertools.product(*MLA_SWEEP.values()):
            paged_module.TUNING.update(dict(zip(MLA_SWEEP, values)))
            try:
                ms = bench(lambda: backend.paged_attention(q, k_cache, None, tables, seq,
                                                           lengths, 0.072, v_dim=512))
            except Exception as exc:  # noqa: BLE001 - a config may not compile
                print(f"mla config {values} failed: {exc}")
                continue
            row = dict(batch=batch, context=context, heads=heads,
                       **dict(zip(MLA_SWEEP, values)), ms=ms, tb_s=nbytes / ms / 1e9)
            rows.append(row)
            if best is None or ms < best["ms"]:
                best = row
        paged_module.TUNING.update(base)
        if backend.fallbacks:
            print(f"mla: reference fallbacks taken: {backend.fallbacks}")
        if best is None:
            print(f"mla b={batch} ctx={context} H={heads}: every config failed", flush=True)
            continue
        print(f"mla decode b={batch} ctx={context} H={heads}/1 D=576/512: best "
              f"{best['ms']:.3f} ms {best['tb_s']:.2f} TB/s "
              f"({ {k: best[k] for k in MLA_SWEEP} })", flush=True)
    return rows


def dense_bench() -> list[dict]:
    rows = []
    for t in (8192, 32768):
        q = torch.randn(t, 32, 128, dtype=torch.bfloat16, device="cuda")
        k, v = (torch.randn(t, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        flops = 2 * 2 * t * t * 32 * 128 / 2  # causal
        cu = torch.tensor([0, t], dtype=torch.int32, device="cuda")
        for name, fn in (("cudnn", lambda: cudnn_attention(q, k, v, True, 0.088)),
                         ("flash_varlen", lambda: flash_varlen_attention(
                             q, k, v, cu, cu, t, t, True, 0.088))):
            try:
                ms = bench(fn)
            except Exception as exc:  # noqa: BLE001
                print(f"dense {name} failed: {exc}")
                continue
            rows.append(dict(op=name, tokens=t, ms=ms, tflops=flops / ms / 1e9))
            print(f"dense {name} T={t}: {ms:.2f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--best-out", default=None, help="write the best setting (JSON)")
    parser.add_argument("--mla-only", action="store_true", help="only the MLA decode sweep")
    args = parser.parse_args()
    backend = GPUBackend("cuda")
    print("library ops:", backend.ops, flush=True)
    if args.mla_only:
        rows = mla_sweep(backend)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "mla": rows}, f, indent=1)
        return
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "ops": backend.ops, "dense": dense_bench(),
              "paged": paged_sweep(backend), "mla": mla_sweep(backend)}
    result["best"] = best_overall(result["paged"])
    print("BEST_TUNING " + json.dumps(result["best"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.best_out:
        with open(args.best_out, "w") as f:
            json.dump(result["best"], f)


def best_overall(rows: list[dict]) -> dict:
    """The setting with the least total time over the shapes, each shape's time relative to
    its own best (so no single shape dominates)."""
    shapes = {(r["batch"], r["context"], r["kv_heads"]) for r in rows}
    fastest = {sh: min(r["ms"] for r in rows if (r["batch"], r["context"], r["kv_heads"]) == sh)
               for sh in shapes}
    score: dict = {}
    for r in rows:
        key = tuple(r[k] for k in SWEEP)
        score[key] = score.get(key, 0.0) + r["ms"] / fastest[(r["batch"], r["context"],
                                                              r["kv_heads"])]
    complete = [k for k in score if sum(1 for r in rows if tuple(r[x] for x in SWEEP) == k)
                == len(shapes)]
    return dict(zip(SWEEP, min(complete, key=score.get))) if complete else {}


if __name__ == "__main__":
    main()
