"""Where FP8 decode time goes, in one bounded run (~80 s on one H200): the profiles behind
issue 15's speed targets, on an 8-layer Llama-3.1-8B shape (random weights, load format dummy).

    python benchmarks/profile_fp8.py --out-dir DIR                        # one H200
    python benchmarks/profile_fp8.py --quick --device cpu --out-dir DIR   # smoke run, no GPU

Parts, in this order, each skipped once the budget (--budget-s) is spent:

    weights  decode batch 1 at 32k: bf16 weights against --quantization fp8 (per-channel
             W8A8). Per engine: TPOT with CUDA graphs, GPU time per step (profiled graph
             replays, kernel by kernel), and the top kernels of an eager step (one launch
             per kernel: names and call counts)
    kv       decode batch 4 at 64k, bf16 weights: bf16 KV against --kv-cache-dtype fp8, the
             same measurements
    gemm     the 8B GEMM shapes at M = 1: bf16, torch._scaled_mm (row-wise), the Triton
             block-scaled GEMM at a few tile shapes, and the activation quantization alone
    paged    the paged-attention kernel alone at batch 4 x 64k, bf16 and FP8 caches, under a
             few TUNING settings (block_n, num_warps, num_stages)
    accum    the block-scaled GEMM's fp32 error against its reference (M = 130) and its time
             (M = 8192), with Triton's default FP8 accumulation and with promotion after every
             k32 instruction (max_num_imprecise_acc = 32)
    block    block FP8 weights (128 x 128), as in weights

Writes DIR/profile-fp8.json (everything) and DIR/profile-fp8.txt (the tables), after every
part, so a cut-off run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_fp8 import LLAMA_31_8B, QUICK, Runs, make_executor, sync, time_us  # noqa: E402

FULL = dict(layers=8, short=32768, mid=65536, batch=4, steps=10, model={},
            gemm={"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                  "down": (4096, 14336)}, accum_m=(130, 8192))
SMOKE = dict(layers=2, short=512, mid=1024, batch=2, steps=3, model=QUICK["model"],
             gemm={"o": (512, 512), "down": (512, 1024)}, accum_m=(130, 256))
TOP = 15


class Report:
    def __init__(self, out_dir: Path, settings: dict, device: str) -> None:
        self.out_dir, self.lines = out_dir, []
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        self.data = {"device": name, "torch": torch.__version__, "settings": settings,
                     "parts": {}}

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> None:
        (self.out_dir / "profile-fp8.json").write_text(json.dumps(self.data, indent=1))
        (self.out_dir / "profile-fp8.txt").write_text("\n".join(self.lines) + "\n")


def kernel_table(prof, steps: int, device: str) -> dict:
    """Device time per step, total and by kernel (the TOP largest)."""
    kind = "CUDA" if device == "cuda" else "CPU"
    events = [e for e in prof.key_averages() if e.device_type.name == kind]
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    top = sorted(events, key=lambda e: -getattr(e, attr))[:TOP]
    return {"ms_per_step": total / steps / 1e3,
            "kernels": [dict(name=e.key[:100], ms_per_step=getattr(e, attr) / steps / 1e3,
                             calls_per_step=e.count / steps) for e in top]}


def profile_steps(runs: Runs, context: int, batch: int, steps: int, device: str,
                  graphs: bool) -> dict:
    """Profile `steps` decode steps (after 2 unprofiled ones), with or without CUDA graphs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    saved = runs.ex.runner.graphs
    if not graphs:
        runs.ex.runner.graphs = None
    try:
        runs.decode(context, batch, steps=1, warmup=1)  # capture / compile outside the profile
        with profile(activities=activities) as prof:
            step_ms = runs.decode(context, batch, steps=steps, warmup=0)
    finally:
        runs.ex.runner.graphs = saved
    return dict(kernel_table(prof, steps, device), step_ms_profiled=step_ms)


