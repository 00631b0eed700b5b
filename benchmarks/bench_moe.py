"""MoE and MLA on one GPU: issue 18's targets through the whole engine, and the tuning choices
the code leaves as constants, each measured and decided here.

    python benchmarks/bench_moe.py --out DIR                    # one H200, at most --budget-s
    python benchmarks/bench_moe.py --tiny --device cpu --out DIR   # the logic, on CPU

Sections, in this order (`--only` picks some); each is bounded by what is left of
`--budget-s`, and one that fails is recorded with its error while the next one runs:

  moe     the routed experts of one layer: the reference loop, torch._grouped_mm, and the
          Triton kernel with its constants and with candidate tiles, at decode (1, 4 and 16
          tokens) and prefill (8k, 32k) sizes of both models. Decides SORTED_CONFIG,
          SORTED_SMALL_CONFIG, BY_EXPERT_CONFIG, BY_EXPERT_MAX_PAIRS (kernels/fused_moe.py)
          and CUDA_EXPERTS (experts.py).
  mla     one DeepSeek-V2-Lite attention layer prefilling n tokens, absorbed and expanded:
          decides MLA_EXPANDED_MIN_TOKENS (deepseek_v2.py); and cuDNN with values narrower
          than keys against values padded (gpu_backend.py pads today).
  engine  per model, through `LLM` (scheduler, CUDA graphs, sampling; random weights made on
          the GPU): TTFT of a 32k prompt in one step (long_prefill_token_threshold=0), then the time of a decode step at 32k
          context for each batch (16 requests share the 32k prefix through prefix caching,
          so one prefill fills them all); a profile of one prefill and of decode steps. Then,
          while time is left, DeepSeek's TTFT with default flags (8192 tokens a step, prompts
          chunked at 4096, chunks after the first reading their cached prefix expanded).
  tests   with the time left (at least 60 s): kernel-versus-reference tests on this GPU (bf16
          included) and the bf16 MoE / MLA parity tests against transformers (pytest).

With `--apply-tuning` (the default) the engine runs with what moe and mla decided, so its
numbers are those of the constants flipped as printed. Writes DIR/bench_moe.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe_tuning import (  # noqa: E402
    MODELS,
    TINY_MODELS,
    apply_moe,
    bench_mla,
    bench_moe,
    sync,
    write_model_dir,
)

# Decode batches per model (the targets).
BATCHES = {"dsv2lite": [1, 16], "qwen3moe": [1]}
TARGETS = {("dsv2lite", "ttft_s"): 1.0, ("dsv2lite", "decode_ms_1"): 3.0,
           ("dsv2lite", "decode_ms_16"): 10.0, ("qwen3moe", "ttft_s"): 1.6,
           ("qwen3moe", "decode_ms_1"): 4.5}
TODAY = {("dsv2lite", "ttft_s"): 13.34, ("dsv2lite", "decode_ms_1"): 9.15,
         ("dsv2lite", "decode_ms_16"): 30.6}
SECTIONS = ("tests", "moe", "mla", "engine")
TEST_FILES = ["tests/test_fused_moe.py", "tests/test_layer_kernels.py",
              "tests/test_kernels_backend.py::test_planned_dense_with_values_narrower_than_keys",
              "tests/test_gpu_moe.py"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for bench_moe.json")
    p.add_argument("--tiny", action="store_true", help="toy shapes (logic check)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--only", action="append", choices=SECTIONS)
    p.add_argument("--models", default="dsv2lite,qwen3moe")
    p.add_argument("--context", type=int, default=None, help="default 32768 (tiny: 48)")
    p.add_argument("--steps", type=int, default=12, help="timed decode steps per batch")
    p.add_argument("--repeats", type=int, default=2, help="timed prefills per model")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall time for all sections; a section that would start later skips")
    p.add_argument("--apply-tuning", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    args.context = args.context or (48 if args.tiny else 32768)
    args.sections = args.only or (["moe", "mla", "engine"] if args.tiny else list(SECTIONS))
    args.models = args.models.split(",")
    args.reps = 1 if args.tiny else 5  # timed repetitions of a kernel or layer
    return args


# engine -------------------------------------------------------------------------------------
def chunked_ttft(args, name: str, tmp: Path) -> dict:
    """TTFT of a `--context` prompt with default flags (8192 tokens a step, prompts chunked
    at half that: engine/args.py): what a user gets. Chunks after the first attend to their
    cached prefix (MLA: expanded, cpserve/attention/latent_prefix.py; bench_mla_prefix.py
    compares it with the absorbed prefix)."""
    from cpserve import LLM, SamplingParams

    shape = (TINY_MODELS if args.tiny else MODELS)[name]
    ctx = args.context
    llm = LLM(str(write_model_dir(shape, tmp / f"{name}-chunked")), device=args.device,
              dtype="float32" if args.tiny else "bfloat16", load_format="dummy",
              num_kv_blocks=2 * (ctx // 16 + 2), max_model_len=ctx + 16,
              max_num_batched_tokens=16 if args.tiny else None, enable_prefix_caching=False)
    try:
        runs = []
        for _ in range(2):
            prompt = torch.randint(0, int(shape["vocab_size"]), (ctx,)).tolist()
            sync(args.device)
            start = time.perf_counter()
            llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1),
                         use_tqdm=False)
            sync(args.device)
            runs.append(time.perf_counter() - start)
        budget = llm.engine.config.scheduler.max_num_batched_tokens
        cap = llm.engine.config.scheduler.long_prefill_token_threshold
    finally:
        llm.shutdown()
    print(f"[engine] {name} TTFT at {ctx} with {budget} tokens a step (chunks of {cap}): "
          f"{runs[-1]:.3f} s", flush=True)
    return dict(ttft_chunked_s=runs[-1], ttft_chunked_runs_s=runs, chunk_tokens=budget,
                long_prefill_token_threshold=cap)


def bench_engine(args, name: str, tmp: Path) -> dict:
    from cpserve import LLM, SamplingParams

    shape = (TINY_MODELS if args.tiny else MODELS)[name]
    ctx = args.context
    batches = [1, 2] if args.tiny else BATCHES[name]
    extra = args.steps + 24
    block = 16
    # Distinct prompts for the TTFT runs, then one shared prefix and a tail per request.
    blocks = (args.repeats + 2) * (ctx // block + 2) + max(batches) * (extra // block + 4)
    llm = LLM(str(write_model_dir(shape, tmp / name)), device=args.device, dtype=(
        "float32" if args.tiny else "bfloat16"), load_format="dummy", block_size=block,
        num_kv_blocks=blocks, max_model_len=ctx + 2 * extra, max_num_batched_tokens=ctx,
        # One step for the whole prompt: without this the default cap (half the budget,
        # engine/args.py DEFAULT_LONG_PREFILL_SHARE) splits it in two chunks (device run 6
        # measured those as "one step").
        long_prefill_token_threshold=0,
        max_num_seqs=max(batches), enable_prefix_caching=True)
    engine, vocab = llm.engine, int(shape["vocab_size"])
    gen = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    def prefill_s(prompt, rid):
        sync(args.device)
        start = time.perf_counter()
        engine.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        sync(args.device)
        return time.perf_counter() - start

    result = dict(model=name, context=ctx)
    try:
        runs = [prefill_s(tokens(ctx), f"ttft-{i}") for i in range(1 + args.repeats)]
        result["ttft_runs_s"] = runs
        result["ttft_s"] = min(runs[1:])  # the first also builds cuDNN's plans for the length
        print(f"[engine] {name} TTFT at {ctx}: {result['ttft_s']:.3f} s (runs {runs})",
              flush=True)
        prefix = tokens(ctx - block)
        for batch in batches:
            result[f"decode_ms_{batch}"], result[f"decode_steps_ms_{batch}"] = decode_ms(
                engine, prefix, tokens, batch, args)
            print(f"[engine] {name} decode batch {batch} at {ctx}: "
                  f"{result[f'decode_ms_{batch}']:.2f} ms/step", flush=True)
        result["profile"] = profile(args, engine, tokens, ctx, prefix, max(batches))
        runner = engine.executor.runner
        result["fallbacks"] = sorted(getattr(runner.backend, "fallbacks", []))
        result["cuda_graph_buckets"] = (sorted({key[0] for key in runner.graphs.graphs})
                                        if runner.graphs else [])
    finally:
        llm.shutdown()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return result


def decode_ms(engine, prefix, tokens, batch: int, args) -> tuple[float, list[float]]:
    """Median time of a step in which all `batch` requests decode (prompts: the shared prefix
    plus a tail each), after 2 such steps of warm-up (graph capture)."""
    from cpserve import SamplingParams

    rids = [f"decode-{batch}-{i}" for i in range(batch)]
    params = SamplingParams(max_tokens=args.steps + 16, ignore_eos=True)  # admission slack
    for rid in rids:
        engine.add_request(rid, prefix + tokens(16), params)
    times, decoding = [], 0
    generated = collections.Counter()  # tokens so far, per request
    try:
        while engine.has_unfinished_requests() and len(times) < args.steps:
            sync(args.device)
            start = time.perf_counter()
            outputs = engine.step().outputs
            sync(args.device)
            elapsed = time.perf_counter() - start
            for o in outputs:
                generated[o.request_id] += len(o.new_token_ids)
            if len(outputs) == batch and all(generated[o.request_id] > 1 for o in outputs):
                decoding += 1
                if decoding > 2:
                    times.append(elapsed * 1e3)
    finally:
        engine.abort_request(rids)
    return statistics.median(times), times


def profile(args, engine, tokens, ctx, prefix, batch) -> dict:
    """Top kernels (GPU time) of one prefill of `ctx` tokens and of 3 decode steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from cpserve import SamplingParams

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if args.device == "cuda" else [])

    def table(prof, per: int) -> dict:
        kind = "CUDA" if args.device == "cuda" else "CPU"
        events = [e for e in prof.key_averages() if e.device_type.name == kind]
        total_of = (lambda e: e.self_device_time_total) if kind == "CUDA" else (
            lambda e: e.self_cpu_time_total)
        top = sorted(events, key=lambda e: -total_of(e))[:15]
        return dict(total_ms=sum(total_of(e) for e in events) / per / 1e3, top=[
            dict(name=e.key[:100], ms=total_of(e) / per / 1e3, calls=e.count / per)
            for e in top])

    out = {}
    with torch_profile(activities=activities) as prof:
        engine.add_request("profile-prefill", tokens(ctx), SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        sync(args.device)
    out["prefill"] = table(prof, 1)
    rids = [f"profile-decode-{i}" for i in range(batch)]
    for rid in rids:
        engine.add_request(rid, prefix + tokens(16), SamplingParams(max_tokens=8,
                                                                    ignore_eos=True))
    generated = collections.Counter()  # tokens so far, per request
    while not all(generated[rid] > 1 for rid in rids):
        for o in engine.step().outputs:
            generated[o.request_id] += len(o.new_token_ids)
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            engine.step()
        sync(args.device)
    engine.abort_request(rids)
    out["decode"] = dict(table(prof, 3), batch=batch)
    for what in ("prefill", "decode"):
        print(f"[profile] {what}: {out[what]['total_ms']:.2f} ms of kernels; top: " + "; ".join(
            f"{k['name'][:60]} {k['ms']:.3f}ms x{k['calls']:.0f}" for k in out[what]["top"][:8]),
            flush=True)
    return out


# tests --------------------------------------------------------------------------------------
def run_tests(args, seconds: float) -> dict:
    root = Path(__file__).parent.parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", *TEST_FILES]
    try:
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=seconds)
        tail = (done.stdout + done.stderr)[-3000:]
        result = dict(returncode=done.returncode, tail=tail)
    except subprocess.TimeoutExpired as exc:
        result = dict(returncode=None, tail=f"timed out after {seconds:.0f} s: "
                      f"{(exc.stdout or b'')[-2000:]!r}")
    print(f"[tests] returncode {result['returncode']}\n{result['tail'][-1500:]}", flush=True)
    return result


