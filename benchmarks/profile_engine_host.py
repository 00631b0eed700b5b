"""Where the host's time goes in one engine step, on CPU: a batch-64 decode step and a mixed
step (decodes beside a prefill chunk), through the engine core's `LLMEngine.step()` (the
server's engine process; `profile_host.py` profiles the server's processes under load).

    python benchmarks/profile_engine_host.py --out-dir /tmp/prof            # about a minute
    python benchmarks/profile_engine_host.py --out-dir /tmp/prof --steps 20 --batch 64

The model has a real-size vocabulary (128,256, as Llama 3) and two small layers, so that the
host's costs (scheduling, plans, block tables, the sampler's full-vocabulary passes, output
news per step) are not hidden behind the layers' arithmetic. What the model itself costs is kept
apart: the forward pass and the LM head are timed as their own phases, since on a GPU they
run asynchronously and the host only launches them.

Writes <out-dir>/profile-engine-host.json: per scenario, the median milliseconds a step spends in
each phase (inclusive), and the top functions of a cProfile by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serving_model import LLAMA_31_8B, write_model_dir  # noqa: E402

# Real vocabulary, toy layers: the LM head is the only large matmul.
SHAPE = dict(LLAMA_31_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             max_position_embeddings=16384, torch_dtype="float32",
             rope_scaling=dict(LLAMA_31_8B["rope_scaling"],
                               original_max_position_embeddings=8192))

# (module path, attribute path, phase name). Missing ones are skipped, so the script keeps
# working as the code moves; nested phases are inclusive.
PHASES = [
    ("cpserve.engine.scheduler", "Scheduler.schedule", "schedule"),
    ("cpserve.engine.llm_engine", "LLMEngine._plan", "plan"),
    ("cpserve.engine.model_runner", "ModelRunner.prepare", "runner.prepare"),
    ("cpserve.engine.step_inputs", "RequestRows.apply", "runner.prepare: rows.apply"),
    ("cpserve.engine.model_runner", "prepare_inputs", "runner.prepare: inputs"),
    ("cpserve.engine.model_runner", "ModelRunner.forward", "runner.forward (model)"),
    ("cpserve.engine.model_runner", "ModelRunner._logit_rows", "runner.logit_rows"),
    ("cpserve.models.llama", "LlamaForCausalLM.compute_logits", "lm_head (model)"),
    ("cpserve.engine.sampler", "Sampler.__call__", "sampler"),
    ("cpserve.engine.sampler", "Sampler.sample", "sampler"),
    ("cpserve.engine.sampler", "SampledBatch.resolve", "sampler: resolve on host"),
    ("cpserve.engine.llm_engine", "LLMEngine._finish", "finish (news, stops)"),
    ("cpserve.engine.llm_engine", "LLMEngine._stop_status", "finish: stops"),
    ("cpserve.kv.manager", "KVCacheManager.cache_full_blocks", "kv.cache_full_blocks"),
    ("cpserve.engine.llm_engine", "LLMEngine.step", "step (total)"),
]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched outside the model (on a GPU: kernel launches, copies
    and synchronisations the host pays for each step). `pause` around the model's calls."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.counts[func._overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def pause_inside(self, module: str, attr: str) -> None:
        import importlib

        owner = importlib.import_module(module)
        *path, method = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, method)
        counter = self

        def paused(*args, **kwargs):
            counter.paused += 1
            try:
                return original(*args, **kwargs)
            finally:
                counter.paused -= 1

        setattr(owner, method, paused)


class PhaseTimer:
    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.depth: dict[str, int] = defaultdict(int)

    def wrap(self, module: str, attr: str, name: str) -> None:
        import importlib

        try:
            owner = importlib.import_module(module)
            *path, method = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, method)
        except (ImportError, AttributeError):
            return
        timer = self

        def timed(*args, **kwargs):
            timer.depth[name] += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.depth[name] -= 1
                if timer.depth[name] == 0:  # recursion or a wrapped override: count once
                    timer.current[name] += time.perf_counter() - start

        setattr(owner, method, timed)

    def take(self) -> dict[str, float]:
        out, self.current = dict(self.current), defaultdict(float)
        return out


def scenario_requests(name: str, batch: int, vocab: int):
    """(prompts, params) so that after a warm-up every measured step has the shape named."""
    from cpserve import SamplingParams

    gen = torch.Generator().manual_seed(0)

    def prompt(n):
        return torch.randint(0, vocab - 256, (n,), generator=gen).tolist()

    greedy = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    if name == "decode-64":
        return [prompt(1024) for _ in range(batch)], [greedy] * batch
    if name == "decode-64-sampled":
        sampled = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_tokens=10_000,
                                 ignore_eos=True)
        return [prompt(1024) for _ in range(batch)], [sampled] * batch
    raise ValueError(name)


def run_scenario(engine, timer: PhaseTimer, ops: OpCounter, name: str, batch: int,
                 steps: int, profile_dir: Path) -> dict:
    from cpserve import SamplingParams

    vocab = engine.config.model.vocab_size
    mixed = name.startswith("mixed")
    base = "decode-64" if mixed else name
    prompts, params = scenario_requests(base, batch, vocab)
    ids = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        ids.append(f"{name}-{i}")
        engine.add_request(ids[-1], p, sp)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                          for r in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()  # warm: every request decoding
    timer.take()
    per_step = []
    profiler = cProfile.Profile()
    chunk = engine.scheduler.config.max_num_batched_tokens - batch
    # Phases timed without the profiler (its per-call cost would inflate Python), then the
    # same number of steps under cProfile for the function breakdown, then with aten ops
    # counted (a dispatch mode costs every op).
    def one_step(step: int) -> None:
        if mixed:  # a new prompt each step: its first chunk runs beside the 64 decodes
            gen = torch.Generator().manual_seed(1000 + step)
            extra = torch.randint(0, vocab - 256, (chunk,), generator=gen).tolist()
            engine.add_request(f"{name}-x{step}", extra,
                               SamplingParams(temperature=0, max_tokens=1))
        engine.step()

    for step in range(steps):
        one_step(step)
        per_step.append(timer.take())
    profiler.enable()
    for step in range(steps, 2 * steps):
        one_step(step)
    profiler.disable()
    with ops:
        for step in range(2 * steps, 3 * steps):
            one_step(step)
    op_counts, ops.counts = ops.counts, Counter()
    engine.abort_request(ids + [f"{name}-x{s}" for s in range(3 * steps)])
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()
    profiler.dump_stats(profile_dir / f"{name}.pstats")
    stats = pstats.Stats(profiler)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:25]
    # Own time in torch's C functions is device work here (CPU) and a launch on a GPU; the
    # rest is Python the host runs either way (inflated by cProfile's cost per call). Calls
    # count the launches a GPU step pays.
    torch_s = python_s = 0.0
    torch_calls = 0
    for (file, _, fn), (_, calls, own, _, _) in stats.stats.items():
        if file == "~" and "torch" in fn:
            torch_s += own
            torch_calls += calls
        else:
            python_s += own
    phases = sorted({k for s in per_step for k in s})
    return dict(
        name=name, batch=batch, steps=steps,
        phase_ms_median={k: 1e3 * statistics.median(s.get(k, 0.0) for s in per_step)
                         for k in phases},
        python_ms_per_step=1e3 * python_s / steps, torch_ms_per_step=1e3 * torch_s / steps,
        torch_calls_per_step=torch_calls / steps,
        aten_ops_outside_model_per_step=sum(op_counts.values()) / steps,
        top_aten_ops_outside_model={k: v / steps for k, v in op_counts.most_common(15)},
        top_own_time=[dict(function=f"{Path(f).name}:{line}:{fn}", calls=cc,
                           own_ms_per_step=1e3 * tt / steps, cum_ms_per_step=1e3 * ct / steps)
                      for (f, line, fn), (cc, _, tt, ct, _) in top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--scenarios", default="decode-64,decode-64-sampled,mixed-64")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the host's costs are not blurred by idle spinning)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    from cpserve.engine.args import EngineArgs
    from cpserve.engine.llm_engine import LLMEngine

    timer = PhaseTimer()
    for module, attr, name in PHASES:
        timer.wrap(module, attr, name)
    ops = OpCounter()
    for module, attr in (("cpserve.models.llama", "LlamaForCausalLM.forward"),
                         ("cpserve.models.llama", "LlamaForCausalLM.compute_logits")):
        ops.pause_inside(module, attr)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model_dir(Path(tmp) / "model", SHAPE, 8192)
        engine = LLMEngine.from_engine_args(EngineArgs(
            model=str(model), load_format="dummy", dtype="float32", device="cpu",
            max_model_len=4096, num_kv_blocks=(args.batch + 2) * 1100 // 16,
            max_num_batched_tokens=512, long_prefill_token_threshold=0,
            max_num_seqs=args.batch + 2))
        results = []
        try:
            for name in args.scenarios.split(","):
                result = run_scenario(engine, timer, ops, name, args.batch, args.steps, out)
                results.append(result)
                print(f"\n== {name}: median ms per step, by phase (inclusive)")
                for phase, ms in sorted(result["phase_ms_median"].items(), key=lambda kv: -kv[1]):
                    print(f"  {phase:<28} {ms:8.2f}")
                print(f"  own time per step: python {result['python_ms_per_step']:.2f} ms, torch "
                      f"ops {result['torch_ms_per_step']:.2f} ms in "
                      f"{result['torch_calls_per_step']:.0f} calls")
                print(f"  aten ops outside the model per step: "
                      f"{result['aten_ops_outside_model_per_step']:.0f}: "
                      + ", ".join(f"{k} {v:g}" for k, v in
                                  result["top_aten_ops_outside_model"].items()))
                print("  top own time (ms per step):")
                for row in result["top_own_time"][:12]:
                    print(f"    {row['own_ms_per_step']:7.2f}  {row['function']}")
        finally:
            engine.shutdown()
    meta = dict(torch=torch.__version__, threads=args.threads, shape=SHAPE, date=time.strftime(
        "%Y-%m-%d %H:%M"))
    (out / "profile-engine-host.json").write_text(json.dumps(dict(meta=meta, scenarios=results),
                                                      indent=1))
    print(f"\nwrote {out / 'profile-engine-host.json'}")


if __name__ == "__main__":
    main()
