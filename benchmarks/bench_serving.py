"""Whole-engine serving benchmark: what a user gets from the real engine with default flags.

    python benchmarks/bench_serving.py                          # issue-12 runs + HF baseline
    python benchmarks/bench_serving.py --runs long-32k,8x32k    # some runs (HF with --hf)
    python benchmarks/bench_serving.py --sweep                  # + the step-budget sweep
    python benchmarks/bench_serving.py --runs '' --sweep        # the sweep alone
    python benchmarks/bench_serving.py --smoke --out-dir /tmp/s # tiny model on CPU, seconds
    python benchmarks/bench_serving.py --runs spec-ngram-32k,spec-mtp-32k --no-hf  # issue 13
    python benchmarks/bench_serving.py --runs throughput        # issue 19: server and LLM

Model: the Llama-3.1-8B shape, random bf16 weights made on the GPU (`load_format="dummy"`),
and a byte-level BPE tokenizer with exactly the model's 128,256 ids (serving_model.py). Each
run is a named spec in RUNS, driven through the `LLM` API: all its prompts are submitted at
once and timed from each request's own metrics (TTFT = first token - arrival). Runs that
share engine flags share one engine process (a hang or crash costs that group, not the
benchmark); before its runs each engine serves a warm-up (kernels compiled, decode batches
of 1 to 8 run; every decode graph is captured at start-up). Transformers' prefill of the same shape runs in its own process.

Writes <out-dir>/<date>-<device>-serving.json:
    {"device", "date", "torch", "model", "runs": [{"name", "num_prompts", "prompt_tokens",
     "output_tokens", "concurrency", "max_num_batched_tokens", "tp", "pcp", "dcp",
     "ttft_s_median", "ttft_s_max", "tpot_ms_median", "wall_s", "output_tok_per_s",
     "total_tok_per_s", ...}], "hf_prefill": [{"tokens", "ttft_s"}], "targets": [...]}
    the speculative runs add "num_drafts", "num_draft_tokens", "num_accepted_tokens",
    "mean_accepted_length" and the step costs "cost_decode_ms", "cost_verify_ms" (MTP:
    "cost_draft_ms") and "cost_ratio" (verification / decode, batch 1).

The throughput runs (issue 19: `64x1k`, `512x512`, `decode-32k`) go through the server: one
`cpserve serve --load-format dummy` per flag set, started by `serving_http.py` with this
interpreter and environment, loaded by `cpserve bench serve`'s client; their `-llm` twins send
the same text prompts through the offline API. Their runs carry `"via": "server" | "llm"`.

Adding a run: a `RunSpec` in RUNS (flags are `EngineArgs` fields on top of the defaults,
`via` says which front end, `driver` which function of DRIVERS drives an LLM run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_deepseek import TINY as DEEPSEEK_TINY  # noqa: E402
from bench_deepseek import V2_LITE  # noqa: E402
from serving_http import run_llm_workload, server_worker  # noqa: E402
from serving_model import LLAMA_31_8B, TINY, hf_prefill, write_model_dir  # noqa: E402


@dataclass(frozen=True)
class RunSpec:
    name: str
    num_prompts: int
    prompt_tokens: int
    output_tokens: int
    # Leading tokens shared with the prompt of run `prefix_of`, of the same length (a
    # prefix-cache hit). That prompt runs first, untimed, unless its run ran before in the
    # same engine.
    cached_tokens: int = 0
    prefix_of: str | None = None
    flags: dict = field(default_factory=dict)  # EngineArgs fields over the defaults
    # Step budget and cap of this run, on its group's engine (the sweep: one engine, profiled
    # for the largest step, serves every budget): the defaults EngineArgs would derive.
    scheduler: dict = field(default_factory=dict)
    driver: str = "llm"
    model: str = "llama-8b"  # a key of MODELS: the checkpoint shape its engine serves
    via: str = "llm"  # "server": through `cpserve serve` (serving_http.py)
    range_ratio: float = 0.0  # lengths uniform in [len*(1-r), len*(1+r)] (random workload)

    @property
    def concurrency(self) -> int:
        return self.num_prompts  # all submitted at once


ONE_CHUNK = dict(max_num_batched_tokens=32768, long_prefill_token_threshold=0)
SPEC_NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
SPEC_MTP = {"method": "deepseek_mtp", "num_speculative_tokens": 4}
# Checkpoint shapes (full size, smoke size) that runs name in `RunSpec.model`.
MODELS = {
    "llama-8b": (LLAMA_31_8B, TINY),
    "dsv2lite-mtp": (dict(V2_LITE, num_nextn_predict_layers=1),
                     dict(DEEPSEEK_TINY, num_nextn_predict_layers=1, bos_token_id=1022,
                          eos_token_id=1023)),
}
RUNS = {spec.name: spec for spec in [
    RunSpec("long-32k", 1, 32768, 128),
    RunSpec("long-128k", 1, 131072, 32),
    RunSpec("prefix-128k", 1, 131072, 32, cached_tokens=122880, prefix_of="long-128k"),
    RunSpec("8x32k", 8, 32768, 128),
    # The same engine with the whole prompt in one step: the reference for chunking's cost.
    RunSpec("long-32k-one-chunk", 1, 32768, 128, flags=ONE_CHUNK),
    # Speculative decoding (issue 13), K = 4: random weights, so acceptance means nothing; the
    # run records it, and the cost of a verification step against a decode step at 32k.
    RunSpec("spec-ngram-32k", 1, 32768, 128, flags=dict(speculative_config=SPEC_NGRAM),
            driver="spec"),
    RunSpec("spec-mtp-32k", 1, 32768, 128, flags=dict(speculative_config=SPEC_MTP),
            driver="spec", model="dsv2lite-mtp"),
]}
# Issue 12's runs; the speculative and throughput ones are asked for by name.
DEFAULT_RUNS = [name for name, spec in RUNS.items() if spec.driver == "llm"]
# Issue 19: everything at once through the server, and the same through the offline API.
THROUGHPUT = [
    dict(name="64x1k", num_prompts=64, prompt_tokens=1024, output_tokens=256),
    dict(name="512x512", num_prompts=512, prompt_tokens=512, output_tokens=128,
         range_ratio=0.5),
    dict(name="decode-32k", num_prompts=1, prompt_tokens=32768, output_tokens=256),
]
for run in THROUGHPUT:
    RUNS[run["name"]] = RunSpec(**run, via="server")
    RUNS[run["name"] + "-llm"] = RunSpec(**dict(run, name=run["name"] + "-llm"),
                                         driver="llm-workload")
ALIASES = {"throughput": [r["name"] for r in THROUGHPUT] + [r["name"] + "-llm"
                                                             for r in THROUGHPUT]}
# The step budget sweep: TTFT should hardly depend on the chunk size.
SWEEP_BUDGETS = (4096, 8192, 16384, 32768)
SWEEP_TOLERANCE = 0.02
MAX_MODEL_LEN = 131072 + 1024
HF_TOKENS = (32768, 131072)
# Wall-clock limit of one engine process (model build, warm-up, its runs), of one server.
GROUP_TIMEOUT_S = 240
SERVER_GROUP_TIMEOUT_S = 300


SWEEP_ENGINE = dict(max_num_batched_tokens=131072, long_prefill_token_threshold=0)


def sweep_runs() -> list[RunSpec]:
    runs = []
    settings = [dict(max_num_batched_tokens=b) for b in SWEEP_BUDGETS]
    settings.insert(2, dict(max_num_batched_tokens=8192, long_prefill_token_threshold=0))
    settings.append(dict(SWEEP_ENGINE))
    for setting in settings:
        budget = setting["max_num_batched_tokens"]
        tag = ("one-chunk" if budget == SWEEP_ENGINE["max_num_batched_tokens"] else
               f"b{budget}" + ("-nocap" if "long_prefill_token_threshold" in setting else ""))
        runs += [RunSpec(f"sweep-{tag}-long-32k", 1, 32768, 1, flags=SWEEP_ENGINE,
                         scheduler=setting),
                 RunSpec(f"sweep-{tag}-long-128k", 1, 131072, 1, flags=SWEEP_ENGINE,
                         scheduler=setting)]
    return runs


SMOKE_TOKENS, SMOKE_BUDGET = 128, 64  # --smoke divides prompt lengths and budgets by these


def sweep_decision(runs: list[dict]) -> dict | None:
    """The default budget to keep: the smallest whose 128k TTFT is within SWEEP_TOLERANCE of
    the best budget's (smaller steps keep decodes beside a long prefill faster)."""
    capped = {r["max_num_batched_tokens"]: r["ttft_s_median"] for r in runs
              if r["name"].startswith("sweep-b") and r["name"].endswith("-long-128k")
              and "-nocap-" not in r["name"]}
    if not capped:
        return None
    best = min(capped.values())
    budget = min(b for b, ttft in capped.items() if ttft <= best * (1 + SWEEP_TOLERANCE))
    one_chunk = next((r["ttft_s_median"] for r in runs
                      if r["name"] == "sweep-one-chunk-long-128k"), None)
    return dict(ttft_128k_by_budget=capped, default_budget=budget,
                one_chunk_128k=one_chunk, best_over_one_chunk=best / one_chunk
                if one_chunk else None)