# main ---------------------------------------------------------------------------------------
def summary(results: dict) -> list[str]:
    lines = ["(tiny shapes: a logic check, not the targets)"] if results.get("tiny") else []
    for (model, key), target in TARGETS.items():
        got = results.get("engine", {}).get(model, {}).get(key)
        unit = "s" if key == "ttft_s" else "ms"
        today = TODAY.get((model, key))
        verdict = "not run" if got is None else ("met" if got <= target else "not met")
        lines.append(f"{model:<9} {key:<13} target <= {target:g} {unit}: "
                     f"{'-' if got is None else f'{got:.3f}'} {unit} ({verdict})"
                     + (f", before {today} {unit}" if today else ""))
    for section in ("moe", "mla"):
        if "decisions" in results.get(section, {}):
            lines.append(f"{section} decisions: {json.dumps(results[section]['decisions'])}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "bench_moe.json"
    results = dict(date=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__,
                   device=(torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"),
                   context=args.context, tiny=args.tiny)

    def save():
        out_file.write_text(json.dumps(results, indent=2, default=str))

    def section(name, fn, needs_s: float):
        left = deadline - time.monotonic()
        if left < needs_s:
            results[name] = dict(skipped=f"{left:.0f} s left of --budget-s, needs ~{needs_s}")
            print(f"[{name}] skipped: {results[name]['skipped']}", flush=True)
            return None
        try:
            value = fn(left)
        except Exception as exc:  # noqa: BLE001 - recorded; the next section runs
            traceback.print_exc()
            value = dict(error=f"{type(exc).__name__}: {exc}")
        results[name] = value
        save()
        return value

    with tempfile.TemporaryDirectory() as tmp:
        if "moe" in args.sections:
            moe = section("moe", lambda left: bench_moe(args), 20)
            if args.apply_tuning and moe and "decisions" in moe:
                apply_moe(moe["decisions"])
        if "mla" in args.sections:
            mla = section("mla", lambda left: bench_mla(args, Path(tmp)), 20)
            if args.apply_tuning and mla and "decisions" in mla:
                import cpserve.models.deepseek_v2 as ds

                ds.MLA_EXPANDED_MIN_TOKENS = mla["decisions"]["MLA_EXPANDED_MIN_TOKENS"]
        if "engine" in args.sections:
            results["engine"] = {}
            for i, name in enumerate(args.models):
                needs = 30 if args.tiny else (90 if i == len(args.models) - 1 else 150)
                left = deadline - time.monotonic()
                if left < needs:
                    results["engine"][name] = dict(skipped=f"{left:.0f} s left")
                    continue
                try:
                    results["engine"][name] = bench_engine(args, name, Path(tmp))
                except Exception as exc:  # noqa: BLE001 - recorded; the next model runs
                    traceback.print_exc()
                    results["engine"][name] = dict(error=f"{type(exc).__name__}: {exc}")
                save()
            # What a user gets with default flags, if time is left: DeepSeek's chunks read
            # their prefix absorbed (Qwen's GQA prefix path is the long-prompt work's).
            for name in [m for m in args.models if m == "dsv2lite" or args.tiny]:
                if "ttft_s" in results["engine"].get(name, {}) and deadline - time.monotonic() > (
                        10 if args.tiny else 60):
                    try:
                        results["engine"][name].update(chunked_ttft(args, name, Path(tmp)))
                    except Exception as exc:  # noqa: BLE001
                        traceback.print_exc()
                        results["engine"][name]["ttft_chunked_error"] = str(exc)
                    save()
        if "tests" in args.sections:  # last: whatever time the measurements left
            section("tests", lambda left: run_tests(args, left - 10), 60)
    results["tuning_applied"] = args.apply_tuning
    results["summary"] = summary(results)
    save()
    print("\n".join(results["summary"]), flush=True)
    print(f"wrote {out_file}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
