"""Where the server's host time goes under streaming load, on CPU (py-spy) or any device.

Starts `cpserve serve` (same interpreter, same environment) on a loopback port, drives
`--concurrency` streams of `--output-len` tokens at once with `cpserve bench serve`'s client,
samples every cpserve process with py-spy while the load runs, and writes to OUT:

    profile.json        the client's figures (throughput, TPOT, chunks per stream) and, per
                        process and thread, the share of samples and the top functions
    <role>-<pid>.txt    py-spy's folded stacks of each process (flame-graph input)

    python benchmarks/profile_host.py --out /tmp/prof                       # tiny, 64 x 128
    python benchmarks/profile_host.py --out /tmp/prof --no-py-spy --model /ckpt --device cuda

Chunks per stream count the SSE events that carried text: with one event per engine step that
gives a request text, a stream of N tokens gets close to N (fewer when bytes of one character
or a held-back stop string span tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpserve.bench.datasets import sample_random_requests  # noqa: E402
from cpserve.bench.serve import run_benchmark  # noqa: E402

TOP_FUNCTIONS = 25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cpserve.entrypoints.cli", "serve", args.model, "--port",
           str(port), "--max-num-seqs", str(max(args.concurrency, 1)), "--uvicorn-log-level",
           "warning", *args.engine_flag]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} at start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not come up")
        time.sleep(0.2)


def process_tree(root: int) -> list[int]:
    """`root` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children[ppid].append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def role(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = b" ".join(cmdline).decode(errors="replace")
    if "core_process" in text:
        return "engine-core"
    if "local_ranks" in text:
        return "rank"
    if "serve" in text:
        return "api"
    return "other"


def summarize(folded: Path, seconds: float, rate: int) -> dict:
    """Per thread: the share of the wall time it was busy (py-spy samples only running
    threads) and its hottest functions, by self time and by total time."""
    per_thread: dict[str, dict[str, collections.Counter]] = collections.defaultdict(
        lambda: {"self": collections.Counter(), "total": collections.Counter()})
    busy: collections.Counter = collections.Counter()
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = _thread_name(frames[0])
        busy[thread] += n
        funcs = [_frame(f) for f in frames[1:]] or ["(no frame)"]
        per_thread[thread]["self"][funcs[-1]] += n
        for func in set(funcs):
            per_thread[thread]["total"][func] += n
    possible = max(1.0, seconds * rate)
    return {thread: {
        "busy_share_of_wall": round(n / possible, 3),
        "self": [(f, round(k / n, 3)) for f, k in per_thread[thread]["self"].most_common(
            TOP_FUNCTIONS)],
        "total": [(f, round(k / n, 3)) for f, k in per_thread[thread]["total"].most_common(
            TOP_FUNCTIONS)],
    } for thread, n in busy.most_common()}


def _thread_name(frame: str) -> str:
    # py-spy --threads writes "thread (TID): NAME" first.
    return frame.rsplit(": ", 1)[-1] if frame.startswith("thread") else frame


def _frame(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(path).parts[-2:])})" if path else name


async def drive(url: str, args: argparse.Namespace) -> dict:
    requests = sample_random_requests(args.num_prompts, args.input_len, args.output_len,
                                      vocab_size=args.vocab_size, seed=1)
    result = await run_benchmark(base_url=url, model=args.served_model, requests=requests,
                                 max_concurrency=args.concurrency, ignore_eos=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=None, help="default: 2 x concurrency")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--py-spy", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--engine-flag", action="append", default=[],
                        help="extra `cpserve serve` flag, repeatable: --engine-flag=--device=cpu")
    args = parser.parse_args(argv)
    args.num_prompts = args.num_prompts or 2 * args.concurrency
    args.served_model = args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if args.py_spy and spy is None:
        parser.error("py-spy is not installed (pip install py-spy), or pass --no-py-spy")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(out / "server.log", "w") as log:
        server = start_server(args, port, log)
        try:
            asyncio.run(drive(url, argparse.Namespace(**{**vars(args), "num_prompts": 8})))
            spies = []
            if args.py_spy:
                for pid in process_tree(server.pid):
                    name = role(pid)
                    if name in ("api", "engine-core"):
                        spies.append((name, pid, subprocess.Popen(
                            [spy, "record", "--pid", str(pid), "--rate", str(args.rate),
                             "--format", "raw", "--threads", "--nonblocking", "--output",
                             str(out / f"{name}-{pid}.txt")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)))
                time.sleep(1.0)  # py-spy attaches
            started = time.perf_counter()
            result = asyncio.run(drive(url, args))
            wall = time.perf_counter() - started
            for _, _, proc in spies:
                proc.send_signal(signal.SIGINT)
            for _, _, proc in spies:
                proc.wait(timeout=60)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    chunks = sorted(len(itl) + 1 for itl, n in zip(result["itls"], result["output_lens"]) if n)
    report = {
        "concurrency": args.concurrency, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len, "wall_s": wall,
        "output_throughput": result["output_throughput"],
        "median_tpot_ms": result["median_tpot_ms"], "median_ttft_ms": result["median_ttft_ms"],
        "chunks_per_stream": {"min": chunks[0], "median": chunks[len(chunks) // 2],
                              "max": chunks[-1]} if chunks else None,
        "processes": {f"{name}-{pid}": summarize(out / f"{name}-{pid}.txt", wall, args.rate)
                      for name, pid, _ in spies if (out / f"{name}-{pid}.txt").exists()},
    }
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "processes"}, indent=1))
    for name, threads in report["processes"].items():
        for thread, summary in threads.items():
            print(f"== {name} thread {thread}: busy {summary['busy_share_of_wall']:.1%} of "
                  f"the wall time; its time by function (self):")
            for func, share in summary["self"][:10]:
                print(f"   {share:6.1%}  {func}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