def smoke(spec: RunSpec) -> RunSpec:
    """The same run at the tiny model's scale."""
    def scaled(settings: dict) -> dict:
        return {k: max(16, v // SMOKE_BUDGET) if k == "max_num_batched_tokens" else v
                for k, v in settings.items()}

    return replace(spec, num_prompts=min(spec.num_prompts, 16),
                   prompt_tokens=max(64, spec.prompt_tokens // SMOKE_TOKENS),
                   output_tokens=min(spec.output_tokens, 4),
                   cached_tokens=spec.cached_tokens // SMOKE_TOKENS, flags=scaled(spec.flags),
                   scheduler=scaled(spec.scheduler))


# The engine side (one process per flag set) -------------------------------------------------
def prompt_tokens(seed: int, count: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 256, (count,), generator=gen).tolist()  # no special ids


def _seed(name: str) -> int:
    return sum(ord(c) * 131 ** i for i, c in enumerate(name)) % (2**31)


def run_llm(llm, spec: RunSpec, done: set[str], job: dict) -> dict:
    from cpserve import SamplingParams

    vocab = llm.engine.config.model.vocab_size
    prompts = [prompt_tokens(_seed(f"{spec.name}/{i}"), spec.prompt_tokens, vocab)
               for i in range(spec.num_prompts)]
    if spec.prefix_of is not None:
        document = prompt_tokens(_seed(f"{spec.prefix_of}/0"), spec.prompt_tokens, vocab)
        if spec.prefix_of not in done:
            llm.generate([{"prompt_token_ids": document}], SamplingParams(max_tokens=1),
                         use_tqdm=False)
        prompts = [document[:spec.cached_tokens] + p[spec.cached_tokens:] for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=spec.output_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    wall = time.perf_counter() - start
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs]
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) * 1e3
            / (len(o.outputs[0].token_ids) - 1) for o in outputs
            if len(o.outputs[0].token_ids) > 1]
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    cfg, sched = llm.engine.config, llm.engine.scheduler.config
    return dict(
        name=spec.name, model=spec.model, num_prompts=spec.num_prompts,
        prompt_tokens=spec.prompt_tokens,
        output_tokens=spec.output_tokens, concurrency=spec.concurrency,
        max_num_batched_tokens=sched.max_num_batched_tokens,
        long_prefill_token_threshold=sched.long_prefill_token_threshold,
        tp=cfg.parallel.tp, pcp=cfg.parallel.pcp, dcp=cfg.parallel.dcp,
        ttft_s_median=statistics.median(ttft), ttft_s_max=max(ttft),
        tpot_ms_median=statistics.median(tpot) if tpot else None, wall_s=wall,
        output_tok_per_s=out_tokens / wall,
        total_tok_per_s=(out_tokens + spec.num_prompts * spec.prompt_tokens) / wall,
        cached_tokens=min(o.num_cached_tokens for o in outputs), flags=spec.flags)


