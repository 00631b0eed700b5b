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
          the GPU): TTFT of a 32k prompt in one step, then the time of a decode step at 32k
          context for each batch (16 requests share the 32k prefix through prefix caching,
          so one prefill fills them all); a profile of one prefill and of decode steps. Then,
          while time is left, DeepSeek's TTFT with default flags (8192 tokens a step, chunks
          after the first reading their cached prefix absorbed, through the paged kernel).
  tests   with the time left (at least 60 s): kernel-versus-reference tests on this GPU (bf16
          included) and the bf16 MoE / MLA parity tests against transformers (pytest).

With `--apply-tuning` (the default) the engine runs with what moe and mla decided, so its
numbers are those of the constants flipped as printed. Writes DIR/bench_moe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_deepseek import TINY as DS_TINY  # noqa: E402
from bench_deepseek import V2_LITE  # noqa: E402

# Qwen3-30B-A3B's config.json (Qwen/Qwen3-30B-A3B): 30.5B parameters, 3.3B active.
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
    hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
    attention_bias=False, use_sliding_window=False, tie_word_embeddings=False,
    bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")
QWEN3_TINY = dict(QWEN3_30B_A3B, vocab_size=1024, hidden_size=64, intermediate_size=128,
                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
MODELS = {"dsv2lite": V2_LITE, "qwen3moe": QWEN3_30B_A3B}
TINY_MODELS = {"dsv2lite": DS_TINY, "qwen3moe": QWEN3_TINY}
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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, reps: int = 5, inner: int = 1) -> float:
    """Median over `reps` of the mean time of `inner` back-to-back calls, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(times)


# moe ----------------------------------------------------------------------------------------
def moe_shapes(args) -> dict:
    models = TINY_MODELS if args.tiny else MODELS
    return {name: dict(experts=int(cfg.get("n_routed_experts") or cfg["num_experts"]),
                       top_k=int(cfg["num_experts_per_tok"]), hidden=int(cfg["hidden_size"]),
                       inter=int(cfg["moe_intermediate_size"]))
            for name, cfg in models.items() if name in args.models}


def moe_problem(shape: dict, tokens: int, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(tokens)
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
    w13 = (torch.randn(e, 2 * i, h, generator=g) * 0.03).to(device, dtype)
    w2 = (torch.randn(e, h, i, generator=g) * 0.03).to(device, dtype)
    x = torch.randn(tokens, h, generator=g).to(device, dtype)
    logits = torch.randn(tokens, e, generator=g).to(device)
    weights, ids = logits.softmax(-1).topk(shape["top_k"], dim=-1)
    return x, w13, w2, weights, ids


def moe_candidates(tiny: bool):
    from cpserve.models.kernels.fused_moe import MoEKernelConfig as C

    if tiny:
        return [C(16, 32, 32, 4, 2)], [C(16, 32, 32, 4, 2)]
    # Few: every candidate is two Triton compiles per model shape (and per block_m).
    sorted_ = [C(64, 128, 64, 4, 3), C(128, 128, 64, 8, 3), C(128, 128, 64, 4, 4),
               C(64, 64, 64, 4, 4)]
    by_expert = [C(16, 64, 128, 4, 3), C(16, 32, 128, 4, 3), C(16, 128, 128, 4, 3)]
    return sorted_, by_expert


def bench_moe(args) -> dict:
    from cpserve.models import experts as experts_module
    from cpserve.models.kernels import fused_moe as fm

    token_counts = [1, 4] if args.tiny else [1, 4, 16, 8192, 32768]
    rows = []
    for name, shape in moe_shapes(args).items():
        for tokens in token_counts:
            row = moe_row(args, name, shape, tokens)
            rows.append(row)
            best = {k: v for k, v in row["ms"].items() if v is not None}
            print(f"[moe] {name} tokens={tokens} " + "  ".join(
                f"{k}={v:.3f}ms" for k, v in sorted(best.items(), key=lambda kv: kv[1])[:4]),
                flush=True)
    decisions = decide_moe(rows, experts_module, fm)
    print(f"[moe] decisions: {json.dumps(decisions)}", flush=True)
    return dict(rows=rows, decisions=decisions)


def moe_row(args, name: str, shape: dict, tokens: int) -> dict:
    """Every implementation and candidate on one problem: ms (None: failed or wrong) and the
    error relative to the reference's largest output."""
    from cpserve.models.experts import experts_grouped, experts_reference
    from cpserve.models.kernels import fused_moe as fm

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    sorted_cands, by_expert_cands = moe_candidates(args.tiny)
    x, w13, w2, weights, ids = moe_problem(shape, tokens, args.device, dtype)
    pairs = tokens * shape["top_k"]
    row = dict(model=name, tokens=tokens, pairs=pairs, ms={}, max_rel_err={})
    ref = experts_reference(x, w13, w2, weights, ids) if tokens <= 8192 else None
    scale = ref.float().abs().max().item() if ref is not None else 1.0

    def run(label, fn):
        try:
            out = fn()
            if ref is not None:
                err = (out.float() - ref.float()).abs().max().item() / scale
                row["max_rel_err"][label] = err
                if err > 5e-2:
                    row["ms"][label] = None  # wrong: never a winner
                    return
            row["ms"][label] = median_ms(fn, args.device, reps=args.reps,
                                         inner=20 if tokens <= 16 and not args.tiny else 1)
        except Exception as exc:  # noqa: BLE001 - a candidate that fails loses
            row["ms"][label] = None
            row.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"[:200]

    def triton(**kwargs):
        return lambda: fm.fused_moe(x, w13, w2, weights, ids, **kwargs)

    if tokens <= 8192:
        run("reference", lambda: experts_reference(x, w13, w2, weights, ids))
    if args.device == "cuda" and hasattr(torch, "_grouped_mm"):
        run("grouped_mm", lambda: experts_grouped(x, w13, w2, weights, ids))
    run("triton", triton())
    sweep = tokens in ((1, 4) if args.tiny else (1, 4, 16, 8192))  # others: constants only
    if sweep and pairs <= 128:  # decode: by expert against sorted with small blocks
        for c in (by_expert_cands if tokens != 4 or args.tiny else by_expert_cands[:1]):
            run(f"by_expert {tuple(asdict(c).values())}",
                triton(by_expert_config=c, by_expert_max_pairs=128))
        for block_m in (16, 32):
            c = fm.MoEKernelConfig(block_m, 64, 128, 4, 3)
            run(f"sorted {tuple(asdict(c).values())}",
                triton(sorted_config=c, by_expert_max_pairs=0))
    elif sweep:  # prefill
        for c in sorted_cands:
            run(f"sorted {tuple(asdict(c).values())}",
                triton(sorted_config=c, by_expert_max_pairs=0))
    return row


