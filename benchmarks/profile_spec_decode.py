"""Where a verification step's time goes (issue 13): torch.profiler over the engine's decode,
verification and MTP drafting steps, and the paged kernel alone at the step's shapes.

    timeout 300 python benchmarks/profile_spec_decode.py --out-dir $OUT     # one H200
    python benchmarks/profile_spec_decode.py --smoke --out-dir /tmp/p        # tiny, CPU

Per model of bench_spec_decode.py (ngram-8b, mtp-v2lite; one engine each, in its own
process, built as a user would: `LLM`, random bf16 weights, CUDA graphs) and batch (1, 8) at
32k context, for each step kind (decode, verify, verify+draft with MTP):

    wall      median ms of the step from idle to idle (as bench_spec_decode.py)
    graphed   the kernels of STEPS steps as they run (graph replays included): device ms per
              step in all, by kind of kernel (attention, MoE, GEMM, ...) and the largest ones
    busy      device ms per step / wall ms: what the GPU does of the step's time

and the paged kernel alone (CUDA events) at the decode and verification shapes of each model,
with the KV bytes it reads per microsecond. Writes <out-dir>/profile-spec-decode.json and
.txt (the same, readable).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_spec_decode import CONTEXT, MODELS, SMOKE_MODELS, BenchSteps, K, engine_flags  # noqa: E402
from job_process import answer_job, run_job  # noqa: E402
from serving_model import write_model_dir  # noqa: E402

BATCHES = (1, 8)
STEPS, WARMUP, TOP = 5, 3, 12
ENGINE_TIMEOUT_S = 130
# Kernel kinds, first match wins (names as CUPTI reports them).
KINDS = [("paged-attention", r"_paged_kernel"), ("attention-merge", r"_merge_kernel"),
         ("moe", r"moe|_experts|routing|topk|sort"), ("gemm", r"nvjet|gemm|cutlass|xmma|splitK"),
         ("norm", r"rms_norm"), ("rope", r"rope"), ("kv-write", r"_write_kv"),
         ("argmax/softmax", r"ArgMax|softmax|Max"), ("copy", r"Memcpy|Memset|copy")]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name, re.I)), "other")


def kernel_table(prof, steps: int, device: str) -> dict:
    """Device ms per step: in all, by kind, and the TOP largest kernels."""
    kind = "CUDA" if device == "cuda" else "CPU"
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if e.device_type.name == kind
              and getattr(e, attr) > 0]
    if device != "cuda":  # CPU: operators, not kernels; the top ones only
        events = [e for e in events if e.key.startswith("aten::")]
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + getattr(e, attr)
    top = sorted(events, key=lambda e: -getattr(e, attr))[:TOP]
    return {"device_ms": sum(getattr(e, attr) for e in events) / steps / 1e3,
            "by_kind_ms": {k: v / steps / 1e3 for k, v in sorted(by_kind.items(),
                                                               key=lambda kv: -kv[1])},
            "kernels": [dict(name=e.key[:110], ms=getattr(e, attr) / steps / 1e3,
                             calls=e.count / steps) for e in top]}


def profile_kind(bench: BenchSteps, kind: str, device: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    wall = bench.timed(kind, STEPS, WARMUP)
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    bench.sync()
    with profile(activities=activities) as prof:
        for _ in range(STEPS):
            bench.run(kind)
        bench.sync()
    table = kernel_table(prof, STEPS, device)
    return dict(kind=kind, wall_ms=wall, busy=table["device_ms"] / wall, **table)


def engine_worker(job: dict) -> list[dict]:
    from cpserve import LLM

    rows = []
    with LLM(job["model_dir"], **job["flags"]) as llm:
        for batch in BATCHES:
            bench = BenchSteps(llm, job["context"], batch)
            try:
                kinds = ["decode", "verify"] + (["verify+draft"] if bench.is_mtp else [])
                for kind in kinds:
                    row = dict(model=job["name"], batch=batch, **profile_kind(
                        bench, kind, job["device"]))
                    print(json.dumps({k: row[k] for k in ("model", "batch", "kind", "wall_ms",
                                                          "device_ms", "by_kind_ms")}),
                          flush=True)
                    rows.append(row)
            finally:
                bench.close()
    return rows


# Paged-kernel tuning candidates: decode and verification calls of each shape run under each
# (knob names of attention/kernels/paged.py TUNING: unprefixed and "wide_" ones are decode's,
# "verify_" and "wide_verify_" ones the verification steps').
SWEEP = {
    "gqa": [{}, dict(verify_num_stages=2), dict(verify_num_stages=2, verify_block_n=128),
            dict(verify_num_stages=2, verify_target_programs_per_sm=4),
            dict(verify_num_stages=2, verify_target_programs_per_sm=8),
            dict(verify_num_stages=2, verify_block_n=128, verify_target_programs_per_sm=8),
            dict(verify_block_n=128, verify_target_programs_per_sm=8),
            dict(verify_num_stages=1), dict(verify_num_stages=2, verify_block_n=32),
            dict(verify_num_stages=2, verify_num_warps=8, verify_block_n=128),
            dict(target_programs_per_sm=8), dict(target_programs_per_sm=6),
            dict(target_programs_per_sm=8, block_n=128),
            dict(target_programs_per_sm=8, num_stages=2), dict(target_programs_per_sm=16)],
    # latent_blocks: each latent block read once for scores and values (run 7's last sweep)
    "mla": [{}, dict(latent_blocks=True),
            dict(latent_blocks=True, wide_num_warps=8, wide_verify_num_warps=8),
            dict(latent_blocks=True, wide_block_n=64, wide_verify_block_n=64),
            dict(latent_blocks=True, wide_block_n=16, wide_verify_block_n=16),
            dict(latent_blocks=True, wide_num_warps=8, wide_verify_num_warps=8, wide_block_n=64,
                 wide_verify_block_n=64),
            dict(latent_blocks=True, wide_num_stages=3, wide_verify_num_stages=3),
            dict(latent_blocks=True, wide_num_warps=8, wide_verify_num_warps=8,
                 wide_num_stages=3, wide_verify_num_stages=3),
            dict(latent_blocks=True, wide_verify_acc_budget=32768, wide_verify_num_warps=8),
            dict(latent_blocks=True, wide_verify_acc_budget=65536, wide_verify_num_warps=8),
            dict(latent_blocks=True, wide_target_programs_per_sm=4,
                 wide_verify_target_programs_per_sm=4),
            dict(latent_blocks=True, wide_num_stages=1, wide_verify_num_stages=1)],
}


def graph_us(fn, device: str, reps: int) -> float:
    """Microseconds per call of `fn` replayed in a CUDA graph (no host launch cost), or
    timed eagerly on a CPU."""
    from bench_fp8 import time_us

    if device != "cuda":
        return time_us(fn, device, reps=reps)
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_us(graph.replay, device, reps=reps)


def paged_alone(device: str, smoke: bool, sweep: bool, families: list[str],
                save=lambda rows: None) -> list[dict]:
    """The paged kernel at each model's decode (1 row a request) and verification (1 + K rows)
    shapes, one layer's cache, in CUDA graphs: us per call and KV TB/s, with the default
    tuning (and each SWEEP candidate with `sweep`; one that fails is recorded with its
    error). GQA also at 64 requests of 1k context in tables 32k wide (as the engine's are at
    this max_model_len): what a decode tuning does to short-context batches."""
    from cpserve.attention.kernels import paged

    if device != "cuda" and not paged.INTERPRETING:
        print("paged kernel alone: skipped (CPU without TRITON_INTERPRET=1)", flush=True)
        return []
    context, page = (256 if smoke else CONTEXT), 16
    shapes = {"gqa": ("8b (GQA 32/8, 128)", 32, 8, 128, 128, False),
              "mla": ("v2-lite (MLA 16/1, 576/512)", 16, 1, 576, 512, True)}
    if smoke:
        shapes = {"gqa": ("tiny GQA", 4, 2, 64, 64, False), "mla": ("tiny MLA", 4, 1, 96, 64,
                                                                   True)}
    # (family, batch, context, rows per request)
    cases = [(f, b, context, (1, 1 + K)) for f in families for b in BATCHES]
    if "gqa" in families:
        cases.append(("gqa", 8 if smoke else 64, context // 32, (1,)))
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    width = context // page + 1
    for family, batch, length, row_counts in cases:
        name, heads, kv_heads, dk, dv, latent = shapes[family]
        pages = length // page + 1
        k = torch.randn(batch * pages, page, kv_heads, dk, device=device, dtype=dtype)
        v = None if latent else torch.randn(batch * pages, page, kv_heads, dv, device=device,
                                            dtype=dtype)
        tables = torch.zeros(batch, width, device=device, dtype=torch.int32)
        tables[:, :pages] = torch.arange(batch * pages, device=device,
                                         dtype=torch.int32).view(batch, pages)
        kv_bytes = k.numel() * k.element_size() * (1 if latent else 2)
        for tuning in (SWEEP[family] if sweep else [{}])[:2 if smoke else None]:
            for q_rows in row_counts:
                q = torch.randn(batch * q_rows, heads, dk, device=device, dtype=dtype)
                seq = torch.arange(batch, device=device,
                                   dtype=torch.int32).repeat_interleave(q_rows)
                lens = (torch.full((batch, q_rows), length, device=device, dtype=torch.int32)
                        + torch.arange(q_rows, device=device, dtype=torch.int32)).flatten()
                saved = dict(paged.TUNING)
                paged.TUNING.update(tuning)
                call = functools.partial(
                    paged.paged_attention_triton, q, k, v, tables, seq, lens, 0.1,
                    v_dim=dv if latent else None, tiled=False if q_rows == 1 else None,
                    queries_per_seq=q_rows)
                row = dict(shape=name, batch=batch, context=length, rows_per_request=q_rows,
                           tuning=tuning)
                try:
                    row["us"] = graph_us(call, device, reps=3 if smoke else 20)
                    row["kv_tb_s"] = kv_bytes / row["us"] / 1e6
                except Exception as e:  # a candidate past the GPU's resources
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    if device == "cuda":
                        torch.cuda.synchronize()
                finally:
                    paged.TUNING.clear()
                    paged.TUNING.update(saved)
                rows.append(row)
                save(rows)
                print(f"paged {name} {batch} x {length} x {q_rows} rows {tuning or 'default'}: "
                      + (f"{row['us']:.1f} us" if "us" in row else row["error"]), flush=True)
        del k, v
    return rows


def report_lines(report: dict) -> list[str]:
    lines = [f"profile_spec_decode: {report['device']}, torch {report['torch']}, "
             f"{report['date']}, K = {K}, context {report['context']}"]
    for r in report["steps"]:
        lines.append(f"{r['model']} batch {r['batch']} {r['kind']}: wall {r['wall_ms']:.3f} "
                     f"ms, device {r['device_ms']:.3f} ms (busy {100 * r['busy']:.0f}%)")
        lines.append("    by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                 r["by_kind_ms"].items()))
        for k in r["kernels"]:
            lines.append(f"    {k['ms']:8.3f} ms {k['calls']:6.1f}x  {k['name']}")
    for p in report["paged"]:
        result = (f"{p['us']:.1f} us ({p['kv_tb_s']:.2f} TB/s of KV)" if "us" in p
                  else p["error"])
        lines.append(f"paged {p['shape']} {p['batch']} x {p['context']} x "
                     f"{p['rows_per_request']} rows {p['tuning'] or 'default'}: {result}")
    lines += [f"error: {e}" for e in report["errors"]]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default="/tmp/cpserve-profile-spec")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--paged-sweep", action="store_true",
                    help="the paged kernel alone under each tuning candidate (no engines)")
    ap.add_argument("--families", default="gqa,mla", help="paged-kernel shapes: gqa, mla")
    ap.add_argument("--engine-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_worker:
        answer_job(args.engine_worker, engine_worker)
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    context = 64 if args.smoke else CONTEXT
    report = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"), context=context,
                  steps=[], paged=[], errors=[])

    def save() -> None:
        (out_dir / "profile-spec-decode.json").write_text(json.dumps(report, indent=1))
        (out_dir / "profile-spec-decode.txt").write_text("\n".join(report_lines(report)) + "\n")

    models = SMOKE_MODELS if args.smoke else MODELS
    for name in [] if args.paged_sweep else [m for m in args.models.split(",") if m]:
        shape, spec = models[name]
        flags = engine_flags(shape, spec, args.smoke)
        model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix=f"cpserve-{name}-")), shape,
                                    flags["max_model_len"])
        job = dict(name=name, model_dir=str(model_dir), flags=flags, context=context,
                   device=device)
        rows, error = ((engine_worker(job), None) if args.smoke
                       else run_job(__file__, "--engine-worker", job, ENGINE_TIMEOUT_S, []))
        report["steps"] += rows
        if error:
            report["errors"].append(f"{name}: {error}")
        save()
    def save_paged(rows: list[dict]) -> None:
        report["paged"] = rows
        save()

    report["paged"] = paged_alone(device, args.smoke, args.paged_sweep,
                                  args.families.split(","), save_paged)
    save()
    print("\n".join(report_lines(report)))


if __name__ == "__main__":
    main()
