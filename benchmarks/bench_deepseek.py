"""DeepSeek-V2-Lite shape (MLA + MoE, random bf16 weights made on the GPUs) under context
parallelism: prefill TTFT, decode time per token, and the longest context the KV cache holds.

    python benchmarks/bench_deepseek.py                       # everything, 2 GPUs
    python benchmarks/bench_deepseek.py --only prefill        # one section; others kept in --out
    python benchmarks/bench_deepseek.py --tiny --device cpu --out /tmp/ds.json   # logic check

What is measured, through the engine's own executor (worker pool, step plans, model runner,
attention context), with hand-made step plans instead of the scheduler:

    prefill   one request of --context tokens in one step, num_logits 1: the model step that
              yields the first token (TTFT without queueing, tokenizing or sampling), for each
              (tp, pcp) of --prefill-layouts.
    decode    --batches requests, each at --context tokens of context, one token per step;
              time per step = time per output token, for each (tp, dcp) of --decode-layouts.
              The cache is allocated but not filled by a prefill: decode reads every visible
              slot whatever it holds, so the time is that of a real 32k context.
    capacity  the engine sizes the KV cache from free GPU memory after its profiling step
              (--gpu-memory-utilization, --profile-tokens); max context = blocks * block_size
              * C tokens of one request, C = pcp * dcp shards. --verify-capacity also runs one
              decode step at that context.

Random weights come from the model runner's dummy load format (`load_format="dummy"`), so no checkpoint is read. Results go to --out (JSON) and a
table on stdout. A section that fails (out of memory, a rank died) is recorded with its error
and the next one runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from cpserve.attention.backend import get_backend
from cpserve.distributed.plan import PlannedRequest, StepPlan
from cpserve.engine.args import EngineArgs
from cpserve.engine.executor import Executor
from cpserve.engine.worker import start_worker_pool
from cpserve.kv.layout import KVLayout

# DeepSeek-V2-Lite's config.json (deepseek-ai/DeepSeek-V2-Lite): 15.7B parameters, 2.4B active.
V2_LITE = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400,
    hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
    num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
    n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
    topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
    routed_scaling_factor=1.0, scoring_func="softmax", hidden_act="silu", rms_norm_eps=1e-6,
    max_position_embeddings=163840, rope_theta=10000.0, attention_bias=False,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False, torch_dtype="bfloat16")
# The same structure at toy size, to check this script's logic on CPU.
TINY = dict(V2_LITE, vocab_size=1024, hidden_size=64, intermediate_size=128,
            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2)
DEFAULT_OUT = Path(__file__).parent / "results" / "deepseek_v2_lite.json"


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """'2x1,1x2' -> [(2, 1), (1, 2)]."""
    return [tuple(int(n) for n in item.lower().split("x")) for item in text.split(",")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy shape (logic check on CPU)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--context", type=int, default=None, help="default 32768 (tiny: 64)")
    p.add_argument("--batches", default=None, help="decode batch sizes, default 1,16 (tiny: 1,2)")
    p.add_argument("--prefill-layouts", default="2x1,1x2", help="TPxPCP list")
    p.add_argument("--decode-layouts", default="2x1,2x2", help="TPxDCP list")
    p.add_argument("--capacity-layouts", default="2x1,2x2", help="TPxDCP list")
    p.add_argument("--only", choices=["prefill", "decode", "capacity"], action="append",
                   help="run only these sections (repeatable); results of others in --out stay")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per layout")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per batch")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="GiB of KV cache per rank for the capacity run (default: what the "
                        "engine finds free)")
    p.add_argument("--profile-tokens", type=int, default=8192,
                   help="max_num_batched_tokens of the capacity run (its profiling step)")
    p.add_argument("--verify-capacity", action="store_true",
                   help="run one decode step at the full capacity")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.context = args.context or (64 if args.tiny else 32768)
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,16")).split(",")]
    args.sections = args.only or ["prefill", "decode", "capacity"]
    return args


def write_model_dir(shape: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(shape))
    return directory


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Layout:
    """One engine executor (all ranks of a tp x pcp layout, dcp inside), shut down on exit."""

    def __init__(self, args, model_dir: Path, tp: int, pcp: int, dcp: int,
                 num_blocks: int | None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, kv_cache_memory: float | None = None) -> None:
        self.args, self.device = args, args.device
        engine_args = EngineArgs(
            model=str(model_dir), device=args.device, tensor_parallel_size=tp,
            prefill_context_parallel_size=pcp, decode_context_parallel_size=dcp,
            block_size=args.block_size, num_kv_blocks=num_blocks, kv_cache_memory=kv_cache_memory,
            enable_prefix_caching=False,
            gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enforce_eager=args.enforce_eager,
            load_format="dummy")
        self.config = engine_args.create_engine_config()
        self.kv_layout = KVLayout(args.block_size, pcp * dcp, 1)
        # The pool is ours, so that a failed start (out of memory) still frees its ranks.
        self.pool = start_worker_pool(self.config.parallel, self.config.device)
        try:
            self.executor = Executor(self.config, self.pool)
        except BaseException:
            self.pool.shutdown()
            raise

    def step(self, requests, freed=()) -> float:
        """Run one step plan; seconds until the driver has the logits."""
        synchronize(self.device)
        start = time.perf_counter()
        self.executor.execute(StepPlan(list(requests), list(freed)))
        synchronize(self.device)
        return time.perf_counter() - start

    def free(self, request_ids) -> None:
        self.step([], request_ids)

    def __enter__(self) -> Layout:
        return self

    def __exit__(self, *exc) -> None:
        self.executor.shutdown()
        self.pool.shutdown()
        self.executor = self.pool = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def bench_prefill(args, model_dir, shape, tp, pcp) -> dict:
    row = dict(tp=tp, pcp=pcp, dcp=1, context=args.context)
    blocks = KVLayout(args.block_size, pcp, 1).num_blocks_for(args.context)
    with Layout(args, model_dir, tp, pcp, 1, num_blocks=blocks + 1,
                max_num_batched_tokens=args.context) as layout:
        runs = []
        for i in range(args.warmup + args.repeats):
            rid = f"prefill-{i}"
            tokens = random_tokens(args.context, shape["vocab_size"], seed=i)
            seconds = layout.step([PlannedRequest(rid, tokens, 0, list(range(blocks)), True, 1)])
            layout.free([rid])
            if i >= args.warmup:
                runs.append(seconds)
    return dict(row, ttft_s=statistics.median(runs), runs_s=runs,
                prefill_tokens_per_s=args.context / statistics.median(runs))


def bench_decode(args, model_dir, shape, tp, dcp) -> list[dict]:
    steps = args.warmup + args.steps
    per_request = KVLayout(args.block_size, dcp, 1).num_blocks_for(args.context + steps + 1)
    rows = []
    with Layout(args, model_dir, tp, 1, dcp, num_blocks=per_request * max(args.batches) + 1,
                max_num_seqs=max(args.batches)) as layout:
        for batch in args.batches:
            ids = [f"decode-{batch}-{j}" for j in range(batch)]
            tables = [list(range(j * per_request, (j + 1) * per_request)) for j in range(batch)]
            tokens = random_tokens(steps * batch, shape["vocab_size"], seed=batch)
            times = []
            for s in range(steps):
                # Step 0 sends each request's whole block table, later steps only the token.
                plan = [PlannedRequest(rid, [tokens[s * batch + j]], args.context + s,
                                       tables[j] if s == 0 else [], s == 0, 1)
                        for j, rid in enumerate(ids)]
                seconds = layout.step(plan)
                if s >= args.warmup:
                    times.append(seconds)
            layout.free(ids)
            ms = 1e3 * statistics.median(times)
            rows.append(dict(tp=tp, pcp=1, dcp=dcp, batch=batch, context=args.context,
                             ms_per_step=ms, tokens_per_s=batch * 1e3 / ms,
                             steps_ms=[1e3 * t for t in times]))
    return rows


def bench_capacity(args, model_dir, shape, tp, dcp) -> dict:
    with Layout(args, model_dir, tp, 1, dcp, num_blocks=None, kv_cache_memory=args.kv_cache_memory,
                max_num_batched_tokens=args.profile_tokens) as layout:
        blocks = layout.executor.num_blocks
        runner = layout.executor.runner
        bytes_per_token = runner.kv_spec.bytes_per_token * shape["num_hidden_layers"]
        capacity = blocks * args.block_size * dcp
        row = dict(tp=tp, pcp=1, dcp=dcp, kv_blocks_per_rank=blocks,
                   kv_tokens_per_rank=blocks * args.block_size,
                   kv_bytes_per_token_per_rank=bytes_per_token,
                   kv_gib_per_rank=blocks * args.block_size * bytes_per_token / 2**30,
                   max_context_tokens=capacity,
                   exceeds_max_position_embeddings=capacity > shape["max_position_embeddings"],
                   profile=getattr(runner, "profile_report", None))
        if args.verify_capacity:
            context = capacity - 1
            table = list(range(layout.kv_layout.num_blocks_for(capacity)))
            try:
                seconds = layout.step([PlannedRequest("capacity", [1], context, table, True, 1)])
                row.update(verified_context=context, verify_step_ms=1e3 * seconds)
            except Exception as exc:  # noqa: BLE001 - recorded, the pool is gone with it
                row.update(verified_context=None, verify_error=f"{type(exc).__name__}: {exc}")
    return row


def run_section(name: str, fn, args, model_dir, shape, tp: int, cp: int) -> list[dict]:
    """One layout of a section (cp: pcp for prefill, dcp otherwise); a failure becomes a row
    with its error."""
    try:
        result = fn(args, model_dir, shape, tp, cp)
        rows = result if isinstance(result, list) else [result]
    except Exception as exc:  # noqa: BLE001 - recorded; the next layout still runs
        traceback.print_exc()
        layout = dict(tp=tp, pcp=cp, dcp=1) if name == "prefill" else dict(tp=tp, pcp=1, dcp=cp)
        rows = [dict(layout, error=f"{type(exc).__name__}: {exc}")]
    for row in rows:
        brief = {k: v for k, v in row.items() if not isinstance(v, list)}
        print(f"[{name}] {json.dumps(brief)}", flush=True)
    return rows


def environment(args) -> dict:
    env = dict(torch=torch.__version__, device=args.device)
    if args.device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
    try:
        env["attention_backend"] = get_backend("auto", args.device).name
    except Exception as exc:  # noqa: BLE001
        env["attention_backend"] = f"unavailable: {exc}"
    return env


def format_table(results: dict) -> str:
    lines = []
    for row in results.get("prefill", []):
        what = f"prefill  tp={row.get('tp')} pcp={row.get('pcp')} ctx={row.get('context')}"
        lines.append(f"{what:<48} " + (f"TTFT {row['ttft_s']:.3f} s  "
                                       f"({row['prefill_tokens_per_s']:.0f} tok/s)"
                                       if "ttft_s" in row else f"FAILED {row.get('error')}"))
    for row in results.get("decode", []):
        what = (f"decode   tp={row.get('tp')} dcp={row.get('dcp')} ctx={row.get('context')} "
                f"batch={row.get('batch')}")
        lines.append(f"{what:<48} " + (f"{row['ms_per_step']:.2f} ms/token  "
                                       f"({row['tokens_per_s']:.1f} tok/s)"
                                       if "ms_per_step" in row else f"FAILED {row.get('error')}"))
    for row in results.get("capacity", []):
        what = f"capacity tp={row.get('tp')} dcp={row.get('dcp')}"
        if "max_context_tokens" in row:
            verified = ""
            if "verify_step_ms" in row:
                verified = f", decode step there {row['verify_step_ms']:.1f} ms"
            elif "verify_error" in row:
                verified = f", decode step there FAILED {row['verify_error'][:80]}"
            lines.append(f"{what:<48} max context {row['max_context_tokens']:,} tokens "
                         f"({row['kv_gib_per_rank']:.1f} GiB KV per rank){verified}")
        else:
            lines.append(f"{what:<48} FAILED {row.get('error')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # A 32k prefill on a slow path may hold a collective longer than the default timeout.
    os.environ.setdefault("CPSERVE_DIST_TIMEOUT", "900")
    shape = TINY if args.tiny else V2_LITE
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.update(shape="tiny" if args.tiny else "DeepSeek-V2-Lite", model_config=shape,
                   environment=environment(args),
                   settings=dict(block_size=args.block_size, warmup=args.warmup,
                                 repeats=args.repeats, steps=args.steps,
                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                 profile_tokens=args.profile_tokens,
                                 kv_cache_memory_gib=args.kv_cache_memory,
                                 enforce_eager=args.enforce_eager),
                   date=time.strftime("%Y-%m-%d %H:%M:%S"))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dir(shape, Path(tmp) / "model")
        sections = {"prefill": (bench_prefill, args.prefill_layouts),
                    "decode": (bench_decode, args.decode_layouts),
                    "capacity": (bench_capacity, args.capacity_layouts)}
        for name, (bench, layouts) in sections.items():
            if name in args.sections:
                results[name] = [row for a, b in parse_layouts(layouts)
                                 for row in run_section(name, bench, args, model_dir, shape, a, b)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"wrote {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
