"""Prompt logprobs of a long chunk on a GPU: peak memory and time, with and without them.

Llama-3.1-8B shape (128k vocabulary), random bf16 weights made on the GPU, the whole engine
with default flags on one GPU. A prompt of TOKENS tokens is prefilled in one chunk, first
plainly, then with `prompt_logprobs=1`: its logits would be TOKENS x 128256 fp32 (4 GiB at
8k) if computed at once; the engine computes them in slices of LOGITS_SLICE_BYTES. The
figure to read is `extra_peak_gib`: how far the step's peak allocation rises above the
plain prefill's (it should stay near the slice budget, far below the whole logits).

Usage (one GPU):  python benchmarks/bench_prompt_logprobs.py --tokens 8192 --out DIR
Writes DIR/prompt-logprobs.json; about 2 minutes with model creation.
"""

from __future__ import annotations

import argparse
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
from cpserve.engine.model_runner import LOGITS_SLICE_BYTES  # noqa: E402
from cpserve.models.demo import ensure_tiny_model  # noqa: E402
from cpserve.sampling_params import SamplingParams  # noqa: E402
from tests.checkpoints import TOKENIZER_FILES  # noqa: E402


def run_one(engine: LLMEngine, request_id: str, prompt: list[int], params) -> dict:
    cuda = engine.device.type == "cuda"  # --device cpu only checks the script
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    out, num_prompt_logprobs = None, 0
    while engine.has_unfinished_requests():
        for o in engine.step().outputs:
            out = o
            num_prompt_logprobs += len(o.new_prompt_logprobs or [])
    peak = 0
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    return dict(seconds=time.perf_counter() - start, peak_above_start_gib=peak / 2**30,
                num_prompt_logprobs=num_prompt_logprobs, finish_reason=out.finish_reason)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--device", default="cuda", help="cpu only to check the script")
    args = parser.parse_args()

    path = Path(model_dir(args.layers, 8, args.tokens + 1024))
    tiny = ensure_tiny_model()
    for name in TOKENIZER_FILES:  # ids past its vocabulary decode to "", which is fine here
        shutil.copy(tiny / name, path / name)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(path), dtype="bfloat16", device=args.device, load_format="dummy",
        max_model_len=args.tokens + 1024, max_num_batched_tokens=max(8192, args.tokens),
        long_prefill_token_threshold=0,  # one chunk: the default cap is half the budget
        enable_prefix_caching=False, kv_cache_memory=None if args.device == "cuda" else 0.5))
    vocab = engine.config.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, vocab, (args.tokens,), generator=gen).tolist()
    plain = SamplingParams(temperature=0, max_tokens=1)
    scored = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    run_one(engine, "warmup", prompt[: args.tokens // 2], plain)
    rows = dict(plain=run_one(engine, "plain", prompt, plain),
                prompt_logprobs=run_one(engine, "scored", prompt, scored))
    whole_logits_gib = args.tokens * vocab * 4 / 2**30
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = dict(device=device, tokens=args.tokens, vocab=vocab,
                  layers=args.layers, logits_slice_gib=LOGITS_SLICE_BYTES / 2**30,
                  whole_logits_gib=whole_logits_gib, **rows,
                  extra_peak_gib=rows["prompt_logprobs"]["peak_above_start_gib"]
                  - rows["plain"]["peak_above_start_gib"])
    engine.shutdown()
    assert rows["prompt_logprobs"]["num_prompt_logprobs"] == args.tokens
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "prompt-logprobs.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
