"""Long-context benchmark: prefill time to first token and decode time per output token.

    python benchmarks/bench_long_context.py --out-dir benchmarks/results      # everything
    python benchmarks/bench_long_context.py --quick                           # a smoke run

Model: the Llama-3.1-8B shape (32 layers, hidden 4096, 32 heads, 8 KV heads, vocab 128256,
llama3 rope scaling) with random bf16 weights made on the GPU (load format "dummy": no
checkpoint files). DCP needs KV heads shared by TP ranks, so the DCP comparison uses the same
shape with one KV head (tp 2: both ranks hold it; dcp 2 turns the copies into shards).

Phases, each in its own process (a hang or crash costs one phase, not the run):
    pcp1   one GPU: prefill TTFT, decode TPOT with CUDA graphs and eager, a decode profile
    pcp2   two GPUs, -pcp 2: prefill TTFT (all-gather exchange; ring at the longest length)
    dcp1   two GPUs, -tp 2 -dcp 1, one KV head: decode TPOT, KV capacity
    dcp2   two GPUs, -tp 2 -dcp 2, one KV head: the same
    hf     Hugging Face transformers on one GPU (sdpa attention): prefill and decode
Timing: the driver synchronises the GPU, runs the step (plan -> logits) and takes the argmax to
the host, as sampling would. Multi-GPU phases run through cpserve's own worker pool (NCCL).

Writes <out-dir>/<date>-<device>.json (fields of issue 5), a PNG plot and a markdown section to
append to benchmarks/RESULTS.md.
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

FULL = dict(prefill=[8192, 32768, 65536, 131072],
            decode_pcp1=[(8192, 1), (32768, 1), (131072, 1), (8192, 8), (32768, 8)],
            decode_dcp=[(32768, 8), (131072, 8), (262144, 8), (131072, 1)],
            hf_decode=[(32768, 1)],
            layers=32, decode_steps=20)
QUICK = dict(prefill=[2048, 8192], decode_pcp1=[(2048, 1), (8192, 4)],
             decode_dcp=[(8192, 4)], hf_decode=[(2048, 1)], layers=4, decode_steps=5)
# Seconds allowed per phase. dcp*g: decode CUDA graphs that hold NCCL collectives (last: a
# hang there costs only itself).
PHASES = {"pcp1": 100, "pcp2": 80, "hf": 80, "dcp1": 50, "dcp2": 50, "dcp1g": 50,
          "dcp2g": 50}
# The ring exchange (pcp.py) can be timed too: CPSERVE_BENCH_EXCHANGES=allgather,ring.
EXCHANGES = os.environ.get("CPSERVE_BENCH_EXCHANGES", "allgather").split(",")


def reps_for(tokens: int) -> int:
    """Best of 3 for short prompts, of 2 for long ones (the first call of a new length also
    builds cuDNN's plans for it)."""
    return 3 if tokens <= 32768 else 2


# Engine helpers ------------------------------------------------------------------------------
def model_dir(layers: int, kv_heads: int, max_len: int) -> str:
    path = Path(tempfile.mkdtemp(prefix="cpserve-bench-"))
    cfg = dict(LLAMA_31_8B, num_hidden_layers=layers, num_key_value_heads=kv_heads,
               max_position_embeddings=max(max_len, 131072))
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path)


def make_executor(layers, kv_heads, tp, pcp, dcp, max_len, kv_gib=None, eager=False,
                  exchange="allgather", max_batched=None):
    from cpserve.config import (
        CacheConfig,
        EngineConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
    )
    from cpserve.engine.executor import Executor

    config = EngineConfig(
        model=ModelConfig.from_pretrained(model_dir(layers, kv_heads, max_len), "bfloat16",
                                          max_len),
        parallel=ParallelConfig(tp, pcp, dcp, kv_exchange=exchange),
        cache=CacheConfig(block_size=16, kv_cache_memory_gib=kv_gib,
                          gpu_memory_utilization=0.85, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=64,
                                  max_num_batched_tokens=max_batched or max_len),
        device="cuda", enforce_eager=eager, load_format="dummy")
    return Executor(config)


