"""Prefix caching on a GPU: TTFT of a long prompt cold, and with most of it already cached.

Llama-3.1-8B shape, random bf16 weights made on the GPU (load_format="dummy"). Runs the whole
engine (scheduler, block manager, prefix hashes), one GPU:

    cold  a fresh prompt of TOTAL tokens (prefix caching on, nothing cached)
    warm  a new prompt sharing its first CACHED tokens with the cold one

Usage (one GPU):  python benchmarks/bench_prefix_cache.py --total 131072 --cached 122880
Prints a table and writes benchmarks/results/<date>-<device>-prefix-cache.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_long_context import model_dir  # noqa: E402
from cpserve.engine.args import EngineArgs  # noqa: E402
from cpserve.engine.llm_engine import LLMEngine  # noqa: E402
from cpserve.models.demo import ensure_tiny_model  # noqa: E402
from cpserve.sampling_params import SamplingParams  # noqa: E402
from tests.checkpoints import TOKENIZER_FILES  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ttft(engine: LLMEngine, request_id: str, prompt: list[int]) -> tuple[float, int]:
    """Seconds from submission to the first token, and the prompt tokens found cached."""
    sync()
    start = time.perf_counter()
    engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=1,
                                                          ignore_eos=True))
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            if out.finish_reason is not None:
                sync()
                return time.perf_counter() - start, out.num_cached_tokens
    raise RuntimeError("the request never finished")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total", type=int, default=131072)
    parser.add_argument("--cached", type=int, default=122880)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--device", default="cuda", help="cpu only to check the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    path = Path(model_dir(args.layers, 8, args.total + 1024))
    tiny = ensure_tiny_model()
    for name in TOKENIZER_FILES:  # ids past its vocabulary decode to "", which is fine here
        shutil.copy(tiny / name, path / name)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(path), dtype="bfloat16", device=args.device, load_format="dummy",
        max_model_len=args.total + 1024, max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=4, gpu_memory_utilization=0.85, enable_prefix_caching=True,
        kv_cache_memory=None if args.device == "cuda" else 0.5))
    gen = torch.Generator().manual_seed(0)
    vocab = engine.config.model.vocab_size

    def prompt(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=gen).tolist()

    ttft(engine, "warmup", prompt(min(4096, args.total // 2)))  # compile kernels, fill allocator pools
    document = prompt(args.total)
    cold, cold_hit = ttft(engine, "cold", document)
    warm, warm_hit = ttft(engine, "warm", document[:args.cached] + prompt(args.total - args.cached))
    engine.check_integrity()
    engine.shutdown()

    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "model": "Llama-3.1-8B shape, random bf16",
        "layers": args.layers, "total_tokens": args.total, "cached_tokens_asked": args.cached,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "cold": {"ttft_s": cold, "cached_tokens": cold_hit},
        "warm": {"ttft_s": warm, "cached_tokens": warm_hit},
        "speedup": cold / warm,
    }
    print(f"{'run':<6}{'prompt':>10}{'cached':>10}{'TTFT s':>10}")
    for name in ("cold", "warm"):
        print(f"{name:<6}{args.total:>10}{result[name]['cached_tokens']:>10}"
              f"{result[name]['ttft_s']:>10.3f}")
    print(f"speed-up {result['speedup']:.1f}x")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        f"{result['date']}-{result['device'].replace(' ', '-')}-prefix-cache.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