def engine_part(name: str, s: dict, device: str, context: int, batch: int, report: Report,
                **engine) -> dict:
    start = time.perf_counter()
    ex = make_executor(dict(s, long=context + 2 * s["steps"] + 64), device,
                       max_batched=2048 if device == "cuda" else 256, **engine)
    runs = Runs(ex, device)
    try:
        out = {"startup_s": time.perf_counter() - start, "context": context, "batch": batch,
               "graphs": ex.runner.graphs is not None}
        out["tpot_ms"] = runs.decode(context, batch, s["steps"])
        if device == "cuda":
            out["graph_profile"] = profile_steps(runs, context, batch, 3, device, True)
        out["eager_profile"] = profile_steps(runs, context, batch, 3, device, False)
    finally:
        ex.shutdown()
        del ex, runs
        if device == "cuda":
            torch.cuda.empty_cache()
    report.say(f"{name}: decode {batch} x {context}: TPOT {out['tpot_ms']:.3f} ms (graphs "
               f"{out['graphs']}), started in {out['startup_s']:.0f} s")
    for label in ("graph_profile", "eager_profile"):
        if label not in out:
            continue
        prof = out[label]
        report.say(f"  {label}: {prof['ms_per_step']:.3f} ms of kernels per step "
                   f"(step {prof['step_ms_profiled']:.3f} ms under the profiler)")
        for k in prof["kernels"]:
            report.say(f"    {k['ms_per_step']:8.3f} ms {k['calls_per_step']:6.1f}x  {k['name']}")
    return out


def weights_part(s, device, report):
    return {name: engine_part(name, s, device, s["short"], 1, report, **kw) for name, kw in (
        ("bf16", {}), ("fp8-channel", dict(quantization="fp8")))}


def block_part(s, device, report):
    return {"fp8-block": engine_part("fp8-block", s, device, s["short"], 1, report, block=True)}


def kv_part(s, device, report):
    return {name: engine_part(name, s, device, s["mid"], s["batch"], report, kv_dtype=kv)
            for name, kv in (("bf16-kv", "auto"), ("fp8-kv", "fp8"))}


def gemm_part(s, device, report):
    from cpserve.quantization.linear import kernels_for

    kernels = kernels_for(torch.device(device))
    out = [gemm_shape(kernels, shape, n, k, device, report)
           for shape, (n, k) in s["gemm"].items()]
    return out


def gemm_shape(kernels, shape: str, n: int, k: int, device: str, report: Report) -> dict:
    from cpserve.quantization.fp8 import quantize_blocks, quantize_channels
    from cpserve.quantization.kernels import block_gemm

    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    wr, wr_scale = quantize_channels(w)
    wr_scale = wr_scale.reshape(-1)
    wb, wb_scale = quantize_blocks(w, (128, 128))
    x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
    xr, xr_scale = kernels.quantize_groups(x, k)
    xb, xb_scale = kernels.quantize_groups(x, 128)

    def block_mm():
        return kernels.block_mm(xb, xb_scale, wb, wb_scale, (128, 128), torch.bfloat16)

    row = dict(shape=shape, n=n, k=k, m=1,
               bf16_us=time_us(lambda: x @ w.t(), device),
               quant_token_us=time_us(lambda: kernels.quantize_groups(x, k), device),
               quant_groups_us=time_us(lambda: kernels.quantize_groups(x, 128), device),
               scaled_mm_us=time_us(lambda: kernels.rowwise_mm(xr, xr_scale, wr, wr_scale,
                                                               torch.bfloat16), device))
    tiles = {}
    saved = block_gemm._tiles
    try:
        for tile in ((16, 32, 4, 4), (16, 64, 4, 4), (16, 128, 4, 3), (16, 64, 8, 3)):
            block_gemm._tiles = lambda m, tile=tile: tile
            tiles["x".join(map(str, tile))] = time_us(block_mm, device)
    finally:
        block_gemm._tiles = saved
    row["block_mm_us"] = tiles
    report.say(f"gemm {shape} M=1: bf16 {row['bf16_us']:.1f} us, scaled_mm "
               f"{row['scaled_mm_us']:.1f} us (+ quantize per token "
               f"{row['quant_token_us']:.1f} us), block mm by tile (BLOCK_M x BLOCK_N x warps "
               "x stages) " + ", ".join(f"{t} {us:.1f}" for t, us in tiles.items())
               + f" us (+ quantize groups {row['quant_groups_us']:.1f} us)")
    return row