class Requests:
    """Hand-made plans for the executor: the block manager's job done by counting up."""

    def __init__(self, executor) -> None:
        from cpserve.kv.layout import KVLayout

        par = executor.config.parallel
        self.executor = executor
        self.layout = KVLayout(executor.config.cache.block_size, par.num_kv_shards,
                               par.interleave)
        self.next_block = 0
        self.count = 0

    def blocks(self, tokens: int) -> list[int]:
        n = self.layout.num_blocks_for(tokens)
        if self.next_block + n > self.executor.num_blocks:
            self.next_block = 0  # reuse from the start: contents do not matter for speed
        if n > self.executor.num_blocks:
            raise RuntimeError(f"{tokens} tokens need {n} blocks, the cache has "
                               f"{self.executor.num_blocks}")
        ids = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return ids

    def step(self, plan) -> list[int]:
        logits = self.executor.execute(plan)
        return logits.argmax(-1).tolist()

    def prefill_ttft(self, tokens: int) -> float:
        from cpserve.distributed.plan import PlannedRequest, StepPlan

        self.count += 1
        rid = f"prefill-{self.count}"
        ids = torch.randint(0, LLAMA_31_8B["vocab_size"], (tokens,)).tolist()
        plan = StepPlan([PlannedRequest(rid, ids, 0, self.blocks(tokens + 1), True, 1)])
        torch.cuda.synchronize()
        start = time.perf_counter()
        self.step(plan)
        elapsed = time.perf_counter() - start
        self.executor.execute(StepPlan(freed_request_ids=[rid]))
        return elapsed

    def decode_tpot(self, context: int, batch: int, steps: int, warmup: int = 3) -> float:
        """Per-step time of `steps` decode steps of `batch` requests at `context` tokens
        (their cache holds random values, never written by a prefill: speed only)."""
        from cpserve.distributed.plan import PlannedRequest, StepPlan

        rids = [f"decode-{self.count}-{i}" for i in range(batch)]
        self.count += 1
        tokens = [1] * batch
        plan = StepPlan([PlannedRequest(r, [1], context, self.blocks(context + warmup + steps + 1),
                                        True, 1) for r in rids])
        times = []
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = self.step(plan)
            times.append(time.perf_counter() - start)
            plan = StepPlan([PlannedRequest(r, [t], context + i + 1, [], False, 1)
                             for r, t in zip(rids, tokens)])
        self.executor.execute(StepPlan(freed_request_ids=rids))
        times = sorted(times[warmup:])
        return times[len(times) // 2] * 1e3


# Phases --------------------------------------------------------------------------------------
def phase_pcp1(s: dict) -> dict:
    max_len = max(s["prefill"] + [c for c, _ in s["decode_pcp1"]]) + 64
    need = max(max(s["prefill"]), max(c * b for c, b in s["decode_pcp1"]))
    kv_gib = need * 1.1 * s["layers"] * 8 * 128 * 2 * 2 / 2**30 + 1
    ex = make_executor(s["layers"], 8, 1, 1, 1, max_len, kv_gib=kv_gib)
    req = Requests(ex)
    out = {"prefill": [], "decode": [], "notes": []}
    req.prefill_ttft(2048)  # compile kernels, build cuDNN plans
    for tokens in s["prefill"]:
        best = min(req.prefill_ttft(tokens) for _ in range(reps_for(tokens)))
        out["prefill"].append(dict(tokens=tokens, pcp=1, ttft_s=best, exchange="none"))
        print(f"pcp1 prefill {tokens}: {best:.3f} s", flush=True)
    out["prefill_profile"] = [dict(p, pcp=1) for p in profile_prefill(req, s["prefill"][1])]
    print(f"pcp1 prefill profile: {out['prefill_profile']}", flush=True)
    for context, batch in s["decode_pcp1"]:
        ms = req.decode_tpot(context, batch, s["decode_steps"])
        out["decode"].append(dict(context=context, batch=batch, dcp=1, tp=1, kv_heads=8,
                                  graphs=ex.runner.graphs is not None, tpot_ms=ms))
        print(f"pcp1 decode ctx {context} batch {batch}: {ms:.2f} ms", flush=True)
    runner, graphs = ex.runner, ex.runner.graphs
    runner.graphs = None  # the same engine, eager
    context, batch = s["decode_pcp1"][1]
    ms = req.decode_tpot(context, batch, s["decode_steps"])
    out["decode"].append(dict(context=context, batch=batch, dcp=1, tp=1, kv_heads=8,
                              graphs=False, tpot_ms=ms))
    print(f"pcp1 decode ctx {context} batch {batch} (eager): {ms:.2f} ms", flush=True)
    try:
        out["profile"] = profile_decode(req, context, batch)
    except Exception as exc:  # noqa: BLE001 - the timings above matter more
        print(f"profile failed: {exc}", flush=True)
    runner.graphs = graphs
    out["fallbacks"] = sorted(getattr(runner.backend, "fallbacks", []))
    out["backend_ops"] = getattr(runner.backend, "ops", {})
    ex.shutdown()
    return out


def profile_decode(req: Requests, context: int, batch: int) -> dict:
    """GPU time of an eager decode step by kernel, to show where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        req.decode_tpot(context, batch, steps=3, warmup=0)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels)
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]
    return {"steps": 3, "gpu_ms_per_step": total / 3 / 1e3,
            "kernels": [dict(name=e.key[:90], ms_per_step=e.self_device_time_total / 3 / 1e3,
                             calls_per_step=e.count / 3) for e in top]}


KERNEL_CLASSES = (("attention", ("cudnn", "fmha", "flash", "attn", "sdpa")),
                  ("triton kernels", ("_paged", "_masked", "_write_kv", "_merge")),
                  ("nccl", ("nccl",)), ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "splitk")))


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in KERNEL_CLASSES if any(k.lower() in low for k in keys)),
                "elementwise / other")


def profile_prefill(req: Requests, tokens: int) -> list[dict]:
    """GPU time of one prefill on this process's GPU, by kernel class ([] if it fails)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            wall = req.prefill_ttft(tokens)
    except Exception as exc:  # noqa: BLE001 - the timings matter more than the profile
        print(f"profile failed: {exc}", flush=True)
        return []
    classes: dict = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            c = kernel_class(e.key)
            classes[c] = classes.get(c, 0.0) + e.self_device_time_total / 1e3
    return [{"tokens": tokens, "wall_ms": wall * 1e3, "gpu_ms_by_class": classes}]


def phase_pcp2(s: dict) -> dict:
    max_len = max(s["prefill"]) + 64
    kv_gib = max(s["prefill"]) * 1.1 / 2 * s["layers"] * 8 * 128 * 4 / 2**30 + 1
    out = {"prefill": []}
    for exchange in EXCHANGES:
        ex = make_executor(s["layers"], 8, 1, 2, 1, max_len, kv_gib=kv_gib, exchange=exchange)
        req = Requests(ex)
        req.prefill_ttft(2048)
        lengths = s["prefill"] if exchange == "allgather" else s["prefill"][-1:]
        for tokens in lengths:
            best = min(req.prefill_ttft(tokens) for _ in range(reps_for(tokens)))
            out["prefill"].append(dict(tokens=tokens, pcp=2, ttft_s=best, exchange=exchange))
            print(f"pcp2 ({exchange}) prefill {tokens}: {best:.3f} s", flush=True)
        out["prefill_profile"] = [dict(p, pcp=2, note="rank 0's GPU")
                                  for p in profile_prefill(req, s["prefill"][1])]
        print(f"pcp2 prefill profile: {out['prefill_profile']}", flush=True)
        ex.shutdown()
    return out


def phase_dcp(s: dict, dcp: int) -> dict:
    max_len = max(c for c, _ in s["decode_dcp"]) + 64
    # The same per-rank KV memory for dcp 1 and 2: capacity in tokens must double.
    kv_gib = max(c * b for c, b in s["decode_dcp"]) * 1.1 * s["layers"] * 128 * 4 / 2**30 + 1
    ex = make_executor(s["layers"], 1, 2, 1, dcp, max_len, kv_gib=kv_gib, max_batched=8192)
    req = Requests(ex)
    out = {"decode": [], "capacity": [dict(dcp=dcp, tp=2, kv_gib_per_rank=kv_gib,
                                           num_blocks=ex.num_blocks, block_size=16,
                                           tokens=ex.num_blocks
                                           * req.layout.virtual_block_size)]}
    print(f"dcp{dcp}: KV capacity {out['capacity'][0]['tokens']} tokens", flush=True)
    req.decode_tpot(1024, 1, 2)
    for context, batch in s["decode_dcp"]:
        ms = req.decode_tpot(context, batch, s["decode_steps"])
        out["decode"].append(dict(context=context, batch=batch, dcp=dcp, tp=2, kv_heads=1,
                                  graphs=ex.runner.graphs is not None, tpot_ms=ms))
        print(f"dcp{dcp} decode ctx {context} batch {batch}: {ms:.2f} ms", flush=True)
    ex.shutdown()
    return out


def phase_hf(s: dict) -> dict:
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in LLAMA_31_8B.items()
                                      if k not in ("architectures", "torch_dtype")})
    cfg.num_hidden_layers = s["layers"]
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    out = {"hf_prefill": [], "hf_decode": [], "transformers": transformers.__version__}

    def ttft(tokens: int) -> float:
        ids = torch.randint(0, cfg.vocab_size, (1, tokens), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=False, logits_to_keep=1).logits.argmax(-1).tolist()
        return time.perf_counter() - start

    ttft(2048)
    for tokens in s["prefill"]:
        best = min(ttft(tokens) for _ in range(reps_for(tokens)))
        out["hf_prefill"].append(dict(tokens=tokens, ttft_s=best))
        print(f"hf prefill {tokens}: {best:.3f} s", flush=True)
        torch.cuda.empty_cache()
    for context, batch in s["hf_decode"]:
        with torch.inference_mode():
            ids = torch.randint(0, cfg.vocab_size, (batch, context), device="cuda")
            res = model(ids, use_cache=True, logits_to_keep=1)
            past, nxt = res.past_key_values, res.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(3 + s["decode_steps"] // 2):
                torch.cuda.synchronize()
                start = time.perf_counter()
                res = model(nxt, past_key_values=past, use_cache=True)
                nxt = res.logits[:, -1:].argmax(-1)
                nxt.tolist()
                times.append(time.perf_counter() - start)
        ms = sorted(times[3:])[len(times[3:]) // 2] * 1e3
        out["hf_decode"].append(dict(context=context, batch=batch, tpot_ms=ms))
        print(f"hf decode ctx {context} batch {batch}: {ms:.2f} ms", flush=True)
    return out


def run_phase(name: str, settings: dict) -> dict:
    if name == "pcp1":
        return phase_pcp1(settings)
    if name == "pcp2":
        return phase_pcp2(settings)
    if name in ("dcp1", "dcp2"):
        return phase_dcp(settings, int(name[-1]))
    if name in ("dcp1g", "dcp2g"):
        os.environ["CPSERVE_CUDA_GRAPH_COLLECTIVES"] = "1"  # spawned ranks inherit it
        return phase_dcp(settings, int(name[3]))
    if name == "hf":
        return phase_hf(settings)
    raise ValueError(name)


# Orchestration -------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and lengths")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--run-phase", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    if args.run_phase:
        result = run_phase(args.run_phase, settings)
        Path(args.part).write_text(json.dumps(result))
        return

    from benchmarks.report import write_report

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    merged: dict = {"prefill": [], "hf_prefill": [], "decode": [], "hf_decode": [],
                    "capacity": [], "phases": {}}
    merged.update(device=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                  date=datetime.date.today().isoformat(), torch=torch.__version__,
                  triton=triton.__version__, layers=settings["layers"], quick=args.quick,
                  paged_tuning=os.environ.get("CPSERVE_PAGED_TUNING", "default"))
    for name in args.phases.split(","):
        part = Path(tempfile.mkstemp(suffix=f"-{name}.json")[1])
        cmd = [sys.executable, __file__, "--run-phase", name, "--part", str(part)]
        cmd += ["--quick"] if args.quick else []
        start = time.time()
        # Its own session, so that a timeout also ends the ranks it spawned.
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            code = proc.wait(timeout=PHASES[name] * (0.5 if args.quick else 1))
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
        merged["phases"][name] = dict(status=status, seconds=round(time.time() - start, 1))
        print(f"== phase {name}: {status} in {time.time() - start:.0f} s", flush=True)
        if status == "ok":
            for key, value in json.loads(part.read_text()).items():
                if isinstance(value, list):
                    merged[key] = merged.get(key, []) + value
                else:
                    merged[key] = value
        write_report(merged, out_dir)  # after every phase: a cut-off run keeps what it has


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    main()
