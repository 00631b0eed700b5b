"""One layer's attention of a chunk over a cached prefix, the way the engine runs it, for each
candidate of `PREFIX_ATTENTION`; prints which to set.

    python benchmarks/bench_chunk_attention.py --out-dir DIR      # one GPU, about 3 minutes
    python benchmarks/bench_chunk_attention.py --quick            # two shapes, no sweep
    python benchmarks/bench_chunk_attention.py --dry-run          # CPU, Triton interpreter:
                                                                  # the script's plumbing only

Shape: Llama-3.1-8B (32 query heads, 8 KV heads, d 128), bf16, 16-token pages, a chunk of S
tokens after P cached ones. What is timed is `AttentionContext.attention` of one layer with
the plans `plan_step` made: the chunk's K/V written, its causal part (cuDNN square), the
prefix part by the candidate, the LSE merge:

    gather-cudnn   prefix gathered from the pages (Triton), cuDNN non-causal over it
    gather-flash   the same with FlashAttention-2 varlen
    triton         the paged kernel's tiled mode reads the pages itself (no gather)

    work           4 * H * D * (S * P + S * S / 2) flops
    target         85% of cuDNN causal attention's TFLOP/s on a square of the same work
    warm ms        the same call repeated (every cuDNN graph built)
    new-shape ms   the first call at a prefix a few pages longer: what each step of a chunked
                   prefill meets, since its prefix grows (PyTorch builds a cuDNN graph per
                   exact shape unless TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 rounds them)

PyTorch reads TORCH_CUDNN_SDPA_AVOID_RECOMPILE once per process, so every candidate is
timed in two worker processes, with it 1 and 0. A sweep of the tiled mode's tuning knobs
(TUNING["rows_per_tile", "tiled_*"]) runs in the first. The decision: the setting with the
lowest mean new-shape time (a chunked prefill pays that every step), reported with its ratio
to the target; JSON to <out-dir>/<date>-<device>-chunk-attention.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

HEADS, KV_HEADS, DIM, PAGE = 32, 8, 128, 16
SHAPES = [(4096, 8192), (4096, 32768), (4096, 122880), (8192, 8192), (8192, 32768),
          (8192, 122880)]
QUICK_SHAPES = [(4096, 32768), (8192, 122880)]
MODES = ("gather-cudnn", "gather-flash", "triton")
TARGET_SHARE = 0.85
SWEEP = dict(rows_per_tile=[64, 128], tiled_block_n=[64, 128], tiled_num_warps=[4, 8],
             tiled_num_stages=[2, 3])
SWEEP_SHAPE = (8192, 32768)
WORKER_TIMEOUT_S = 270


def flops(chunk: int, prefix: int) -> float:
    return 4 * HEADS * DIM * (chunk * prefix + chunk * chunk / 2)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median ms over `repeats` calls, each synchronised."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class Caches:
    """One layer's paged K/V cache for a request of up to `tokens` tokens (random, made on
    the device), and its block table (a random permutation of the blocks)."""

    def __init__(self, tokens: int) -> None:
        dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # (the interpreter)
        blocks = tokens // PAGE + 1
        self.kv = [tuple(torch.randn(blocks, PAGE, KV_HEADS, DIM, dtype=dtype, device=DEVICE)
                         for _ in range(2))]
        self.table = torch.randperm(blocks).view(1, -1)
        self.dtype = dtype


class ChunkStep:
    """A step of `chunk` new tokens after `prefix` cached ones, over `caches`."""

    def __init__(self, backend, caches: Caches, chunk: int, prefix: int) -> None:
        from cpserve.attention.metadata import PlannedSeq, build_step_tokens
        from cpserve.distributed.groups import single_process_groups
        from cpserve.kv.layout import KVLayout

        self.backend, self.groups, self.caches = backend, single_process_groups(), caches.kv
        step = build_step_tokens([PlannedSeq(prefix, chunk, False)], caches.table,
                                 KVLayout(PAGE), self.groups)
        self.host = step.metadata
        self.meta = type(self.host)(**{n: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x)
                                       for n, x in vars(self.host).items()})
        self.q = torch.randn(chunk, HEADS, DIM, dtype=caches.dtype, device=DEVICE)
        self.k, self.v = (torch.randn(chunk, KV_HEADS, DIM, dtype=caches.dtype, device=DEVICE)
                          for _ in range(2))

    def context(self):
        from cpserve.attention.context import AttentionContext

        start = time.perf_counter()
        plans = self.backend.plan_step(self.host, "allgather")
        self.plan_ms = (time.perf_counter() - start) * 1e3
        return AttentionContext(self.meta, self.caches, self.groups, self.backend,
                                plans=plans)

    def run(self, ctx) -> torch.Tensor:
        return ctx.attention(0, self.q, self.k, self.v, DIM ** -0.5)


def cudnn_target(chunk: int, prefix: int) -> float:
    """TARGET_SHARE of cuDNN causal TFLOP/s on a square with the chunk's work."""
    from cpserve.attention.kernels.library_ops import cudnn_attention

    if DEVICE != "cuda":
        return float("nan")  # the dry run has no cuDNN
    side = int((2 * chunk * prefix + chunk * chunk) ** 0.5) // 128 * 128
    q = torch.randn(side, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(side, KV_HEADS, DIM, dtype=torch.bfloat16, device="cuda")
            for _ in range(2))
    cudnn_attention(q, k, v, True, DIM ** -0.5)
    square_ms = timed(lambda: cudnn_attention(q, k, v, True, DIM ** -0.5), 5)
    return TARGET_SHARE * 4 * HEADS * DIM * side * side / 2 / (square_ms * 1e9)


