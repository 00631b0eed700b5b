"""Speculative decoding on one GPU: what a verification step costs against a decode step, what
MTP drafting costs, and what the n-gram proposer costs the host (issue 13's targets).

    python benchmarks/bench_spec_decode.py --out-dir DIR           # GPU: about 4 minutes
    python benchmarks/bench_spec_decode.py --budget-s 120 --out-dir DIR   # GPU, bounded
    python benchmarks/bench_spec_decode.py --ngram-only --out-dir DIR   # host only (any CPU)
    python benchmarks/bench_spec_decode.py --smoke --out-dir DIR   # tiny shapes on CPU, seconds

Phases, each bounded (one engine per model, in its own process, GROUP_TIMEOUT_S):

  ngram   one n-gram proposal (prompt_lookup 1..4, K = 4) at 8k, 32k and 128k tokens of
          context: random tokens of a 128k vocabulary with a repeated passage (matches are
          found), and a constant run (every position a candidate: the worst case). Median
          microseconds per request per step, the buffer already filled (as in serving).
  verify  per model, an engine built as a user would (`LLM`, random bf16 weights made on
          the GPU, CUDA graphs on), requests at 32k context whose cache holds random values:
          the median ms of a decode step (1 token a request) and of a verification step
          (1 + K = 5 tokens a request), batch 1 and 8; with MTP also the drafting round
          after a step (the module over the step's tokens and K - 1 chained decode steps).
            ngram-8b   Llama-3.1-8B shape, {"method": "ngram", "num_speculative_tokens": 4}
            mtp-v2lite DeepSeek-V2-Lite shape with one MTP module,
                       {"method": "deepseek_mtp", "num_speculative_tokens": 4}
          Targets: verify / decode <= 1.2 at both batches; at a mean of 3 tokens a step,
          ms per token >= 2.5x fewer than decode (MTP: drafting counted).

`--budget-s`: sections in the order issue 13's targets need them (ngram-8b's verification
ratio, then MTP's, then the host's n-gram cost); a section that would start with less time
left than it needs is skipped and recorded in "skipped", and a model's engine process gets
at most the time left (its rows so far are kept). The JSON is written after every section.

Writes DIR/<date>-<device>-spec-decode.json: {"device", "date", "torch", "ngram": [...],
"verify": [{"model", "batch", "context", "decode_ms", "verify_ms", "draft_ms", "ratio",
"speedup_at_3"}], "targets": [...], "errors": [...], "skipped": [...]}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_deepseek import TINY as DEEPSEEK_TINY  # noqa: E402
from bench_deepseek import V2_LITE  # noqa: E402
from job_process import run_job  # noqa: E402
from serving_model import LLAMA_31_8B, TINY, write_model_dir  # noqa: E402

K = 4
CONTEXT = 32768
BATCHES = (1, 8)
STEPS, WARMUP = 20, 5
GROUP_TIMEOUT_S = 300
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
         "prompt_lookup_min": 1}
MTP = {"method": "deepseek_mtp", "num_speculative_tokens": K}
MODELS = {  # name: (shape, speculative config)
    "ngram-8b": (LLAMA_31_8B, NGRAM),
    "mtp-v2lite": (dict(V2_LITE, num_nextn_predict_layers=1), MTP),
}
SMOKE_MODELS = {"ngram-8b": (TINY, NGRAM),
                "mtp-v2lite": (dict(DEEPSEEK_TINY, num_nextn_predict_layers=1,
                                    bos_token_id=1022, eos_token_id=1023), MTP)}
TARGET_RATIO, TARGET_SPEEDUP, TOKENS_PER_STEP = 1.2, 2.5, 3
NGRAM_TARGET_US = 300


# n-gram proposer (host) ---------------------------------------------------------------------
def bench_ngram(contexts=(8192, 32768, 131072), reps: int = 200) -> list[dict]:
    from cpserve.spec_decode.ngram import TokenHistory, find_drafts

    rows = []
    gen = np.random.default_rng(0)
    for context in contexts:
        length = min(512, context // 4)
        passage = gen.integers(0, 128256, length)
        tokens = gen.integers(0, 128256, context).astype(np.int32)  # as TokenHistory keeps them
        tokens[context // 3:context // 3 + length] = passage  # seen before ...
        tokens[-length // 2:] = passage[:length // 2]  # ... and being repeated: matches
        cases = {"text-like": tokens, "constant-run": np.full(context, 7, dtype=np.int32)}
        for kind, array in cases.items():
            drafts = find_drafts(array, 1, 4, K)
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                find_drafts(array, 1, 4, K)
                times.append(time.perf_counter() - start)
            rows.append(dict(context=context, case=kind, drafts=len(drafts),
                             us_median=statistics.median(times) * 1e6,
                             us_p99=sorted(times)[int(0.99 * reps)] * 1e6))
        # Once per request (and after a preemption): its tokens copied into the buffer.
        as_list = tokens.tolist()
        start = time.perf_counter()
        TokenHistory().sync(as_list)
        rows.append(dict(context=context, case="first-fill", drafts=0,
                         us_median=(time.perf_counter() - start) * 1e6, us_p99=None))
    return rows


# verification steps (one engine per model) --------------------------------------------------
class BenchSteps:
    """Hand-made decode, verification and (MTP) drafting plans of `batch` requests at
    `context` tokens, run through the engine's executor (the cache holds random values: speed
    only). Steps keep their position, so the context stays at `context` (a verification
    step's slots are written again, as after a rejection). Blocks come from the engine's pool
    and go back on `close`, so no cached prefix is overwritten."""

    def __init__(self, llm, context: int, batch: int) -> None:
        self.executor, self.context = llm.engine.executor, context
        self.device = llm.engine.device
        spec, self.pool = llm.engine.config.speculative, llm.engine.kv.pool
        self.k, self.is_mtp = spec.num_speculative_tokens, spec.is_mtp
        blocks = llm.engine.kv.layout.num_blocks_for(context + 2 * self.k + 2)
        if blocks * batch > self.pool.num_free:
            raise RuntimeError(f"{batch} x {context} tokens need {blocks * batch} blocks, the "
                               f"cache has {self.pool.num_free} free")
        self.rids = [f"bench-{batch}-{i}" for i in range(batch)]
        self.tables = {r: self.pool.allocate(blocks) for r in self.rids}
        self.started = False

    def decode(self):
        from cpserve.distributed.plan import PlannedRequest, StepPlan

        first, self.started = not self.started, True
        return StepPlan([PlannedRequest(r, [11], self.context, self.tables[r] if first else [],
                                        first, 1) for r in self.rids])

    def verify(self):
        from cpserve.distributed.plan import PlannedRequest, StepPlan

        assert self.started, "a decode step first: it brings the block tables"
        return StepPlan([PlannedRequest(r, [11] + [12] * self.k, self.context, [], False,
                                        1 + self.k, self.k) for r in self.rids])

    def draft(self):
        """The drafting round after a verification step whose drafts were all accepted."""
        from cpserve.distributed.plan import StepPlan

        return StepPlan(draft=[[[12] * (1 + self.k), self.k, self.k] for _ in self.rids])

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, kind: str) -> None:
        """One step: "decode", "verify", or "verify+draft"."""
        self.executor.execute(self.decode() if kind == "decode" else self.verify())
        if kind == "verify+draft":
            self.executor.draft(self.draft())

    def timed(self, kind: str, steps: int, warmup: int) -> float:
        """Median ms of `steps` steps of `kind` after `warmup`, each from idle to idle."""
        times = []
        for _ in range(warmup + steps):
            self.sync()
            start = time.perf_counter()
            self.run(kind)
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times[warmup:]) * 1e3

    def close(self) -> None:
        from cpserve.distributed.plan import StepPlan

        self.executor.execute(StepPlan(freed_request_ids=self.rids))
        for r in self.rids:
            self.pool.release(self.tables[r])


def step_times(llm, context: int, batch: int, steps: int = STEPS,
               warmup: int = WARMUP) -> dict:
    """Median ms of decode steps, verification steps and (MTP) drafting rounds of `batch`
    requests at `context` tokens (`BenchSteps`)."""
    bench = BenchSteps(llm, context, batch)
    try:
        result = dict(batch=batch, context=context,
                      decode_ms=bench.timed("decode", steps, warmup))
        result["verify_ms"] = bench.timed("verify", steps, warmup)
        if bench.is_mtp:
            result["verify_and_draft_ms"] = bench.timed("verify+draft", steps, warmup)
            result["draft_ms"] = result["verify_and_draft_ms"] - result["verify_ms"]
    finally:
        bench.close()
    step_ms = result.get("verify_and_draft_ms", result["verify_ms"])
    result["ratio"] = result["verify_ms"] / result["decode_ms"]
    result["step_ratio"] = step_ms / result["decode_ms"]
    result["speedup_at_3"] = TOKENS_PER_STEP * result["decode_ms"] / step_ms
    return result


def engine_flags(shape: dict, spec: dict, smoke: bool) -> dict:
    context = 64 if smoke else CONTEXT
    return dict(dtype="float32" if smoke else "bfloat16", device="cpu" if smoke else "cuda",
                load_format="dummy", max_model_len=context + 4 * K + 8,
                max_num_seqs=max(BATCHES), speculative_config=spec,
                **({"kv_cache_memory": 0.05} if smoke else {}))


def verify_worker(job: dict, out_file: Path | None = None) -> list[dict]:
    """One engine, every batch of the job; the rows so far go to `out_file` after each."""
    from cpserve import LLM

    rows = []
    with LLM(job["model_dir"], **job["flags"]) as llm:
        for batch in job["batches"]:
            row = dict(model=job["name"], **step_times(llm, job["context"], batch,
                                                       job["steps"], job["warmup"]))
            print(json.dumps(row), flush=True)
            rows.append(row)
            if out_file is not None:
                out_file.write_text(json.dumps(rows))
    return rows


def targets(rows: list[dict], ngram: list[dict]) -> list[dict]:
    checks = []
    for r in rows:
        what = f"{r['model']} batch {r['batch']}"
        checks.append(dict(target=f"{what}: verify / decode", value=round(r["ratio"], 3),
                           limit=TARGET_RATIO, met=r["ratio"] <= TARGET_RATIO))
        checks.append(dict(target=f"{what}: decode ms / ms per token at 3 tokens a step",
                           value=round(r["speedup_at_3"], 3), limit=TARGET_SPEEDUP,
                           met=r["speedup_at_3"] >= TARGET_SPEEDUP))
    worst = max((n["us_median"] for n in ngram if n["context"] == 131072
                 and n["case"] == "text-like"), default=None)
    if worst is not None:
        checks.append(dict(target="n-gram proposal at 128k (us per request per step)",
                           value=round(worst, 1), limit=NGRAM_TARGET_US,
                           met=worst < NGRAM_TARGET_US))
    return checks


# Seconds a section needs at least to be worth starting (engine start-up included).
SECTION_NEEDS_S = {"ngram-8b": 45, "mtp-v2lite": 45, "ngram": 10}


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ngram-only", action="store_true", help="the host phase alone")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, in process")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for all sections; a section that would start with less "
                             "left than it needs is skipped and recorded")
    parser.add_argument("--verify-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.verify_worker:
        job = json.loads(Path(args.verify_worker[0]).read_text())
        verify_worker(job, Path(args.verify_worker[1]))
        return None

    deadline = time.monotonic() + (args.budget_s if args.budget_s is not None else 1e9)
    device = "cpu" if args.smoke or args.ngram_only or not torch.cuda.is_available() else "cuda"
    report = dict(device=torch.cuda.get_device_name().replace(" ", "-") if device == "cuda"
                  else "cpu", date=datetime.date.today().isoformat(), torch=torch.__version__,
                  k=K, budget_s=args.budget_s, ngram=[], verify=[], targets=[], errors=[],
                  skipped=[])
    out = Path(args.out_dir) / f"{report['date']}-{report['device']}-spec-decode.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["targets"] = targets(report["verify"], report["ngram"])
        out.write_text(json.dumps(report, indent=1))

    def left_for(name: str) -> float | None:
        """Seconds left for the section, or None (recorded as skipped)."""
        left = deadline - time.monotonic()
        needs = 1 if args.smoke else SECTION_NEEDS_S.get(name, 45)
        if left < needs:
            report["skipped"].append(dict(section=name, reason=f"{left:.0f} s left of "
                                          f"--budget-s {args.budget_s:g}, needs ~{needs} s"))
            print(f"{name}: skipped ({report['skipped'][-1]['reason']})", flush=True)
            save()
            return None
        return left

    models = SMOKE_MODELS if args.smoke else MODELS
    for name in ([] if args.ngram_only else [m for m in args.models.split(",") if m]):
        left = left_for(name)
        if left is None:
            continue
        shape, spec = models[name]
        flags = engine_flags(shape, spec, args.smoke)
        model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix=f"cpserve-{name}-")), shape,
                                    flags["max_model_len"])
        job = dict(name=name, model_dir=str(model_dir), flags=flags,
                   context=64 if args.smoke else CONTEXT, batches=list(BATCHES),
                   steps=3 if args.smoke else STEPS, warmup=1 if args.smoke else WARMUP)
        result, error = ((verify_worker(job), None) if args.smoke
                         else run_job(__file__, "--verify-worker", job,
                                      min(GROUP_TIMEOUT_S, left), default=[]))
        report["verify"] += result
        if error:
            report["errors"].append(dict(model=name, error=error))
            print(f"{name} failed: {error}", flush=True)
        save()
    if left_for("ngram") is not None:
        report["ngram"] = bench_ngram((256, 1024) if args.smoke else (8192, 32768, 131072),
                                      reps=20 if args.smoke else 200)
        for n in report["ngram"]:
            p99 = f" (p99 {n['us_p99']:.1f})" if n["us_p99"] is not None else ""
            print(f"n-gram {n['case']} at {n['context']}: {n['us_median']:.1f} us{p99}",
                  flush=True)
        save()
    save()
    for r in report["verify"]:
        draft = f", draft {r['draft_ms']:.2f} ms" if "draft_ms" in r else ""
        print(f"{r['model']} batch {r['batch']} at {r['context']}: decode {r['decode_ms']:.2f} "
              f"ms, verify {r['verify_ms']:.2f} ms{draft}: ratio {r['ratio']:.2f}, speedup "
              f"at 3 tokens a step {r['speedup_at_3']:.2f}x")
    for t in report["targets"]:
        print(f"target {t['target']}: {t['value']} (limit {t['limit']}): "
              f"{'met' if t['met'] else 'NOT met'}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
