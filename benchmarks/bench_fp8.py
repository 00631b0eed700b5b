"""FP8 on one GPU, the targets of issue 15 in one bounded run.

    python benchmarks/bench_fp8.py --out-dir DIR                          # one H200, ~4-5 min
    python benchmarks/bench_fp8.py --quick --device cpu --out-dir DIR     # smoke run, no GPU

Model: the Llama-3.1-8B shape (32 layers, hidden 4096, 8 KV heads, vocab 128256) with random
weights made on the device (load format dummy), the same values in every phase: bf16, or
quantized at load. Each phase is its own process with a time limit (a crash or a hang costs
that phase only):

    kernels  GEMMs of the 8B shapes, M = 1, 8, 8192: bf16 against FP8 row-wise (quantize per
             token + torch._scaled_mm) and FP8 block (1 x 128 groups + the Triton GEMM);
             time, bandwidth / FLOP rate, error against the PyTorch reference
    bf16     bf16 weights, bf16 KV: prefill 128k TTFT, decode TPOT batch 1 at 32k, 256
             teacher-forced logprobs, KV capacity, decode batch 4 at 128k and batch 8 at 64k
    fp8      --quantization fp8 (per-channel W8A8): prefill 128k, decode b1 at 32k,
             logprobs, a profile of the decode step by kernel
    block    block-FP8 weights (128 x 128, as DeepSeek-V3 ships): prefill 32k, decode b1 at
             32k, logprobs
    fp8kv    bf16 weights, --kv-cache-dtype fp8: capacity, decode batch 8 at 128k (does not
             fit in bf16 KV on one H200: 128 GiB), batch 4 at 128k, batch 8 at 64k, logprobs
    fp32     the same weights in fp32 (dummy weights are drawn in bf16 whatever the dtype):
             logprobs only, the baseline of the accuracy rows

Accuracy on random weights: the issue's metric (mean |logprob difference| against bf16) is
reported as is, beside the same metric for bf16 against fp32, the same model in another
precision. On random weights every linear layer's FP8 error (~3.7% relative, e4m3's 3 mantissa
bits on weights and activations) passes through the norms undamped and grows through the
residual stream; the logits of a random model are nearly flat (std ~1.3 over 128k tokens), so
the logprobs move with them. A CPU study (2026-12-01, 8 layers, hidden 2048, this init):
W8A8 vs fp32 0.156, bf16 vs fp32 0.013 (12x: e4m3 rounds 16x coarser than bf16), FP8 KV
0.064; the residual stream's relative error 11% after layer 1, 22% after layer 8, the same
with fp32 compute. The 0.05 target is not reachable on random weights at 32 layers; the
ratio to the bf16 baseline is what shows a defect (a misapplied scale is far off it).

Decode steps read contexts no prefill wrote (random cache contents: speed only), as in
benchmarks/bench_long_context.py. Writes <out-dir>/fp8-<date>-<device>.json (every run with
its "quantization" and "kv_cache_dtype"), and <out-dir>/fp8-<date>-<device>.md: the targets
table, to paste into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving_model import LLAMA_31_8B  # noqa: E402 - after the path set-up

BLOCK_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
             "weight_block_size": [128, 128]}

FULL = dict(layers=32, long=131072, mid=65536, short=32768, decode_steps=20, forced=256,
            gemm_m=(1, 8, 8192), model={})
# A smoke run of every code path (a small model: CPU-sized).
QUICK = dict(layers=2, long=2048, mid=1024, short=512, decode_steps=4, forced=64,
             gemm_m=(1, 8, 256), model=dict(hidden_size=512, intermediate_size=1024,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            vocab_size=8192))
# Seconds per phase (wall, in its own process); about 4.5 minutes in all is expected, and the
# limits add up to 6.
PHASES = {"kernels": 60, "bf16": 90, "fp8": 80, "block": 70, "fp8kv": 60, "fp32": 45}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Engine --------------------------------------------------------------------------------------
def make_executor(s: dict, device: str, quantization=None, kv_dtype="auto", block=False,
                  max_batched=None, dtype="bfloat16"):
    from cpserve.config import (
        CacheConfig,
        EngineConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
    )
    from cpserve.engine.executor import Executor

    max_len = s["long"] + 256
    path = Path(tempfile.mkdtemp(prefix="cpserve-fp8-"))
    config = dict(LLAMA_31_8B, num_hidden_layers=s["layers"],
                  max_position_embeddings=max(max_len, 131072), **s["model"])
    if block:
        config["quantization_config"] = BLOCK_FP8
    (path / "config.json").write_text(json.dumps(config))
    cache = (CacheConfig(block_size=16, gpu_memory_utilization=0.9, enable_prefix_caching=False,
                         kv_cache_dtype=kv_dtype) if device == "cuda" else
             CacheConfig(block_size=16, kv_cache_memory_gib=1.0, enable_prefix_caching=False,
                         kv_cache_dtype=kv_dtype))
    engine = EngineConfig(
        model=ModelConfig.from_pretrained(path, dtype, max_len, quantization),
        parallel=ParallelConfig(), cache=cache,
        scheduler=SchedulerConfig(max_num_seqs=64,
                                  max_num_batched_tokens=max_batched or (s["long"] + 64)),
        device=device, load_format="dummy")
    return Executor(engine)


class Runs:
    """Hand-made plans for one executor (the block manager's job done by counting up)."""

    def __init__(self, executor, device: str) -> None:
        from cpserve.kv.layout import KVLayout

        self.ex, self.device = executor, device
        self.layout = KVLayout(executor.config.cache.block_size, 1, 1)
        self.next_block, self.count = 0, 0
        self.vocab = executor.config.model.vocab_size

    def decode_blocks(self, context: int, steps: int, warmup: int = 3) -> int:
        """Blocks one request of a decode run holds."""
        return self.layout.num_blocks_for(context + warmup + steps + 1)

    @property
    def capacity_tokens(self) -> int:
        return self.ex.num_blocks * self.layout.virtual_block_size

    def blocks(self, tokens: int) -> list[int]:
        n = self.layout.num_blocks_for(tokens)
        if n > self.ex.num_blocks:
            raise RuntimeError(f"{tokens} tokens need {n} blocks, the cache has "
                               f"{self.ex.num_blocks}")
        if self.next_block + n > self.ex.num_blocks:
            self.next_block = 0  # contents do not matter for speed
        ids = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return ids

    def _plan(self, rid, ids, start, blocks, new, logits):
        from cpserve.distributed.plan import PlannedRequest, StepPlan

        return StepPlan([PlannedRequest(rid, ids, start, blocks, new, logits)])

    def free(self, rids) -> None:
        from cpserve.distributed.plan import StepPlan

        self.ex.execute(StepPlan(freed_request_ids=list(rids)))

    def prefill(self, tokens: int) -> float:
        self.count += 1
        rid = f"prefill-{self.count}"
        ids = torch.randint(0, self.vocab, (tokens,)).tolist()
        plan = self._plan(rid, ids, 0, self.blocks(tokens + 1), True, 1)
        sync(self.device)
        start = time.perf_counter()
        self.ex.execute(plan).argmax(-1).tolist()
        elapsed = time.perf_counter() - start
        self.free([rid])
        return elapsed

    def decode(self, context: int, batch: int, steps: int, warmup: int = 3) -> float:
        """Median ms per decode step of `batch` requests at `context` cached tokens."""
        from cpserve.distributed.plan import PlannedRequest, StepPlan

        self.count += 1
        rids = [f"decode-{self.count}-{i}" for i in range(batch)]
        need = self.decode_blocks(context, steps, warmup)
        if need * batch > self.ex.num_blocks:
            raise RuntimeError(f"batch {batch} at {context} tokens needs {need * batch} blocks, "
                               f"the cache has {self.ex.num_blocks}")
        self.next_block = 0
        plan = StepPlan([PlannedRequest(r, [1], context, self.blocks(context + warmup + steps
                                                                      + 1), True, 1)
                         for r in rids])
        times = []
        for i in range(warmup + steps):
            sync(self.device)
            start = time.perf_counter()
            tokens = self.ex.execute(plan).argmax(-1).tolist()
            times.append(time.perf_counter() - start)
            plan = StepPlan([PlannedRequest(r, [t], context + i + 1, [], False, 1)
                             for r, t in zip(rids, tokens)])
        self.free(rids)
        times = sorted(times[warmup:])
        return times[len(times) // 2] * 1e3

    def teacher_forced(self, positions: int) -> dict:
        """Logprob of each next token of a fixed random prompt (the same in every phase)."""
        gen = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, self.vocab, (positions + 1,), generator=gen)
        plan = self._plan("forced", ids.tolist(), 0, self.blocks(positions + 2), True,
                          positions + 1)
        logits = self.ex.execute(plan).float().cpu()
        self.free(["forced"])
        logprobs = torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).squeeze(1)
        return {"logprobs": logprobs.tolist(), "argmax": logits[:-1].argmax(-1).tolist()}