def _best(rows, prefix: str) -> str | None:
    """The candidate label with the lowest geometric mean of time relative to the row's
    fastest, over the rows that timed it."""
    scores: dict[str, list[float]] = {}
    for row in rows:
        timed = {k: v for k, v in row["ms"].items() if v is not None}
        if not timed:
            continue
        fastest = min(timed.values())
        for label, ms in timed.items():
            if label.startswith(prefix):
                scores.setdefault(label, []).append(ms / fastest)
    if not scores:
        return None
    return min(scores, key=lambda k: statistics.geometric_mean(scores[k]))


def _config_of(label: str, fm):
    values = label.split(" ", 1)[1].strip("()").split(",")
    return fm.MoEKernelConfig(*(int(v) for v in values))


def decide_moe(rows, experts_module, fm) -> dict:
    decode = [r for r in rows if r["pairs"] <= 128]
    prefill = [r for r in rows if r["pairs"] > 128]
    decisions = {}
    best_sorted = _best(prefill, "sorted")
    if best_sorted:
        decisions["SORTED_CONFIG"] = asdict(_config_of(best_sorted, fm))
    best_small = _best(decode, "sorted")
    if best_small:
        decisions["SORTED_SMALL_CONFIG"] = asdict(_config_of(best_small, fm))
    best_by_expert = _best(decode, "by_expert")
    if best_by_expert:
        decisions["BY_EXPERT_CONFIG"] = asdict(_config_of(best_by_expert, fm))
    # By expert up to the most pairs at which it (at its best) beats sorted (at its best) in
    # that row and in every row with fewer pairs.
    def fastest(row, prefix):
        return min((v for k, v in row["ms"].items() if k.startswith(prefix) and v is not None),
                   default=float("inf"))

    max_pairs = 0
    for row in sorted(decode, key=lambda r: r["pairs"]):
        if fastest(row, "by_expert") > fastest(row, "sorted"):
            break
        max_pairs = row["pairs"]
    decisions["BY_EXPERT_MAX_PAIRS"] = max_pairs
    faster = sum(1 for r in rows if r["ms"].get("grouped_mm") and r["ms"].get("triton")
                 and r["ms"]["grouped_mm"] < min(v for k, v in r["ms"].items()
                                                 if v is not None and k != "reference"
                                                 and k != "grouped_mm"))
    timed = sum(1 for r in rows if r["ms"].get("grouped_mm"))
    decisions["CUDA_EXPERTS"] = "grouped_mm" if timed and faster > timed / 2 else "triton"
    decisions["current"] = dict(SORTED_CONFIG=asdict(fm.SORTED_CONFIG),
                                SORTED_SMALL_CONFIG=asdict(fm.SORTED_SMALL_CONFIG),
                                BY_EXPERT_CONFIG=asdict(fm.BY_EXPERT_CONFIG),
                                BY_EXPERT_MAX_PAIRS=fm.BY_EXPERT_MAX_PAIRS,
                                CUDA_EXPERTS=experts_module.CUDA_EXPERTS)
    return decisions


