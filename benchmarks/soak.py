"""Soak test of the OpenAI-compatible server, on loopback only, bounded in time and count.

A real server (uvicorn, the demo model `tiny`, a KV cache small enough to preempt) gets a
mix of traffic from concurrent clients for `--duration` seconds (at most `--max-requests`):

    greedy      completions and chat, streamed or not; each must equal the reference run
    sampled     seeded, n=2; must succeed
    hang-ups    a stream closed after a few chunks; a long request whose client times out
    refusals    a body over the size limit (413), a prompt over max_model_len, more prompts
                than the queue holds, an unsupported field (400)

The reference run sends each greedy request alone, before the soak. Under load a request
batches with others, and fp32 GEMMs over other batch shapes may round differently: a
greedy token may then flip where the reference's top two logprobs are within TIE_TOL. That
is counted as a near tie, never as a match; any other difference is a failure.

At the end, once idle: no KV block in use and the pool's `check_integrity()` passes, and
resident memory (this process and the engine process) grew less than 5% from the end of warm-up.

    python benchmarks/soak.py --duration 600 --out /tmp/soak     # the 10-minute run
Exit code 0 if every check holds; the figures go to OUT/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import gc
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpserve.engine.args import EngineArgs  # noqa: E402
from cpserve.engine.async_engine import AsyncEngine  # noqa: E402
from cpserve.entrypoints.openai.api_server import ServerThread, build_app  # noqa: E402

ENGINE = EngineArgs(model="tiny", max_model_len=256, num_kv_blocks=40, max_num_seqs=8,
                    max_waiting_requests=64)
BODY_LIMIT = 64 * 1024
TIE_TOL = 1e-4  # logprob gap under which fp32 rounding may swap the top two tokens
MAX_RSS_GROWTH = 0.05
# What a client does, and how often (weights).
KINDS = {"greedy": 50, "sampled": 10, "hangup_stream": 10, "hangup_wait": 6,
         "oversize_body": 6, "long_prompt": 6, "too_many_prompts": 6, "unsupported_field": 6}
WORDS = ("the morning train left the station while a language model read every page of "
         "the old library and counted stars over quiet water").split()


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes (the API process and the engine process)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def greedy_specs(rng: random.Random) -> list[tuple[str, str, int]]:
    """(endpoint, prompt, max_tokens) of the requests checked against the reference."""
    specs = []
    for i in range(16):
        prompt = f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 50)))
        specs.append(("completions" if i % 2 else "chat", prompt, rng.randint(4, 64)))
    return specs


def body(endpoint: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    common = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0,
              "ignore_eos": True, "stream": stream}
    if endpoint == "completions":
        return {**common, "prompt": prompt, "logprobs": 2}
    return {**common, "messages": [{"role": "user", "content": prompt}], "logprobs": True,
            "top_logprobs": 2}


def tokens_of(endpoint: str, choices: list[dict]) -> list[tuple[str, list[float]]]:
    """(token text, its position's top logprobs) from a response's choices or chunks."""
    out = []
    for choice in choices:
        lp = choice.get("logprobs")
        if not lp:
            continue
        if endpoint == "completions":
            for token, top in zip(lp["tokens"], lp["top_logprobs"]):
                out.append((token, sorted(top.values(), reverse=True)))
        else:
            for entry in lp["content"]:
                out.append((entry["token"], [t["logprob"] for t in entry["top_logprobs"]]))
    return out


async def greedy(http: httpx.AsyncClient, endpoint: str, prompt: str, max_tokens: int,
                 stream: bool) -> tuple[int, list]:
    path = f"/v1/{'completions' if endpoint == 'completions' else 'chat/completions'}"
    data = body(endpoint, prompt, max_tokens, stream)
    if not stream:
        r = await http.post(path, json=data)
        return r.status_code, tokens_of(endpoint, r.json().get("choices", [])) if r.is_success else []
    choices = []
    async with http.stream("POST", path, json=data) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    return 500, []
                choices += event["choices"]
        return r.status_code, tokens_of(endpoint, choices)


def compare(got: list, want: list) -> str:
    """'match', 'near_tie' (diverged where the reference's top two were within TIE_TOL) or
    'mismatch'."""
    for g, w in zip(got, want):
        if g[0] != w[0]:
            top = w[1]
            return "near_tie" if len(top) > 1 and top[0] - top[1] < TIE_TOL else "mismatch"
    return "match" if len(got) == len(want) else "mismatch"


class Soak:
    def __init__(self, url: str, specs: list, reference: dict, seed: int) -> None:
        self.url, self.specs, self.reference = url, specs, reference
        self.rng = random.Random(seed)
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(what)
        self.counts["failure"] += 1

    async def one(self, http: httpx.AsyncClient) -> None:
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        self.counts[kind] += 1
        if kind == "greedy":
            spec = self.rng.choice(self.specs)
            stream = self.rng.random() < 0.5
            status, got = await greedy(http, *spec, stream)
            if status != 200:
                return self.fail(f"greedy {spec[0]} stream={stream}: status {status}")
            verdict = compare(got, self.reference[spec])
            self.counts[verdict] += 1
            if verdict == "mismatch":
                self.fail(f"greedy {spec[0]} stream={stream} differs from the reference")
        elif kind == "sampled":
            r = await http.post("/v1/completions", json={
                "model": "tiny", "prompt": self.rng.choice(self.specs)[1], "n": 2,
                "max_tokens": self.rng.randint(1, 32), "seed": self.rng.randint(0, 2**63),
                "temperature": 0.8, "top_p": 0.9})
            if r.status_code != 200 or len(r.json()["choices"]) != 2:
                self.fail(f"sampled: status {r.status_code}")
        elif kind == "hangup_stream":
            data = body("completions", self.rng.choice(self.specs)[1], 200, True)
            async with http.stream("POST", "/v1/completions", json=data) as r:
                lines = r.aiter_lines()
                for _ in range(self.rng.randint(1, 4)):
                    await anext(lines, None)
        elif kind == "hangup_wait":
            data = body("chat", self.rng.choice(self.specs)[1], 200, False)
            try:
                await http.post("/v1/chat/completions", json=data,
                                timeout=self.rng.uniform(0.01, 0.3))
            except httpx.TimeoutException:
                pass
        else:
            await self.refused(http, kind)

    async def refused(self, http: httpx.AsyncClient, kind: str) -> None:
        expected, data = 400, {"model": "tiny", "max_tokens": 4}
        if kind == "oversize_body":
            expected, data["prompt"] = 413, "x" * (BODY_LIMIT + 1)
        elif kind == "long_prompt":
            data["prompt"] = [7] * (ENGINE.max_model_len + self.rng.randint(0, 100))
        elif kind == "too_many_prompts":
            data["prompt"] = ["hi"] * (ENGINE.max_waiting_requests + 1)
        else:
            data.update(prompt="hi", guided_json={"type": "object"})
        r = await http.post("/v1/completions", json=data)
        if r.status_code != expected:
            self.fail(f"{kind}: status {r.status_code}, expected {expected}")

    async def run(self, duration_s: float, max_requests: int, concurrency: int) -> None:
        deadline = time.monotonic() + duration_s
        started = 0

        async def worker() -> None:
            nonlocal started
            async with httpx.AsyncClient(base_url=self.url, timeout=60) as http:
                while time.monotonic() < deadline and started < max_requests:
                    started += 1
                    try:
                        await self.one(http)
                    except Exception as exc:  # noqa: BLE001 - any client-side surprise fails
                        self.fail(f"client error: {exc!r}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def reference_run(url: str, specs: list) -> dict:
    reference = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        for spec in specs:
            status, tokens = await greedy(http, *spec, False)
            assert status == 200 and len(tokens) == spec[2], (spec, status)
            reference[spec] = tokens
    return reference


async def wait_idle(engine: AsyncEngine, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine did not go idle: {s}")
        await asyncio.sleep(0.05)


async def main_async(args) -> dict:
    engine = AsyncEngine.from_engine_args(ENGINE)
    app = build_app(engine, served_model_names=["tiny"], max_request_body_bytes=BODY_LIMIT)
    engine.start()
    thread = ServerThread(app, host="127.0.0.1").start()
    processes = [os.getpid(), engine.engine_pid]
    started = time.time()
    try:
        specs = greedy_specs(random.Random(args.seed))
        reference = await reference_run(thread.url, specs)
        soak = Soak(thread.url, specs, reference, args.seed)
        await soak.run(args.warmup, args.max_requests, args.concurrency)
        await wait_idle(engine)
        gc.collect()
        rss_warm = rss_bytes(processes)
        await soak.run(args.duration - args.warmup, args.max_requests, args.concurrency)
        await wait_idle(engine)
        gc.collect()
        rss_end = rss_bytes(processes)
        await engine.check_integrity()  # raises on a leak or double free
        stats = engine.stats()
        growth = (rss_end - rss_warm) / rss_warm
        if stats.kv_cache_usage != 0:
            soak.fail(f"KV blocks still in use when idle: {stats.kv_cache_usage:.1%}")
        if growth >= MAX_RSS_GROWTH:
            soak.fail(f"resident memory grew {growth:.1%} after warm-up")
        return {
            "date": datetime.date.today().isoformat(), "host": platform.node(),
            "cpus": os.cpu_count(), "duration_s": round(time.time() - started, 1),
            "requests": sum(soak.counts[kind] for kind in KINDS),
            "counts": dict(soak.counts), "failures": soak.failures,
            "rss_warm_mib": round(rss_warm / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
            "rss_growth": round(growth, 4), "kv_blocks_in_use": round(stats.kv_cache_usage, 4),
            "generation_tokens": stats.generation_tokens_total,
            "preemptions": stats.num_preemptions_total, "integrity": "ok",
        }
    finally:
        thread.stop()
        engine.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before memory is measured (default: a sixth)")
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for soak.json")
    args = parser.parse_args()
    args.warmup = args.duration / 6 if args.warmup is None else args.warmup
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "soak.json").write_text(text + "\n")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