def fits(runs: Runs, context: int, batch: int, steps: int) -> bool:
    return runs.decode_blocks(context, steps) * batch <= runs.ex.num_blocks


# Phases --------------------------------------------------------------------------------------
def baseline_phase(s: dict, device: str) -> dict:
    """fp32 weights (the same values as bf16), teacher-forced logprobs only."""
    ex = make_executor(s, device, max_batched=1024, dtype="float32")
    try:
        forced = Runs(ex, device).teacher_forced(s["forced"])
    finally:
        ex.shutdown()
    print("fp32: teacher-forced logprobs", flush=True)
    return {"forced": {"fp32": forced}}


def engine_phase(s: dict, device: str, name: str) -> dict:
    quantization = "fp8" if name == "fp8" else None
    kv_dtype = "fp8" if name == "fp8kv" else "auto"
    prefill_len = s["short"] if name == "block" else s["long"]
    start = time.perf_counter()
    ex = make_executor(s, device, quantization, kv_dtype, block=name == "block",
                       max_batched=None if name != "block" else s["short"] + 64)
    runs = Runs(ex, device)
    tag = dict(phase=name, quantization="fp8-block" if name == "block" else quantization,
               kv_cache_dtype=kv_dtype)
    out = {"runs": [], "startup_s": time.perf_counter() - start,
           "capacity": [dict(tag, num_blocks=ex.num_blocks, tokens=runs.capacity_tokens,
                             bytes_per_token_layer=ex.runner.kv_spec.bytes_per_token)],
           "kv_report": ex.runner.kv_report, "kv_scales": ex.runner.kv_scales}
    print(f"{name}: started in {out['startup_s']:.0f} s, KV capacity {runs.capacity_tokens} "
          "tokens", flush=True)
    steps = s["decode_steps"]
    if name != "fp8kv":
        runs.prefill(2048 if device == "cuda" else 64)  # compile, plan, warm up
        reps = 2 if prefill_len > 32768 else 3
        best = min(runs.prefill(prefill_len) for _ in range(reps))
        out["runs"].append(dict(tag, kind="prefill", tokens=prefill_len, ttft_s=best))
        print(f"{name}: prefill {prefill_len}: {best:.3f} s", flush=True)
    decodes = [(s["short"], 1)] if name in ("fp8", "block") else []
    if name in ("bf16", "fp8kv"):
        decodes = [(s["long"], 8), (s["long"], 4), (s["mid"], 8)]
        if name == "bf16":
            decodes.insert(0, (s["short"], 1))
    for context, batch in decodes:
        run = dict(tag, kind="decode", context=context, batch=batch)
        if not fits(runs, context, batch, steps):
            run["skipped"] = (f"does not fit: {batch} x {context} tokens, KV capacity "
                              f"{runs.capacity_tokens} tokens")
        else:
            run["tpot_ms"] = runs.decode(context, batch, steps)
            run["graphs"] = ex.runner.graphs is not None
        out["runs"].append(run)
        print(f"{name}: decode {batch} x {context}: {run.get('tpot_ms', run.get('skipped'))}",
              flush=True)
    out["forced"] = runs.teacher_forced(s["forced"])
    if name == "fp8" and device == "cuda":
        out["decode_profile"] = profile_decode(runs, s["short"], 1)
    ex.shutdown()
    return out