def apply_moe(decisions: dict) -> None:
    from cpserve.models import experts as experts_module
    from cpserve.models.kernels import fused_moe as fm

    if "SORTED_CONFIG" in decisions:
        fm.SORTED_CONFIG = fm.MoEKernelConfig(**decisions["SORTED_CONFIG"])
    if "SORTED_SMALL_CONFIG" in decisions:
        fm.SORTED_SMALL_CONFIG = fm.MoEKernelConfig(**decisions["SORTED_SMALL_CONFIG"])
    if "BY_EXPERT_CONFIG" in decisions:
        fm.BY_EXPERT_CONFIG = fm.MoEKernelConfig(**decisions["BY_EXPERT_CONFIG"])
    fm.BY_EXPERT_MAX_PAIRS = decisions.get("BY_EXPERT_MAX_PAIRS", fm.BY_EXPERT_MAX_PAIRS)
    experts_module.CUDA_EXPERTS = decisions.get("CUDA_EXPERTS", experts_module.CUDA_EXPERTS)


# mla ----------------------------------------------------------------------------------------
def write_model_dir(shape: dict, directory: Path) -> Path:
    """config.json and the demo model's tokenizer (prompts are token ids; the tokenizer only
    detokenizes, and ids it does not know become empty text)."""
    import shutil

    from cpserve.models.demo import ensure_tiny_model

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(shape))
    tiny = ensure_tiny_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny / name).is_file():
            shutil.copy(tiny / name, directory / name)
    return directory


def bench_mla(args, tmp: Path) -> dict:
    from cpserve.attention.backend import get_backend
    from cpserve.attention.kernels.library_ops import cudnn_attention
    from cpserve.config import ModelConfig
    from cpserve.distributed.groups import single_process_groups
    from cpserve.models.deepseek_v2 import DeepseekRope, MLAAttention

    shape = DS_TINY if args.tiny else V2_LITE
    sizes = [8, 16, 32] if args.tiny else [256, 512, 1024, 2048, 4096, 8192]
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = ModelConfig.from_pretrained(write_model_dir(shape, tmp / "mla"), dtype,
                                         max(sizes) + 16)
    groups, device = single_process_groups(), torch.device(args.device)
    with torch.device(device):
        rope = DeepseekRope(config, int(shape["qk_rope_head_dim"]), True)
        layer = MLAAttention(config, 0, groups, rope)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    backend = get_backend("auto", device)
    rows, saved = [], os.environ.get("CPSERVE_MLA_EXPANDED_MIN_TOKENS")
    try:
        for n in sizes:
            row = dict(tokens=n, **mla_times(args, layer, config, backend, n, dtype))
            rows.append(row)
            print(f"[mla] {row}", flush=True)
    finally:
        if saved is None:
            os.environ.pop("CPSERVE_MLA_EXPANDED_MIN_TOKENS", None)
        else:
            os.environ["CPSERVE_MLA_EXPANDED_MIN_TOKENS"] = saved
    # The smallest size from which expanded wins at every larger size measured.
    crossover = None
    for row in reversed(rows):
        if row["expanded_ms"] >= row["absorbed_ms"]:
            break
        crossover = row["tokens"]
    result = dict(rows=rows, decisions=dict(MLA_EXPANDED_MIN_TOKENS=crossover
                                            if crossover is not None else 10**9))
    if args.device == "cuda" and getattr(backend, "ops", {}).get("cudnn"):
        result["cudnn_unequal_dims"] = probe_cudnn_unequal(cudnn_attention, device)
    print(f"[mla] decisions: {json.dumps(result['decisions'])} "
          f"cudnn: {json.dumps(result.get('cudnn_unequal_dims'))}", flush=True)
    return result