def run_spec(llm, spec: RunSpec, done: set[str], job: dict) -> dict:
    """A speculative run: the serving figures, what the drafts did, and the cost of one
    verification step (1 + K tokens) against a decode step at the run's context, batch 1."""
    from bench_spec_decode import step_times

    before = llm.engine.stats().spec_decode  # the warm-up's drafts are not the run's
    result = run_llm(llm, spec, done, job)
    stats = llm.engine.stats().spec_decode
    drafts = stats.num_drafts - before.num_drafts
    accepted = stats.num_accepted_tokens - before.num_accepted_tokens
    result.update(num_drafts=drafts,
                  num_draft_tokens=stats.num_draft_tokens - before.num_draft_tokens,
                  num_accepted_tokens=accepted,
                  mean_accepted_length=1 + accepted / drafts if drafts else None,
                  **{f"cost_{k}": v for k, v in step_times(llm, spec.prompt_tokens, 1).items()
                     if k not in ("batch", "context")})
    return result


def run_workload(llm, spec: RunSpec, done: set[str], job: dict) -> dict:
    return run_llm_workload(llm, spec, job["model"], dict(job["base_flags"], **spec.flags))


DRIVERS: dict[str, Callable] = {"llm": run_llm, "spec": run_spec,
                                "llm-workload": run_workload}