NEW_SHAPE_STEPS = 3  # longer prefixes, 7 pages apart: one new shape each


def measure_mode(backend, caches: Caches, mode: str, chunk: int, prefix: int,
                 target: float) -> dict:
    backend.prefix_attention = mode
    step = ChunkStep(backend, caches, chunk, prefix)
    ctx = step.context()
    step.run(ctx)
    warm = timed(lambda: step.run(ctx), 5)
    new_shape = []
    for i in range(1, NEW_SHAPE_STEPS + 1):
        longer = ChunkStep(backend, caches, chunk, prefix + 7 * PAGE * i)
        longer_ctx = longer.context()
        new_shape.append(timed(lambda: longer.run(longer_ctx), 1))  # noqa: B023
    rate = flops(chunk, prefix) / (warm * 1e9)
    row = dict(chunk=chunk, prefix=prefix, mode=mode, warm_ms=warm,
               new_shape_ms=statistics.median(new_shape), tflops=rate, target_tflops=target,
               plan_ms=step.plan_ms, meets_target=rate >= target,
               fallbacks=sorted(backend.fallbacks))
    print(f"S={chunk} P={prefix} {mode}: warm {warm:.2f} ms ({rate:.0f} TFLOP/s, target "
          f"{target:.0f}), new shape {row['new_shape_ms']:.2f} ms, plan {step.plan_ms:.2f} ms",
          flush=True)
    return row


def measure_modes(backend, shapes, modes) -> list[dict]:
    rows = []
    for chunk, prefix in shapes:
        target = cudnn_target(chunk, prefix)
        caches = Caches(prefix + chunk + 7 * PAGE * NEW_SHAPE_STEPS)
        for mode in modes:
            rows.append(measure_mode(backend, caches, mode, chunk, prefix, target))
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return rows


def tiled_sweep(backend, sweep: dict, shape: tuple[int, int]) -> list[dict]:
    from cpserve.attention.kernels import paged

    base, rows = dict(paged.TUNING), []
    backend.prefix_attention = "triton"
    chunk, prefix = shape
    step = ChunkStep(backend, Caches(prefix + chunk), chunk, prefix)
    for values in itertools.product(*sweep.values()):
        setting = dict(zip(sweep, values))
        paged.TUNING.update(setting)
        try:
            ctx = step.context()  # rows_per_tile shapes the tiles: plan again
            step.run(ctx)
            ms = timed(lambda: step.run(ctx), 3)  # noqa: B023 - called before ctx changes
            rows.append(dict(setting, ms=ms, tflops=flops(chunk, prefix) / (ms * 1e9)))
            print(f"tiled {setting}: {ms:.2f} ms", flush=True)
        except Exception as error:  # a setting out of registers or shared memory
            rows.append(dict(setting, error=str(error)[:200]))
        finally:
            paged.TUNING.update(base)
    return rows