def profile_decode(runs: Runs, context: int, batch: int) -> dict:
    """GPU time of a decode step by kernel (CUDA graphs replay as one, so eager)."""
    from torch.profiler import ProfilerActivity, profile

    graphs, runs.ex.runner.graphs = runs.ex.runner.graphs, None
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager_ms = runs.decode(context, batch, steps=3, warmup=0)
    finally:
        runs.ex.runner.graphs = graphs
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels)
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
    return {"eager_ms": eager_ms, "gpu_ms_per_step": total / 3 / 1e3,
            "kernels": [dict(name=e.key[:90], ms_per_step=e.self_device_time_total / 3 / 1e3,
                             calls_per_step=e.count / 3) for e in top]}


def kernels_phase(s: dict, device: str) -> dict:
    from cpserve.quantization.fp8 import quantize_blocks, quantize_channels
    from cpserve.quantization.linear import kernels_for

    kernels = kernels_for(torch.device(device))
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
              "down": (4096, 14336)}
    if s is QUICK:
        shapes = {"o": (512, 512), "down": (512, 1024)}
    out = {"gemm": []}
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=gen, device=device, dtype=torch.bfloat16) * 0.02
        wr, wr_scale = quantize_channels(w)
        wr_scale = wr_scale.reshape(-1)
        wb, wb_scale = quantize_blocks(w, (128, 128))
        for m in s["gemm_m"]:
            x = torch.randn(m, k, generator=gen, device=device, dtype=torch.bfloat16)
            row = gemm_row(kernels, x, w, (wr, wr_scale), (wb, wb_scale), device)
            out["gemm"].append(dict(shape=name, m=m, n=n, k=k, **row))
            print(f"kernels {name} m={m}: bf16 {row['bf16_us']:.1f} us, rowwise "
                  f"{row['fp8_rowwise_us']:.1f} us, block {row['fp8_block_us']:.1f} us", flush=True)
    return out