def warm_up(llm, budget: int, short_prompt: int) -> None:
    """Compile the kernels, build the library plans of chunked steps, run decode batches of 1
    to 8 (their graphs were captured at start-up): what a server has done long before a
    user's request."""
    from cpserve import SamplingParams

    vocab = llm.engine.config.model.vocab_size
    longest = llm.engine.config.model.max_model_len // 2
    chunked = prompt_tokens(1, min(2 * budget + 100, longest), vocab)
    llm.generate([{"prompt_token_ids": chunked}],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    # Staggered lengths: the decode batch shrinks from 8 to 1, each bucket replayed.
    llm.generate([{"prompt_token_ids": prompt_tokens(2 + i, short_prompt, vocab)}
                  for i in range(8)],
                 [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True)
                  for i in range(8)], use_tqdm=False)


def scheduler_for(llm, settings: dict):
    """A scheduler over the engine's KV manager with the step budget and cap EngineArgs would
    give these settings (each checked as at start-up)."""
    from cpserve.config import EngineConfig
    from cpserve.engine.args import EngineArgs
    from cpserve.engine.scheduler import Scheduler

    config = llm.engine.config
    budget, threshold = EngineArgs(**settings).step_budget(config.model.max_model_len)
    sched = replace(config.scheduler, max_num_batched_tokens=budget,
                    long_prefill_token_threshold=threshold)
    if budget > config.scheduler.max_num_batched_tokens:
        raise ValueError(f"{settings}: a step larger than the engine profiled")
    EngineConfig(config.model, config.parallel, config.cache, sched, config.device)  # checks
    return Scheduler(sched, llm.engine.kv)


def engine_worker(job: dict) -> list[dict]:
    from cpserve import LLM

    specs = [RunSpec(**s) for s in job["specs"]]
    flags = dict(job["base_flags"], **specs[0].flags)
    results, done = [], set()
    with LLM(job["model"], **flags) as llm:
        engine_scheduler = llm.engine.scheduler
        if specs[0].scheduler:  # warm up as the group's first run will step
            llm.engine.scheduler = scheduler_for(llm, specs[0].scheduler)
        warm_up(llm, llm.engine.scheduler.config.max_num_batched_tokens, job["warm_prompt"])
        for spec in specs:
            llm.engine.scheduler = (scheduler_for(llm, spec.scheduler) if spec.scheduler
                                    else engine_scheduler)
            result = DRIVERS[spec.driver](llm, spec, done, job)
            done.add(spec.name)
            print(f"{spec.name}: TTFT median {result['ttft_s_median']:.3f} s, wall "
                  f"{result['wall_s']:.2f} s", flush=True)
            results.append(result)
    return results


# The driver side -----------------------------------------------------------------------------
def _groups(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """Runs by front end and engine flags, in first-appearance order (each group: one engine
    or one server)."""
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.via + json.dumps([spec.model, spec.flags], sort_keys=True),
                          []).append(spec)
    return list(groups.values())


