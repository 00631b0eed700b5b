"""DeepSeek-V2-Lite 32k TTFT on one GPU: MLA's cached prefix read expanded against absorbed.

    python benchmarks/bench_mla_prefix.py --out-dir DIR            # one H200, ~60 s
    python benchmarks/bench_mla_prefix.py --tiny --device cpu --out-dir DIR   # the logic

First one layer's attention of a 4096-token chunk over 28672 cached tokens (the last chunk
with default flags), expanded against absorbed: agreement and times. Then one engine (`LLM`,
random bf16 weights made on the GPU, start-up memory profile of a
--context-token step) and, in this order, each a new random prompt of --context tokens:

  one_step          the whole prompt in one step (max_num_batched_tokens = context,
                    long_prefill_token_threshold=0): no cached prefix at all; a warm-up run
                    first (cuDNN plans, Triton compiles)
  default_expanded  the scheduler of default flags (8192 tokens a step, prompts chunked at
                    4096): every chunk after the first reads its cached prefix expanded
                    (cpserve/attention/latent_prefix.py); two runs, the first warms up
  default_absorbed  the same with deepseek_v2.MLA_EXPANDED_PREFIX = False: the prefix read
                    absorbed by the Triton paged kernel, as before (device run 6: 5.61 s)

Each phase runs while --budget-s lasts (the absorbed one is skipped when less than
--absorbed-needs-s is left). Also recorded: the start-up profile's report, the prefix
workspace's size, and the peak allocation of each phase (it must stay within the profile).
Writes DIR/mla-prefix.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe_tuning import MODELS, TINY_MODELS, sync, write_model_dir  # noqa: E402

TARGET_TTFT_S = 1.0  # issue 18, dsv2lite at 32k


def default_scheduler(llm, tiny: bool):
    """The scheduler default flags give (EngineArgs' step budget and cap) over this engine's
    KV manager; tiny: 64 tokens a step, so that a short prompt is chunked too."""
    from cpserve.engine.args import EngineArgs
    from cpserve.engine.scheduler import Scheduler

    config = llm.engine.config
    flags = dict(max_num_batched_tokens=64) if tiny else {}
    budget, cap = EngineArgs(**flags).step_budget(config.model.max_model_len)
    sched = dataclasses.replace(config.scheduler, max_num_batched_tokens=budget,
                                long_prefill_token_threshold=cap)
    return Scheduler(sched, llm.engine.kv), budget, cap


def ttft_s(llm, prompt, device: str) -> float:
    from cpserve import SamplingParams

    engine = llm.engine
    sync(device)
    start = time.perf_counter()
    engine.add_request(f"r{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=1,
                                                                         ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    sync(device)
    return time.perf_counter() - start


def layer_check(device: str, tiny: bool, queries: int, prefix: int) -> dict:
    """One layer's chunk over a cached prefix, dsv2lite's shapes, random bf16 values (tiny:
    toy ones in fp32 through the reference): the expanded prefix (planned, in pieces, a
    decode row absorbed) against the absorbed paged path, and their times."""
    from cpserve.attention.backend import AttentionShape, get_backend
    from cpserve.attention.forms import LatentForms

    heads, nope, rope, v, latent = (4, 16, 8, 16, 32) if tiny else (16, 128, 64, 128, 512)
    dtype = torch.float32 if device != "cuda" else torch.bfloat16
    shape = AttentionShape(heads, 1, latent + rope, latent, dtype, values_in_keys=True,
                           expanded_dims=(nope + rope, v))
    backend = get_backend("auto", device, shape, prefix)
    gen = torch.Generator(device=device).manual_seed(0)
    block = 16
    blocks = -(-prefix // block) + 1
    cache = torch.randn(blocks, block, 1, latent + rope, generator=gen, device=device,
                        dtype=dtype)
    tables = torch.randperm(blocks, device=device).view(1, blocks)
    forms = LatentForms(torch.randn(heads * (nope + v), latent, generator=gen, device=device,
                                    dtype=dtype) / latent ** 0.5, heads, nope, v, latent)
    q = torch.randn(queries + 1, heads, nope + rope, generator=gen, device=device, dtype=dtype)
    seq = torch.zeros(queries + 1, dtype=torch.long)
    lens = torch.full((queries + 1,), prefix, dtype=torch.long)
    lens[-1] = prefix // 3  # a decode-like row: absorbed in the expanded call
    plan = (backend._latent_plan(seq, lens, 1) if hasattr(backend, "_latent_plan")
            and backend._latent_library(shape) else None)
    seq, lens = seq.to(device), lens.to(device)
    scale = (nope + rope) ** -0.5

    def expanded():
        return backend.latent_prefix_attention(q, cache, tables, seq, lens, scale, forms,
                                               plan=plan)

    def absorbed():
        out, lse = backend.paged_attention(forms.cached_query(q), cache, None, tables, seq,
                                           lens, scale, latent)
        return forms.cached_output(out), lse

    def timed(fn) -> tuple[tuple, float]:
        result = fn()  # warm-up (compiles, cuDNN plans)
        sync(device)
        begin = time.perf_counter()
        for _ in range(3):
            result = fn()
        sync(device)
        return result, (time.perf_counter() - begin) / 3 * 1e3

    (out_e, lse_e), ms_e = timed(expanded)
    (out_a, lse_a), ms_a = timed(absorbed)
    scale_out = out_a.float().abs().max().item()
    row = dict(queries=queries, prefix=prefix, planned=plan is not None,
               pieces=[len(g.pieces) for g in plan.groups] if plan is not None else None,
               expanded_ms=ms_e, absorbed_ms=ms_a,
               max_abs_err_out=(out_e.float() - out_a.float()).abs().max().item(),
               max_abs_out=scale_out,
               max_abs_err_lse=(lse_e - lse_a).abs().max().item(),
               fallbacks=sorted(getattr(backend, "fallbacks", [])))
    row["ok"] = bool(row["max_abs_err_out"] <= 0.05 * max(scale_out, 1e-6)
                     and row["max_abs_err_lse"] <= 0.1)  # bf16 rounding of two forms
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--context", type=int, default=None, help="default 32768 (tiny 256)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy shapes: the logic on CPU")
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--absorbed-needs-s", type=float, default=12.0)
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    ctx = args.context or (256 if args.tiny else 32768)
    from cpserve import LLM
    from cpserve.models import deepseek_v2

    if args.tiny:  # the tiny steps are short: let them take the expanded form
        os.environ.setdefault("CPSERVE_MLA_EXPANDED_MIN_TOKENS", "16")
    shape = (TINY_MODELS if args.tiny else MODELS)["dsv2lite"]
    gen = torch.Generator().manual_seed(0)

    def prompt():
        return torch.randint(0, int(shape["vocab_size"]), (ctx,), generator=gen).tolist()

    def peak_gib() -> float | None:
        return (torch.cuda.max_memory_allocated() / 2**30) if args.device == "cuda" else None

    def reset_peak() -> None:
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    result: dict = dict(model="dsv2lite", context=ctx, device=args.device, tiny=args.tiny,
                        target_ttft_s=TARGET_TTFT_S, before_s=dict(one_step_2_chunks=3.41,
                                                                  default_flags=5.61))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every phase: a run cut short by `timeout` keeps what it got
        result["total_s"] = time.monotonic() - start
        (out / "mla-prefix.json").write_text(json.dumps(result, indent=2))

    queries, prefix = (32, 200) if args.tiny else (4096, 28672)  # default flags' last chunk
    result["layer"] = check = layer_check(args.device, args.tiny, queries, prefix)
    print(f"[mla-prefix] one layer, {queries} queries over {prefix} cached: expanded "
          f"{check['expanded_ms']:.2f} ms, absorbed {check['absorbed_ms']:.2f} ms, max err "
          f"{check['max_abs_err_out']:.3g} of {check['max_abs_out']:.3g}, lse "
          f"{check['max_abs_err_lse']:.3g}: {'ok' if check['ok'] else 'MISMATCH'}", flush=True)
    if args.device == "cuda":
        torch.cuda.empty_cache()
    save()
    saved = deepseek_v2.MLA_EXPANDED_PREFIX
    with tempfile.TemporaryDirectory() as tmp:
        flags = dict(device=args.device, dtype="float32" if args.tiny else "bfloat16",
                     load_format="dummy", block_size=16, max_model_len=ctx + 16,
                     max_num_batched_tokens=ctx, long_prefill_token_threshold=0,
                     enable_prefix_caching=False, enforce_eager=True, max_num_seqs=4)
        if args.device != "cuda":
            flags["num_kv_blocks"] = 2 * (ctx // 16 + 2)
        llm = LLM(str(write_model_dir(shape, Path(tmp) / "dsv2lite")), **flags)
        try:
            runner = llm.engine.executor.runner
            workspace = getattr(runner.backend, "_latent_workspace", None)
            result.update(startup_s=time.monotonic() - start,
                          profile=getattr(runner, "profile_report", None),
                          latent_workspace_mib=(None if workspace is None else sum(
                              t.numel() * t.element_size() for t in (
                                  workspace.latent, workspace.scratch, workspace.keys,
                                  workspace.values)) / 2**20),
                          latent_piece_tokens=getattr(runner.backend, "latent_piece_tokens",
                                                      None))
            print(f"[mla-prefix] start-up {result['startup_s']:.1f} s; {result['profile']}; "
                  f"workspace {result['latent_workspace_mib']} MiB", flush=True)
            save()
            one_step_scheduler = llm.engine.scheduler
            reset_peak()
            runs = [ttft_s(llm, prompt(), args.device) for _ in range(2)]
            result["one_step"] = dict(runs_s=runs, ttft_s=runs[-1], peak_gib=peak_gib())
            print(f"[mla-prefix] one step: {runs}", flush=True)
            save()
            scheduler, budget, cap = default_scheduler(llm, args.tiny)
            llm.engine.scheduler = scheduler
            result["default_flags"] = dict(max_num_batched_tokens=budget,
                                           long_prefill_token_threshold=cap)
            for name, expanded, repeats in (("default_expanded", True, 2),
                                            ("default_absorbed", False, 1)):
                left = deadline - time.monotonic()
                if not expanded and left < args.absorbed_needs_s:
                    result[name] = dict(skipped=f"{left:.0f} s left of --budget-s")
                    continue
                deepseek_v2.MLA_EXPANDED_PREFIX = expanded
                reset_peak()
                runs = [ttft_s(llm, prompt(), args.device) for _ in range(repeats)]
                result[name] = dict(runs_s=runs, ttft_s=runs[-1], peak_gib=peak_gib())
                print(f"[mla-prefix] default flags ({budget} a step, chunks of {cap}), prefix "
                      f"{'expanded' if expanded else 'absorbed'}: {runs}", flush=True)
                save()
            llm.engine.scheduler = one_step_scheduler
            result["fallbacks"] = sorted(getattr(runner.backend, "fallbacks", []))
            result["host_plans"] = getattr(runner.backend, "host_plans", None)
        finally:
            deepseek_v2.MLA_EXPANDED_PREFIX = saved
            llm.shutdown()
    for key in ("one_step", "default_expanded", "default_absorbed"):
        ttft = result.get(key, {}).get("ttft_s")
        if ttft is not None:
            met = "met" if ttft <= TARGET_TTFT_S else "not met"
            print(f"dsv2lite {key:17s} TTFT {ttft:.3f} s (target <= {TARGET_TTFT_S} s: {met})")
    save()
    print(f"wrote {out / 'mla-prefix.json'} ({result['total_s']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