def gemm_row(kernels, x, w, rowwise_weight, block_weight, device: str) -> dict:
    """Times (us), weight-read rate, FLOP rate and error against the reference of one GEMM
    shape, bf16 and both FP8 paths (each with its activation quantization)."""
    from cpserve.quantization.fp8 import block_scaled_mm_reference, rowwise_scaled_mm_reference

    (wr, wr_scale), (wb, wb_scale) = rowwise_weight, block_weight
    m, k = x.shape
    n = w.shape[0]

    def rowwise():
        xq, xs = kernels.quantize_groups(x, k)
        return kernels.rowwise_mm(xq, xs, wr, wr_scale, torch.bfloat16)

    def block():
        xq, xs = kernels.quantize_groups(x, 128)
        return kernels.block_mm(xq, xs, wb, wb_scale, (128, 128), torch.bfloat16)

    xq, xs = kernels.quantize_groups(x, k)
    ref_r = rowwise_scaled_mm_reference(xq, xs, wr, wr_scale, torch.float32)
    xq, xs = kernels.quantize_groups(x, 128)
    ref_b = block_scaled_mm_reference(xq, xs, wb, wb_scale, (128, 128), torch.float32)
    row = {}
    for label, fn, ref in (("bf16", lambda: x @ w.t(), None), ("fp8_rowwise", rowwise, ref_r),
                           ("fp8_block", block, ref_b)):
        us = time_us(fn, device)
        row[f"{label}_us"] = us
        # Weight bytes per microsecond (MB/s, then TB/s): what bounds small M.
        row[f"{label}_weight_tb_s"] = n * k * (2 if label == "bf16" else 1) / us / 1e6
        row[f"{label}_tflops"] = 2 * m * n * k / us / 1e6
        if ref is not None:
            got = fn().float()
            row[f"{label}_rel_err"] = ((got - ref).norm() / ref.norm()).item()
    return row