def _in_subprocess(kind: str, job: dict, timeout: float) -> tuple[list, str | None]:
    """Run `job` in a fresh process (CUDA memory freed, a hang bounded); (results, error)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    out_file = f.name + ".out"
    cmd = [sys.executable, __file__, f"--{kind}-worker", f.name, out_file]
    try:
        proc = subprocess.run(cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:.0f} s"
    if proc.returncode != 0 or not os.path.exists(out_file):
        return [], f"exit status {proc.returncode}"
    return json.loads(Path(out_file).read_text()), None


def device_name(device: str) -> str:
    return torch.cuda.get_device_name().replace(" ", "-") if device == "cuda" else "cpu"


def targets(runs: list[dict], hf: list[dict]) -> list[dict]:
    """Issue 12's targets, for the runs present."""
    by_name = {r["name"]: r for r in runs}
    hf_by_tokens = {h["tokens"]: h["ttft_s"] for h in hf}
    checks = []

    def check(what, value, limit):
        checks.append(dict(target=what, value=round(value, 3), limit=limit, met=value <= limit))

    if "long-128k" in by_name and by_name["long-128k"]["prompt_tokens"] in hf_by_tokens:
        check("long-128k TTFT / HF 128k prefill",
              by_name["long-128k"]["ttft_s_median"] / hf_by_tokens[131072], 1.05)
    if "long-32k" in by_name and "long-32k-one-chunk" in by_name:
        check("long-32k TTFT / one-chunk TTFT", by_name["long-32k"]["ttft_s_median"]
              / by_name["long-32k-one-chunk"]["ttft_s_median"], 1.1)
    if "8x32k" in by_name:
        check("8x32k wall (s)", by_name["8x32k"]["wall_s"], 14.0)
    if "prefix-128k" in by_name:
        check("prefix-128k TTFT (s)", by_name["prefix-128k"]["ttft_s_median"], 1.5)
    for name in ("spec-ngram-32k", "spec-mtp-32k"):  # issue 13
        if name in by_name:
            check(f"{name}: verification / decode step", by_name[name]["cost_ratio"], 1.2)
    # Issue 19, through the server (limits are upper bounds: throughputs go in as 1/x).
    if "64x1k" in by_name:
        check("64x1k output tok/s >= 5000 (as 5000 / value)",
              5000 / by_name["64x1k"]["output_tok_per_s"], 1.0)
    if "512x512" in by_name:
        check("512x512 total tok/s >= 25000 (as 25000 / value)",
              25000 / by_name["512x512"]["total_tok_per_s"], 1.0)
    if "decode-32k" in by_name and by_name["decode-32k"]["tpot_ms_median"] is not None:
        check("decode-32k TPOT (ms)", by_name["decode-32k"]["tpot_ms_median"], 6.5)
    if "64x1k" in by_name and "64x1k-llm" in by_name:
        check("64x1k offline / server output tok/s", by_name["64x1k-llm"]["output_tok_per_s"]
              / by_name["64x1k"]["output_tok_per_s"], 1.05)
    return checks


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                        help=f"comma-separated names of {', '.join(RUNS)}, or "
                             f"{', '.join(ALIASES)}")
    parser.add_argument("--sweep", action="store_true", help="add the step-budget sweep")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None,
                        help="transformers prefill baseline (default: with the default runs)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on CPU, in this process: checks the pipeline")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    for kind in ("engine", "server", "hf"):
        parser.add_argument(f"--{kind}-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.runs = ",".join(n for name in args.runs.split(",") for n in ALIASES.get(name, [name]))
    for kind, fn in (("engine", engine_worker), ("server", server_group), ("hf", hf_worker)):
        job_file = getattr(args, f"{kind}_worker")
        if job_file:
            Path(job_file[1]).write_text(json.dumps(fn(json.loads(Path(job_file[0]).read_text()))))
            return None

    unknown = [n for n in args.runs.split(",") if n and n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(RUNS)}")
    specs = [RUNS[n] for n in args.runs.split(",") if n] + (sweep_runs() if args.sweep else [])
    with_hf = args.hf if args.hf is not None else args.runs == ",".join(DEFAULT_RUNS)
    device = "cpu" if args.smoke else "cuda"
    shape = TINY if args.smoke else LLAMA_31_8B
    if args.smoke:
        specs = [smoke(s) for s in specs]
    max_len = 8192 if args.smoke else MAX_MODEL_LEN
    model_dirs = {name: write_model_dir(Path(tempfile.mkdtemp(prefix=f"cpserve-{name}-")),
                                        MODELS[name][1 if args.smoke else 0], max_len)
                  for name in dict.fromkeys(s.model for s in specs)}
    base_flags = dict(dtype="bfloat16" if device == "cuda" else "float32", device=device,
                      load_format="dummy", max_model_len=max_len)
    if args.smoke:  # the default budget, at the tiny scale
        base_flags.update(kv_cache_memory=0.05, max_num_batched_tokens=8192 // SMOKE_BUDGET)

    runs, errors = [], []
    for group in _groups(specs):
        job = dict(model=str(model_dirs[group[0].model]), base_flags=base_flags,
                   specs=[asdict(s) for s in group],
                   warm_prompt=16 if args.smoke else 300, out_dir=args.out_dir)
        server = group[0].via == "server"
        if args.smoke:
            results, error = (server_group if server else engine_worker)(job), None
        else:
            results, error = _in_subprocess("server" if server else "engine", job,
                                            SERVER_GROUP_TIMEOUT_S if server
                                            else GROUP_TIMEOUT_S)
        runs += results
        if error:
            errors.append(dict(runs=[s.name for s in group], error=error))
            print(f"runs {[s.name for s in group]} failed: {error}", flush=True)
    hf = []
    if with_hf:
        tokens = [t // SMOKE_TOKENS for t in HF_TOKENS] if args.smoke else list(HF_TOKENS)
        job = dict(shape=shape, tokens=tokens, device=device)
        hf, error = (hf_worker(job), None) if args.smoke else _in_subprocess("hf", job, 120)
        if error:
            errors.append(dict(runs=["hf"], error=error))

    report = dict(device=device_name(device), date=datetime.date.today().isoformat(),
                  torch=torch.__version__, model="Llama-3.1-8B shape, random bf16"
                  if not args.smoke else "tiny (smoke)", runs=runs, hf_prefill=hf,
                  targets=targets(runs, hf) if not args.smoke else [],
                  sweep=sweep_decision(runs), errors=errors)
    kind = "serving-sweep" if args.sweep and not args.runs else "serving"
    out = Path(args.out_dir) / f"{report['date']}-{report['device']}-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"wrote {out}")
    return out


def hf_worker(job: dict) -> list[dict]:
    return hf_prefill(job["shape"], job["tokens"], job["device"])


def server_group(job: dict) -> list[dict]:
    return server_worker(job, RunSpec)


def print_table(report: dict) -> None:
    print("| run | via | prompts x tokens | out | budget | cap | TTFT median (s) | TTFT max (s) "
          "| TPOT median (ms) | wall (s) | out tok/s | total tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in report["runs"]:
        tpot = "-" if r["tpot_ms_median"] is None else f"{r['tpot_ms_median']:.1f}"
        print(f"| {r['name']} | {r.get('via', 'llm')} | {r['num_prompts']} x "
              f"{r['prompt_tokens']} | {r['output_tokens']} | {r['max_num_batched_tokens']} | "
              f"{r['long_prefill_token_threshold']} | {r['ttft_s_median']:.3f} | "
              f"{r['ttft_s_max']:.3f} | {tpot} | {r['wall_s']:.2f} | "
              f"{r['output_tok_per_s']:.1f} | {r['total_tok_per_s']:.1f} |")
    for h in report["hf_prefill"]:
        print(f"HF prefill {h['tokens']}: {h['ttft_s']:.3f} s")
    for t in report["targets"]:
        print(f"target {t['target']}: {t['value']} (limit {t['limit']}): "
              f"{'met' if t['met'] else 'NOT met'}")
    if report["sweep"]:
        sweep = report["sweep"]
        print(f"128k TTFT by budget (cap = half): {sweep['ttft_128k_by_budget']}; one chunk: "
              f"{sweep['one_chunk_128k']}: set DEFAULT_MAX_NUM_BATCHED_TOKENS = "
              f"{sweep['default_budget']} in cpserve/engine/args.py")
    for e in report["errors"]:
        print(f"FAILED {e['runs']}: {e['error']}")


if __name__ == "__main__":
    main()
