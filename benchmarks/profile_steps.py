"""The engine core on the GPU, through the offline `LLM` API: the throughput issue's three
workloads, a torch.profiler trace of a batch-64 decode step and of a mixed step, and the
sampler's passes on a real vocabulary. One bounded run (about 3 minutes on one H200).

    timeout 290 python benchmarks/profile_steps.py --out-dir $OUT
    timeout 100 python benchmarks/profile_steps.py --traces-only --out-dir $OUT  # traces alone
    python benchmarks/profile_steps.py --smoke --out-dir /tmp/p       # tiny model on CPU

Model: the Llama-3.1-8B shape, random bf16 weights made on the GPU (`load_format="dummy"`),
default engine flags; each engine runs in its own process (a hang costs its time limit).

    engine "async"   (default flags: async scheduling, decode CUDA graphs)
        64x1k        64 prompts x 1024 tokens, 256 out, all at once: output tok/s, TPOT
        512x512      512 prompts of 256..767 tokens (range ratio 0.5), 128 out: total tok/s
        decode-32k   1 prompt of 32,768 tokens, 256 out: TPOT
        traces       5 decode steps at batch 64 (1k context), 3 mixed steps (64 decodes
                     beside a chunk of a new 8k prompt): CPU and CUDA activity, and the share
                     of the window in which the GPU runs something ("busy")
    engine "sync"    --no-async-scheduling: 64x1k and the decode trace again
    sampler          [64, 128256] fp32 logits: greedy, top-k 50, top-p 0.95, both; ms each

Writes <out-dir>/profile-steps.json, the key-average tables (profile-*.txt) and the chrome
traces (trace-*.json). What the figures decide is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from job_process import answer_job, run_job  # noqa: E402
from serving_model import LLAMA_31_8B, TINY, write_model_dir  # noqa: E402

MAX_MODEL_LEN = 32768 + 1024
ENGINE_TIMEOUT_S = {"async": 150, "sync": 90}
# name: (prompts, prompt tokens, output tokens, range ratio)
WORKLOADS = {"64x1k": (64, 1024, 256, 0.0), "512x512": (512, 512, 128, 0.5),
             "decode-32k": (1, 32768, 256, 0.0)}
SMOKE_WORKLOADS = {"64x1k": (8, 32, 8, 0.0), "512x512": (16, 24, 6, 0.5),
                   "decode-32k": (1, 200, 8, 0.0)}


def _prompts(num: int, tokens: int, ratio: float, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = int(tokens * (1 - ratio)), int(tokens * (1 + ratio))
    lengths = torch.randint(lo, hi + 1, (num,), generator=gen).tolist() if ratio else [tokens] * num
    return [torch.randint(0, vocab - 256, (n,), generator=gen).tolist() for n in lengths]


def run_workload(llm, name: str, spec: tuple) -> dict:
    from cpserve import SamplingParams

    num, tokens, out_tokens, ratio = spec
    prompts = _prompts(num, tokens, ratio, llm.engine.config.model.vocab_size, seed=len(name))
    params = SamplingParams(temperature=0, max_tokens=out_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) * 1e3
            / (len(o.outputs[0].token_ids) - 1) for o in outputs if len(o.outputs[0].token_ids) > 1]
    out = sum(len(o.outputs[0].token_ids) for o in outputs)
    total = out + sum(len(p) for p in prompts)
    result = dict(name=name, num_prompts=num, wall_s=wall, output_tok_per_s=out / wall,
                  total_tok_per_s=total / wall, tpot_ms_median=statistics.median(tpot),
                  ttft_s_median=statistics.median(o.metrics.first_token_time
                                                  - o.metrics.arrival_time for o in outputs))
    print(f"{name}: {result['output_tok_per_s']:.0f} out tok/s, {result['total_tok_per_s']:.0f} "
          f"total tok/s, TPOT {result['tpot_ms_median']:.2f} ms, wall {wall:.2f} s", flush=True)
    return result


def gpu_busy(trace_file: Path) -> dict:
    """Share of the traced window in which some kernel, copy or memset runs on the GPU."""
    events = json.loads(trace_file.read_text()).get("traceEvents", [])
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "ts" in e)
    if not spans:
        return dict(busy=None, window_us=0, kernels=0)
    busy, end = 0.0, spans[0][0]
    for lo, hi in spans:
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    window = spans[-1][1] - spans[0][0]
    return dict(busy=busy / window, window_us=window, kernels=len(spans))


def profile_steps(llm, label: str, steps: int, out_dir: Path, mixed: bool) -> dict:
    """Profile `steps` engine steps of 64 decoding requests (and a chunk of a new prompt in
    each, if `mixed`)."""
    from cpserve import SamplingParams

    engine, smoke = llm.engine, llm.engine.device.type != "cuda"
    vocab = engine.config.model.vocab_size
    ctx, batch = (32, 8) if smoke else (1024, 64)
    decode = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, ctx, 0.0, vocab, seed=99)):
        engine.add_request(f"{label}-d{i}", p, decode)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()
    for _ in range(4):
        engine.step()  # steady decoding (and its graph replayed) before the window
    if mixed:
        long = _prompts(1, 256 if smoke else 8192, 0.0, vocab, seed=7)[0]
        engine.add_request(f"{label}-chunked", long,
                           SamplingParams(temperature=0, max_tokens=1))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    host_ms = []
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            host_ms.append((time.perf_counter() - start) * 1e3)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    trace = out_dir / f"trace-{label}.json"
    prof.export_chrome_trace(str(trace))
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (out_dir / f"profile-{label}.txt").write_text(f"{table}\n\n{cpu_table}\n")
    engine.abort_request([f"{label}-d{i}" for i in range(batch)] + [f"{label}-chunked"])
    while engine.has_unfinished_requests():
        engine.step()
    result = dict(label=label, steps=steps, step_call_ms=host_ms, **gpu_busy(trace))
    print(f"trace {label}: step() calls {[round(t, 2) for t in host_ms]} ms, GPU busy "
          f"{result['busy']}", flush=True)
    return result


def engine_worker(job: dict) -> dict:
    from cpserve import LLM

    out_dir = Path(job["out_dir"])
    results = dict(engine=job["label"], workloads=[], traces=[])
    with LLM(job["model"], **job["flags"]) as llm:
        workloads = SMOKE_WORKLOADS if job["smoke"] else WORKLOADS
        run_workload(llm, "warm-up", (8, 64, 8, 0.0))
        for name in job["workloads"]:
            results["workloads"].append(run_workload(llm, name, workloads[name]))
        for mixed in job["traces"]:
            label = f"{job['label']}-{'mixed' if mixed else 'decode'}64"
            results["traces"].append(profile_steps(llm, label, 3 if mixed else 5, out_dir,
                                                   mixed))
    return results


def sampler_timings(device: str, vocab: int) -> dict:
    """ms per call of the sampler on [64, vocab] logits (median of 10 after 3)."""
    from cpserve.engine.sampler import Sampler, SamplingRow
    from cpserve.sampling_params import SamplingParams

    logits = torch.randn(64, vocab, device=device) * 3
    sampler, result = Sampler(0), {}
    for name, kw in (("greedy", dict(temperature=0)), ("top-k 50", dict(top_k=50)),
                     ("top-p 0.95", dict(top_p=0.95)), ("top-k 50 + top-p 0.95",
                                                        dict(top_k=50, top_p=0.95))):
        rows = [SamplingRow(SamplingParams(**kw), None, []) for _ in range(64)]
        times = []
        for i in range(13):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sampler(logits, rows)  # resolves: waits for the device
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
        result[name] = statistics.median(times)
    print(f"sampler ms ([64, {vocab}]): {result}", flush=True)
    return result


def decisions(report: dict) -> list[str]:
    by_engine = {e["engine"]: e for e in report["engines"] if e}
    lines = []
    a, s = by_engine.get("async"), by_engine.get("sync")
    if a and s:
        ta = next(w for w in a["workloads"] if w["name"] == "64x1k")["output_tok_per_s"]
        ts = next(w for w in s["workloads"] if w["name"] == "64x1k")["output_tok_per_s"]
        lines.append(f"async scheduling: 64x1k {ta:.0f} vs {ts:.0f} out tok/s synchronous: "
                     + ("keep it on by default" if ta >= ts else
                        "async is slower: look at the traces before keeping it the default"))
    for engine in by_engine.values():
        for t in engine["traces"]:
            if t["busy"] is not None:
                lines.append(f"{t['label']}: GPU busy {100 * t['busy']:.1f}% of the window")
    mixed = [t for e in by_engine.values() for t in e["traces"] if "mixed" in t["label"]]
    if mixed and mixed[0]["busy"] is not None:
        lines.append("piecewise graphs for mixed steps: "
                     + ("would not pay (the GPU is busy through mixed steps)"
                        if mixed[0]["busy"] > 0.95 else
                        "the GPU idles in mixed steps: see profile-async-mixed64.txt for "
                        "launch-bound layers before building them"))
    sampling = report.get("sampler") or {}
    if sampling:
        lines.append(f"top-p alone (full sort) {sampling['top-p 0.95']:.2f} ms vs top-k "
                     f"{sampling['top-k 50']:.2f} ms: a sort-free top-p pays only if the "
                     "first is a real share of a decode step")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", required=False, default="/tmp/cpserve-profile-steps")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--traces-only", action="store_true",
                    help="the default engine's two traces alone (about a minute on one H200)")
    ap.add_argument("--engine-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_worker:
        answer_job(args.engine_worker, engine_worker)
        return
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    shape = TINY if args.smoke else LLAMA_31_8B
    max_len = 1024 if args.smoke else MAX_MODEL_LEN
    model = write_model_dir(Path(tempfile.mkdtemp(prefix="cpserve-profile-")), shape, max_len)
    flags = dict(dtype="bfloat16" if device == "cuda" else "float32", device=device,
                 load_format="dummy", max_model_len=max_len)
    if args.smoke:
        flags.update(kv_cache_memory=0.05, max_num_batched_tokens=128)
    jobs = [dict(label="async", flags=dict(flags, async_scheduling=True),
                 workloads=list(WORKLOADS), traces=[False, True]),
            dict(label="sync", flags=dict(flags, async_scheduling=False),
                 workloads=["64x1k"], traces=[False])]
    if args.traces_only:  # where a step's time goes, without the throughput runs
        jobs = [dict(jobs[0], workloads=[])]
    report = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"), engines=[],
                  errors=[])
    for job in jobs:
        job.update(model=str(model), out_dir=str(out_dir), smoke=args.smoke)
        if args.smoke:
            result, error = engine_worker(job), None
        else:
            result, error = run_job(__file__, "--engine-worker", job,
                                    ENGINE_TIMEOUT_S[job["label"]])
        report["engines"].append(result)
        if error:
            report["errors"].append(dict(engine=job["label"], error=error))
            print(f"engine {job['label']} failed: {error}", flush=True)
    report["sampler"] = sampler_timings(device, shape["vocab_size"])
    report["decisions"] = decisions(report)
    (out_dir / "profile-steps.json").write_text(json.dumps(report, indent=1))
    for line in report["decisions"]:
        print(f"DECIDES: {line}")
    print(f"wrote {out_dir / 'profile-steps.json'}")


if __name__ == "__main__":
    main()