def worker(avoid_recompile: str, shapes, sweep: dict | None, modes=MODES) -> dict:
    os.environ["TORCH_CUDNN_SDPA_AVOID_RECOMPILE"] = avoid_recompile  # before any cuDNN call
    from cpserve.attention.backend import AttentionShape
    from cpserve.attention.gpu_backend import GPUBackend

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    shape = AttentionShape(HEADS, KV_HEADS, DIM, DIM, dtype)
    backend = GPUBackend(DEVICE, shape=shape, max_prefix_tokens=max(p for _, p in shapes) + 2048)
    torch.manual_seed(0)
    result = dict(avoid_recompile=avoid_recompile, ops=backend.ops,
                  modes=measure_modes(backend, shapes, modes))
    if sweep:
        result["tiled_sweep"] = tiled_sweep(backend, sweep, shapes[-1] if DEVICE == "cpu"
                                            else SWEEP_SHAPE)
    return result


def decide(results: list[dict]) -> dict:
    """The setting a chunked prefill runs fastest with: mean new-shape time over the shapes."""
    options = []
    for res in results:
        for mode in MODES:
            rows = [r for r in res["modes"] if r["mode"] == mode]
            if rows:
                options.append(dict(mode=mode, avoid_recompile=res["avoid_recompile"] == "1",
                                    mean_new_shape_ms=statistics.mean(r["new_shape_ms"]
                                                                      for r in rows),
                                    mean_warm_ms=statistics.mean(r["warm_ms"] for r in rows),
                                    shapes_meeting_target=sum(r["meets_target"] for r in rows),
                                    shapes=len(rows)))
    best = min(options, key=lambda o: o["mean_new_shape_ms"])
    sweeps = [r for res in results for r in res.get("tiled_sweep", []) if "ms" in r]
    tiled = min(sweeps, key=lambda r: r["ms"]) if sweeps else None
    return dict(options=options, best=best, best_tiled=tiled)


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # flag, shapes, out file
    args = parser.parse_args(argv)
    if args.worker:
        flag, shapes, out_file = args.worker
        shapes = [tuple(s) for s in json.loads(shapes)]
        result = worker(flag, shapes, sweep=SWEEP if flag == "1" and len(shapes) > 2 else None)
        Path(out_file).write_text(json.dumps(result))
        return None
    shapes = QUICK_SHAPES if args.quick else SHAPES
    results, errors = [], []
    if args.dry_run:  # tiny heads and sizes, in this process, the kernel path only
        global HEADS, KV_HEADS, DIM
        HEADS, KV_HEADS, DIM = 4, 2, 16
        results.append(worker("1", [(64, 96)], dict(rows_per_tile=[16, 32]), modes=("triton",)))
    for flag in () if args.dry_run else ("1", "0"):
        out_file = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, __file__, "--worker", flag, json.dumps(shapes), out_file]
        try:
            code = subprocess.run(cmd, timeout=WORKER_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        if code == 0:
            results.append(json.loads(Path(out_file).read_text()))
        else:
            errors.append(f"TORCH_CUDNN_SDPA_AVOID_RECOMPILE={flag}: worker {code}")
    report = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                  date=datetime.date.today().isoformat(),
                  torch=torch.__version__, results=results, errors=errors)
    if results:
        report["decision"] = decision = decide(results)
        best = decision["best"]
        print(f"\nfastest chunked prefill: PREFIX_ATTENTION = {best['mode']!r} "
              f"(cpserve/attention/gpu_backend.py), CUDNN_AVOID_RECOMPILE = "
              f"{best['avoid_recompile']} (cpserve/attention/kernels/library_ops.py): mean "
              f"{best['mean_new_shape_ms']:.2f} ms a step, target met on "
              f"{best['shapes_meeting_target']} of {best['shapes']} shapes")
        if decision["best_tiled"]:
            print(f"best tiled-mode tuning: {decision['best_tiled']}")
    for error in errors:
        print("FAILED", error)
    name = report["device"].replace(" ", "-")
    out = Path(args.out_dir) / f"{report['date']}-{name}-chunk-attention.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