def paged_part(s, device, report):
    from cpserve.attention.kernels import paged

    heads, kv_heads, dim, page = 32, 8, 128, 16
    if s is SMOKE:
        heads, kv_heads = 4, 2
    batch, context = s["batch"], s["mid"]
    pages = context // page
    q = torch.randn(batch, heads, dim, device=device, dtype=torch.bfloat16)
    tables = torch.arange(batch * pages, device=device, dtype=torch.int32).view(batch, pages)
    seq = torch.arange(batch, device=device, dtype=torch.int32)
    lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    caches = {}
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        k = torch.randn(batch * pages, page, kv_heads, dim, device=device,
                        dtype=torch.bfloat16).to(dtype)
        caches[str(dtype).removeprefix("torch.")] = (k, k.clone())
    settings = [{}, dict(num_stages=2), dict(num_stages=4), dict(block_n=128),
                dict(block_n=32), dict(num_warps=8)]
    def timed(k, v, tuning):
        saved = dict(paged.TUNING)
        paged.TUNING.update(tuning)
        try:
            return time_us(lambda: paged.paged_attention_triton(
                q, k, v, tables, seq, lens, 0.088, k_scale=0.5, v_scale=0.5), device, reps=10)
        finally:
            paged.TUNING.clear()
            paged.TUNING.update(saved)

    out = []
    for dtype, (k, v) in caches.items():
        for tuning in settings if dtype != "bfloat16" else settings[:2]:
            us = timed(k, v, tuning)
            kv_bytes = 2 * k.numel() * k.element_size()
            out.append(dict(cache=dtype, tuning=tuning, us=us, tb_s=kv_bytes / us / 1e6))
            report.say(f"paged {dtype} cache, batch {batch} x {context}, {tuning or 'default'}: "
                       f"{us:.1f} us ({kv_bytes / us / 1e6:.2f} TB/s of KV)")
    return out


def accum_part(s, device, report):
    from cpserve.quantization.fp8 import block_scaled_mm_reference, quantize_blocks
    from cpserve.quantization.kernels import block_gemm
    from cpserve.quantization.linear import kernels_for

    kernels = kernels_for(torch.device(device))
    n, k = 4096, 4096
    w = torch.randn(n, k, device=device) * 0.02
    wb, wb_scale = quantize_blocks(w, (128, 128))
    def case(xb, xb_scale, want, imprecise):
        def fn():
            return kernels.block_mm(xb, xb_scale, wb, wb_scale, (128, 128), torch.float32)

        saved = block_gemm.TUNING["max_num_imprecise_acc"]
        block_gemm.TUNING["max_num_imprecise_acc"] = imprecise
        try:
            err = ((fn() - want).abs().max() / want.abs().max()).item()
            return err, time_us(fn, device, reps=10)
        finally:
            block_gemm.TUNING["max_num_imprecise_acc"] = saved

    out = []
    for m in s["accum_m"]:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        xb, xb_scale = kernels.quantize_groups(x, 128)
        want = block_scaled_mm_reference(xb, xb_scale, wb, wb_scale, (128, 128), torch.float32)
        for imprecise in (None, 32):
            err, us = case(xb, xb_scale, want, imprecise)
            out.append(dict(m=m, max_num_imprecise_acc=imprecise, max_err_of_max=err, us=us,
                            tflops=2 * m * n * k / us / 1e6))
            report.say(f"accum block mm M={m} {n}x{k} max_num_imprecise_acc={imprecise}: "
                       f"max |err| / max |y| {err:.2e}, {us:.1f} us "
                       f"({2 * m * n * k / us / 1e6:.1f} TFLOP/s)")
    return out


PARTS = {"weights": weights_part, "kv": kv_part, "gemm": gemm_part, "paged": paged_part,
         "accum": accum_part, "block": block_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="2 layers, short contexts")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--budget-s", type=float, default=80.0,
                        help="no part starts after this many seconds")
    args = parser.parse_args()
    s = SMOKE if args.quick else FULL
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(out_dir, s, args.device)
    report.say(f"profile_fp8: {report.data['device']}, {s['layers']} layers of the Llama-3.1-8B "
               f"shape{' (quick)' if args.quick else ''}, vocab "
               f"{s['model'].get('vocab_size', LLAMA_31_8B['vocab_size'])}")
    start = time.perf_counter()
    for name in args.parts.split(","):
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            report.data["parts"][name] = {"skipped": f"budget spent ({elapsed:.0f} s)"}
            report.say(f"== {name}: skipped, {elapsed:.0f} s of {args.budget_s:.0f} spent")
            continue
        t0 = time.perf_counter()
        try:
            report.data["parts"][name] = PARTS[name](s, args.device, report)
            status = "ok"
        except Exception as exc:  # one part's failure must not cost the others
            report.data["parts"][name] = {"error": repr(exc)[:500]}
            status = f"error {exc!r}"[:300]
        sync(args.device)
        report.say(f"== {name}: {status} in {time.perf_counter() - t0:.1f} s")
        report.save()
    report.save()


if __name__ == "__main__":
    main()