def time_us(fn, device: str, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e6
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / reps * 1e3


# Targets -------------------------------------------------------------------------------------
def run_of(merged, phase, kind, **match):
    for run in merged.get("runs", []):
        if run["phase"] == phase and run["kind"] == kind and all(
                run.get(k) == v for k, v in match.items()):
            return run
    return None


def targets(merged: dict, s: dict) -> list[dict]:
    """Issue 15's targets from the measured runs (None where a phase did not finish)."""
    rows = []

    def ratio(a, b, key):
        return None if a is None or b is None or key not in a or key not in b else a[key] / b[key]

    r = ratio(run_of(merged, "fp8", "decode", context=s["short"], batch=1),
              run_of(merged, "bf16", "decode", context=s["short"], batch=1), "tpot_ms")
    rows.append(dict(what=f"decode batch 1 at {s['short']}, FP8 weights / bf16 TPOT",
                     target="<= 0.65", value=r, met=None if r is None else r <= 0.65))
    r = ratio(run_of(merged, "fp8", "prefill"), run_of(merged, "bf16", "prefill"), "ttft_s")
    rows.append(dict(what=f"prefill {s['long']}, FP8 weights / bf16 TTFT", target="<= 0.85",
                     value=r, met=None if r is None else r <= 0.85))
    caps = {c["phase"]: c for c in merged.get("capacity", [])}
    if "fp8kv" in caps and "bf16" in caps:
        tokens = caps["fp8kv"]["tokens"] / caps["bf16"]["tokens"]
        per_token = (caps["bf16"]["bytes_per_token_layer"]
                     / caps["fp8kv"]["bytes_per_token_layer"])
        # Bytes per token are exactly half; the profiled budget can differ a little (the
        # profiling step of an FP8 cache holds a few more temporaries).
        rows.append(dict(what="FP8 KV capacity in tokens / bf16 KV (same memory settings)",
                         target="2x", value=tokens, met=per_token == 2 and abs(tokens - 2) < 0.06,
                         note=f"bytes per token {per_token:g}x fewer"))
    else:
        rows.append(dict(what="FP8 KV capacity / bf16 KV", target="2x", value=None, met=None))
    for context, batch in ((s["long"], 8), (s["long"], 4), (s["mid"], 8)):
        fp8 = run_of(merged, "fp8kv", "decode", context=context, batch=batch)
        bf16 = run_of(merged, "bf16", "decode", context=context, batch=batch)
        r = ratio(fp8, bf16, "tpot_ms")
        note = None
        if bf16 is not None and "skipped" in bf16:
            note = f"bf16 KV {bf16['skipped']}; FP8 KV TPOT {fp8.get('tpot_ms') if fp8 else None} ms"
        rows.append(dict(what=f"decode batch {batch} at {context}, FP8 KV / bf16 KV TPOT",
                         target="<= 0.7", value=r, met=None if r is None else r <= 0.7,
                         note=note))
    forced = {p: merged.get("forced", {}).get(p)
              for p in ("bf16", "fp8", "block", "fp8kv", "fp32")}
    baseline = None
    if forced["bf16"] is not None and forced["fp32"] is not None:
        a, b = torch.tensor(forced["bf16"]["logprobs"]), torch.tensor(forced["fp32"]["logprobs"])
        baseline = (a - b).abs().mean().item()
        rows.append(dict(what=f"baseline: bf16 vs fp32 (the same random weights) mean |logprob "
                              f"diff| over {len(a)} positions", target="-", value=baseline,
                         met=None))
    for phase, label in (("fp8", "W8A8 per-channel"), ("block", "W8A8 block"),
                         ("fp8kv", "FP8 KV")):
        if forced["bf16"] is None or forced[phase] is None:
            rows.append(dict(what=f"{label} vs bf16 mean |logprob diff|", target="<= 0.05",
                             value=None, met=None))
            continue
        a, b = torch.tensor(forced[phase]["logprobs"]), torch.tensor(forced["bf16"]["logprobs"])
        diff = (a - b).abs().mean().item()
        agree = sum(x == y for x, y in zip(forced[phase]["argmax"], forced["bf16"]["argmax"]))
        rows.append(dict(what=f"{label} vs bf16 mean |logprob diff| over {len(a)} "
                              "teacher-forced positions", target="<= 0.05", value=diff,
                         met=diff <= 0.05,
                         note=f"bf16 logprobs std {b.std().item():.3f}; argmax agrees at "
                              f"{agree}/{len(a)}"
                              + ("" if baseline is None else
                                 f"; {diff / baseline:.1f}x the bf16-vs-fp32 baseline")))
    return rows


def write_report(merged: dict, s: dict, out_dir: Path) -> None:
    merged["targets"] = targets(merged, s)
    stem = f"fp8-{merged['date']}-{merged['device'].replace(' ', '_')}"
    (out_dir / f"{stem}.json").write_text(json.dumps(merged, indent=1))
    lines = [f"### FP8 ({merged['device']}, {merged['date']}, torch {merged['torch']}, "
             f"{s['layers']} layers{', quick' if merged['quick'] else ''})", "",
             "| what | target | measured | met |", "| --- | --- | --- | --- |"]
    for row in merged["targets"]:
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(f"| {row['what']} | {row['target']} | {value}{note} | {row['met']} |")
    lines += ["", "| phase | run | result |", "| --- | --- | --- |"]
    for run in merged.get("runs", []):
        result = run.get("ttft_s", run.get("tpot_ms", run.get("skipped")))
        unit = " s" if "ttft_s" in run else (" ms" if "tpot_ms" in run else "")
        result = f"{result:.3f}" if isinstance(result, float) else result
        shape = (f"prefill {run['tokens']}" if run["kind"] == "prefill"
                 else f"decode {run['batch']} x {run['context']}")
        lines.append(f"| {run['phase']} | {shape} | {result}{unit} |")
    lines += ["", f"phases: {merged['phases']}"]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


# Orchestration -------------------------------------------------------------------------------
def run_phase(name: str, s: dict, device: str) -> dict:
    if name == "kernels":
        return kernels_phase(s, device)
    if name == "fp32":
        return baseline_phase(s, device)
    result = engine_phase(s, device, name)
    result["forced"] = {name: result["forced"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, short contexts")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--run-phase", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    if args.run_phase:
        result = run_phase(args.run_phase, settings, args.device)
        Path(args.part).write_text(json.dumps(result))
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    merged = {"runs": [], "capacity": [], "forced": {}, "phases": {}, "device": device_name,
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "quick": args.quick, "settings": settings}
    for name in args.phases.split(","):
        part = Path(tempfile.mkstemp(suffix=f"-{name}.json")[1])
        cmd = [sys.executable, __file__, "--run-phase", name, "--part", str(part),
               "--device", args.device, "--out-dir", str(out_dir)]
        cmd += ["--quick"] if args.quick else []
        start = time.time()
        proc = subprocess.Popen(cmd, start_new_session=True)  # a timeout ends its children too
        try:
            code = proc.wait(timeout=PHASES[name] * (3 if args.device == "cpu" else 1))
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
        merged["phases"][name] = dict(status=status, seconds=round(time.time() - start, 1))
        print(f"== phase {name}: {status} in {time.time() - start:.0f} s", flush=True)
        if status == "ok":
            for key, value in json.loads(part.read_text()).items():
                if isinstance(value, list) and key in merged:
                    merged[key] += value
                elif isinstance(value, dict) and key in merged:
                    merged[key].update(value)
                else:
                    merged[f"{name}_{key}"] = value
        write_report(merged, settings, out_dir)  # after every phase: a cut-off run keeps it
    print((out_dir / f"fp8-{merged['date']}-{device_name.replace(' ', '_')}.md").read_text())


if __name__ == "__main__":
    main()