def mla_times(args, layer, config, backend, n: int, dtype) -> dict:
    """ms of one layer's prefill of n new tokens (no prefix), absorbed and expanded."""
    from cpserve.attention.context import AttentionContext
    from cpserve.attention.metadata import PlannedSeq, StepAttentionMetadata, build_step_tokens
    from cpserve.distributed.groups import single_process_groups
    from cpserve.kv.layout import KVLayout
    from cpserve.models.rope import StepPositions

    groups, device = single_process_groups(), torch.device(args.device)
    kv = KVLayout(16)
    blocks = kv.num_blocks_for(n)
    step = build_step_tokens([PlannedSeq(0, n, False)], torch.arange(blocks).unsqueeze(0), kv,
                             groups)
    meta = StepAttentionMetadata(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                    for k, v in vars(step.metadata).items()})
    latent = layer.kv_lora_rank + layer.rope_dim
    cache = [(torch.zeros(blocks, 16, 1, latent, dtype=dtype, device=device), None)]
    ctx = AttentionContext(meta, cache, groups, backend)
    x = torch.randn(n, config.hidden_size, device=device, dtype=dtype)
    positions = StepPositions(step.positions.to(device))
    times = {}
    for form, threshold in (("absorbed", "1000000000"), ("expanded", "1")):
        os.environ["CPSERVE_MLA_EXPANDED_MIN_TOKENS"] = threshold
        with torch.inference_mode():
            times[f"{form}_ms"] = median_ms(lambda: layer(positions, x, ctx), args.device,
                                            reps=args.reps)
    return times


def probe_cudnn_unequal(cudnn_attention, device, n: int = 8192, heads: int = 16) -> dict:
    """cuDNN on keys 192 / values 128 directly, against values padded to 192."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(n, heads, 192, device=device, generator=g, dtype=torch.bfloat16)
            for _ in range(2))
    v = torch.randn(n, heads, 128, device=device, generator=g, dtype=torch.bfloat16)
    padded = torch.nn.functional.pad(v, (0, 64))
    out = dict(padded_ms=median_ms(lambda: cudnn_attention(q, k, padded, True, 0.1), "cuda"))
    try:
        direct = cudnn_attention(q, k, v, True, 0.1)
        want = cudnn_attention(q, k, padded, True, 0.1)
        out["max_abs_diff"] = (direct[0].float() - want[0][..., :128].float()).abs().max().item()
        out["lse_max_abs_diff"] = (direct[1] - want[1]).abs().max().item()
        out["direct_ms"] = median_ms(lambda: cudnn_attention(q, k, v, True, 0.1), "cuda")
    except Exception as exc:  # noqa: BLE001 - not supported here: padding stays
        out["direct_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


# engine -------------------------------------------------------------------------------------
def chunked_ttft(args, name: str, tmp: Path) -> dict:
    """TTFT of a `--context` prompt with default flags (8192 tokens a step): chunks after the
    first attend to their cached prefix through the paged path (MLA: absorbed)."""
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
    finally:
        llm.shutdown()
    print(f"[engine] {name} TTFT at {ctx} with {budget} tokens a step: {runs[-1]:.3f} s",
          flush=True)
    return dict(ttft_chunked_s=runs[-1], ttft_chunked_runs_s=runs, chunk_tokens=budget)


def bench_engine(args, name: str, tmp: Path) -> dict:
    from cpserve import LLM, SamplingParams

    shape = (TINY_MODELS if args.tiny else MODELS)[name]
    ctx = args.context
    batches = [1, 2] if args.tiny else BATCHES[name]
    extra = args.steps + 8
    block = 16
    # Distinct prompts for the TTFT runs, then one shared prefix and a tail per request.
    blocks = (args.repeats + 2) * (ctx // block + 2) + max(batches) * (extra // block + 4)
    llm = LLM(str(write_model_dir(shape, tmp / name)), device=args.device, dtype=(
        "float32" if args.tiny else "bfloat16"), load_format="dummy", block_size=block,
        num_kv_blocks=blocks, max_model_len=ctx + 2 * extra, max_num_batched_tokens=ctx,
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
        result["cuda_graph_buckets"] = sorted(runner.graphs.graphs) if runner.graphs else []
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
    params = SamplingParams(max_tokens=args.steps + 6, ignore_eos=True)
    for rid in rids:
        engine.add_request(rid, prefix + tokens(16), params)
    times, decoding = [], 0
    try:
        while engine.has_unfinished_requests() and len(times) < args.steps:
            sync(args.device)
            start = time.perf_counter()
            outputs = engine.step()
            sync(args.device)
            elapsed = time.perf_counter() - start
            if len(outputs) == batch and all(len(o.outputs[0].token_ids) > 1 for o in outputs):
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
    while not all(len(o.outputs[0].token_ids) > 1 for o in engine.step()):
        pass
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
