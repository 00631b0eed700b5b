"""The runs of bench_serving.py that go through the server, and the workload they share with
their offline twins.

    server_worker(job)   `cpserve serve MODEL` started with this interpreter and environment
                         (PYTHONPATH included: on the device the server's wheels live there),
                         warmed up, then each run's requests sent by `cpserve bench serve`'s
                         client, all at once; the server is stopped at the end
    run_llm_workload     the same requests through the offline `LLM` API

Both send the same text prompts (`workload`): `cpserve bench serve`'s random dataset with
the model's tokenizer, of the run's lengths (range ratio r: lengths uniform in
[len(1-r), len(1+r)]), seeded by the run's name. Timings are the client's: TTFT from sending
to the first token, TPOT the rest of the request's time over its other tokens; the offline
API's the same from each request's metrics.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVED_NAME = "bench"
STARTUP_TIMEOUT_S = 300


def workload(spec, model_dir: str, warm_up: bool = False) -> list:
    """The run's requests; with `warm_up`, others of the same shape with answers of at most 8
    tokens (other prompts, so the timed run finds nothing of them in the prefix cache)."""
    from transformers import AutoTokenizer

    from cpserve.bench.datasets import SampleRequest, sample_random_requests

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    requests = sample_random_requests(
        spec.num_prompts, spec.prompt_tokens, spec.output_tokens, spec.range_ratio,
        seed=_seed(spec.name + ("/warm-up" if warm_up else "")), tokenizer=tokenizer)
    if warm_up:
        requests = [SampleRequest(r.prompt, r.prompt_len, min(r.max_tokens, 8))
                    for r in requests]
    return requests


def _seed(name: str) -> int:
    return sum(ord(c) * 131 ** i for i, c in enumerate(name)) % (2**31)


def cli_flags(flags: dict) -> list[str]:
    """EngineArgs fields as `cpserve serve` flags."""
    argv = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`cpserve serve` in a process group of its own, its log in `log_path`."""

    def __init__(self, model: str, flags: dict, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "w")
        cmd = [sys.executable, "-m", "cpserve.entrypoints.cli", "serve", model, "--port",
               str(self.port), "--served-model-name", SERVED_NAME, "--uvicorn-log-level",
               "warning", *cli_flags(flags)]
        print("server:", " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ), start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} at "
                                   f"start-up; see {log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start in {STARTUP_TIMEOUT_S} s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _client_run(url: str, requests: list) -> dict:
    from cpserve.bench.serve import run_benchmark

    return asyncio.run(run_benchmark(base_url=url, model=SERVED_NAME, requests=requests,
                                     ignore_eos=True, temperature=0.0))


def _result(spec, *, flags: dict, max_model_len: int, via: str, wall: float,
            ttfts: list[float], tpots_ms: list[float], prompt_tokens: int,
            output_tokens: int, failed: int = 0) -> dict:
    from cpserve.engine.args import EngineArgs

    budget, threshold = EngineArgs(**{k: v for k, v in flags.items() if k != "model"}
                                   ).step_budget(max_model_len)
    return dict(
        name=spec.name, via=via, num_prompts=spec.num_prompts, prompt_tokens=spec.prompt_tokens,
        output_tokens=spec.output_tokens, range_ratio=spec.range_ratio,
        concurrency=spec.concurrency, max_num_batched_tokens=budget,
        long_prefill_token_threshold=threshold,
        tp=flags.get("tensor_parallel_size", 1), pcp=flags.get("prefill_context_parallel_size", 1),
        dcp=flags.get("decode_context_parallel_size", 1),
        ttft_s_median=statistics.median(ttfts), ttft_s_max=max(ttfts),
        tpot_ms_median=statistics.median(tpots_ms) if tpots_ms else None, wall_s=wall,
        output_tok_per_s=output_tokens / wall,
        total_tok_per_s=(prompt_tokens + output_tokens) / wall,
        total_prompt_tokens=prompt_tokens, total_output_tokens=output_tokens, failed=failed,
        flags={k: v for k, v in flags.items() if k in spec.flags})


def server_worker(job: dict, spec_type) -> list[dict]:
    """One server for a group of runs (the same flags): warm-up, then each run."""
    specs = [spec_type(**s) for s in job["specs"]]
    flags = dict(job["base_flags"], **specs[0].flags)
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    server = Server(job["model"], flags, out_dir / f"server-{specs[0].name}.log")
    results = []
    try:
        for spec in specs:
            # Warm-up of the run's shape (kernels compiled, the batch's decode graph
            # replayed), as a server long up has done.
            _client_run(server.url, workload(spec, job["model"], warm_up=True))
            got = _client_run(server.url, workload(spec, job["model"]))
            done = [i for i, e in enumerate(got["errors"]) if not e]
            if not done:
                raise RuntimeError(f"{spec.name}: every request failed: {got['errors'][0]}")
            ttfts = [got["ttfts"][i] for i in done]
            tpots = [(sum(got["itls"][i])) / (got["output_lens"][i] - 1) * 1e3 for i in done
                     if got["output_lens"][i] > 1]
            result = _result(spec, flags=flags, max_model_len=flags["max_model_len"],
                             via="server", wall=got["duration"], ttfts=ttfts, tpots_ms=tpots,
                             prompt_tokens=got["total_input_tokens"],
                             output_tokens=got["total_output_tokens"], failed=got["failed"])
            print(f"{spec.name} (server): {result['output_tok_per_s']:.0f} output tok/s, "
                  f"{result['total_tok_per_s']:.0f} total tok/s, TPOT median "
                  f"{result['tpot_ms_median']} ms, wall {result['wall_s']:.2f} s", flush=True)
            results.append(result)
    finally:
        server.stop()
    return results


def run_llm_workload(llm, spec, model_dir: str, flags: dict) -> dict:
    """The run's requests through the offline API, after the same warm-up as the server's."""
    from cpserve import SamplingParams

    def params(requests: list) -> list:
        return [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True)
                for r in requests]

    warm = workload(spec, model_dir, warm_up=True)
    llm.generate([r.prompt for r in warm], params(warm), use_tqdm=False)
    requests = workload(spec, model_dir)
    prompts = [r.prompt for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params(requests), use_tqdm=False)
    wall = time.perf_counter() - start
    ttfts = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs]
    tpots = [(o.metrics.finished_time - o.metrics.first_token_time) * 1e3
             / (len(o.outputs[0].token_ids) - 1) for o in outputs
             if len(o.outputs[0].token_ids) > 1]
    result = _result(spec, flags=flags, max_model_len=flags["max_model_len"], via="llm",
                     wall=wall, ttfts=ttfts, tpots_ms=tpots,
                     prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
                     output_tokens=sum(len(o.outputs[0].token_ids) for o in outputs))
    print(f"{spec.name} (llm): {result['output_tok_per_s']:.0f} output tok/s, "
          f"{result['total_tok_per_s']:.0f} total tok/s, TPOT median "
          f"{result['tpot_ms_median']} ms, wall {result['wall_s']:.2f} s", flush=True)
    return result
