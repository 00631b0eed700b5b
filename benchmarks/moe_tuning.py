"""The tuning half of bench_moe.py: the fused MoE kernel's tiles and modes, and MLA's
expanded-versus-absorbed crossover, each measured and decided (see bench_moe.py's docstring);
and the model shapes and timing helpers both halves use.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_deepseek import TINY as DS_TINY
from bench_deepseek import V2_LITE

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


