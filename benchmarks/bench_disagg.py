"""Prefill-decode disaggregation on one GPU: two `cpserve serve` instances share it
(`--gpu-memory-utilization 0.4` each) with `cpserve proxy` in front; the Llama-3.1-8B shape,
random bf16 weights (`--load-format dummy`) and serving_model.py's tokenizer, prompts as
token ids.

    python benchmarks/bench_disagg.py --out DIR                # one H200, about 5 minutes
    python benchmarks/bench_disagg.py --out DIR --smoke        # tiny model on CPU: the logic
    python benchmarks/bench_disagg.py --out DIR --budget-s 150 # bounded (gpu_session.sh pd)

Phases, in the order issue 14's targets need them; `--budget-s` (default 420 s on a GPU)
bounds the whole run, start-up included: a phase that would start with less time left than
it needs is skipped and recorded in "skipped" with the reason, and the JSON is written
after every phase:
    transfer-ipc   the KV of a 32k-token prompt (4.3 GB) from the prefill to the decode
                   instance over the device path (CUDA IPC), as the decode instance times it
                   (admission to the last block: cpserve:kv_transfer_load_seconds)
    ttft           time to first token of a 32k prompt: the prefill instance alone
                   (colocated) against through the proxy (prefill, transfer, decode)
    itl            ITL p99 of 8 streams decoding 256 tokens each (1k prompts) on the decode
                   instance: alone, and while 32k prompts go through the proxy back to back;
                   then the same load on one instance (colocated: mixed steps); and while
                   the prefill instance computes 32k prompts that are not transferred (the
                   cost of two processes sharing one GPU, apart from the transfers)
    transfer-tcp   the 32k transfer again, a decode instance with kv_transport "tcp"

Writes DIR/<date>-<device>-disagg.json with every figure, the targets of issue 14 and
whether each is met; DIR/*.log hold the servers' output.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving_model import LLAMA_31_8B, TINY, write_model_dir  # noqa: E402

GPU = dict(long=32768, short=1024, streams=8, stream_tokens=256, max_len=40000,
           startup_s=200, budget_s=420)
SMOKE = dict(long=600, short=64, streams=2, stream_tokens=12, max_len=1024, startup_s=240,
             budget_s=600)
TARGETS = {"transfer_ipc_s": 0.5, "ttft_ratio": 1.15, "itl_p99_ratio": 1.2}
# Seconds a phase needs at least to be worth starting, on a GPU (the smoke run: 1 s each).
NEEDS_S = {"transfer-ipc": 15, "ttft": 20, "itl": 45, "itl-prefill-busy": 15,
           "transfer-tcp": 90}


class Server:
    def __init__(self, name: str, argv: list[str], out: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log = open(out / f"{name}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "cpserve.entrypoints.cli", *argv,
                                      "--port", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)

    def wait(self, deadline: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            try:
                if _get(self.url, "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start in time")
            time.sleep(0.5)

    def stats(self) -> dict:
        return json.loads(_get(self.url, "/kv_transfer/status")[1])["stats"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# HTTP without dependencies --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://{url}{path}", timeout=30) as r:
        return r.status, r.read()


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(f"http://{url}/v1/completions", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read())


def _stream(url: str, body: dict, timeout: float = 600) -> list[tuple[float, int]]:
    """(arrival time, tokens) of each streamed chunk that carries tokens."""
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                 {"content-type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{url}: HTTP {response.status}: {response.read()[:500]!r}")
    chunks = []
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        data = json.loads(line[6:])
        if "error" in data:
            raise RuntimeError(f"{url}: {data['error']}")
        logprobs = (data["choices"][0].get("logprobs") or {}) if data["choices"] else {}
        tokens = len(logprobs.get("tokens") or [])
        if tokens:
            chunks.append((time.perf_counter(), tokens))
    conn.close()
    return chunks


# Model -------------------------------------------------------------------------------------------
def model_dir(smoke: bool, max_len: int) -> str:
    """config.json and a tokenizer of exactly the model's vocabulary (serving_model.py)."""
    path = Path(tempfile.mkdtemp(prefix="cpserve-bench-disagg-"))
    return str(write_model_dir(path, TINY if smoke else LLAMA_31_8B, max_len))


def prompt(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab - 10) for _ in range(n)]


# Phases --------------------------------------------------------------------------------------
def transfer(prefill: Server, decode: Server, shape: dict, vocab: int, seed: int,
             reps: int) -> dict:
    times, moved = [], []
    for rep in range(reps):
        tokens = prompt(shape["long"], vocab, seed + rep)
        params = _post(prefill.url, {"prompt": tokens, "max_tokens": 1, "kv_transfer_params":
                                     {"do_remote_decode": True}})["kv_transfer_params"]
        before = decode.stats()
        started = time.perf_counter()
        _post(decode.url, {"prompt": tokens, "max_tokens": 1, "kv_transfer_params": params})
        e2e = time.perf_counter() - started
        after = decode.stats()
        times.append(after["load_seconds_sum"] - before["load_seconds_sum"])
        moved.append({"bytes": after["bytes_received_total"] - before["bytes_received_total"],
                      "ipc_bytes": after["bytes_received_ipc_total"]
                      - before["bytes_received_ipc_total"], "decode_request_s": e2e})
        print(f"  transfer {rep}: {times[-1]:.3f} s, {moved[-1]}", flush=True)
    return {"load_s": times, "best_s": min(times), "detail": moved,
            "gb_per_s": moved[0]["bytes"] / min(times) / 1e9 if min(times) > 0 else None}


def ttft(url: str, tokens: list[int]) -> float:
    started = time.perf_counter()
    chunks = _stream(url, {"prompt": tokens, "max_tokens": 2, "logprobs": 0,
                           "ignore_eos": True})
    return chunks[0][0] - started


def decode_load(url: str, shape: dict, vocab: int, seed: int,
                background: tuple[str, int] | None) -> dict:
    """ITL of `streams` concurrent decodes at `url`; with `background` (url, vocab), 32k
    prompts go there back to back meanwhile."""
    gaps: list[float] = []
    errors: list[str] = []
    first_stream: list[float] = []  # its chunks' arrival, ms after the first (a sample)
    stop = threading.Event()
    long_done = [0]

    def one(i: int) -> None:
        try:
            chunks = _stream(url, {"prompt": prompt(shape["short"], vocab, seed + i),
                                   "max_tokens": shape["stream_tokens"], "logprobs": 0,
                                   "ignore_eos": True})
            for (t0, _), (t1, n) in zip(chunks, chunks[1:]):
                gaps.extend([(t1 - t0) / n] * n)
            if i == 0:
                first_stream.extend(round((t - chunks[0][0]) * 1e3, 1) for t, _ in chunks)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    def prefills() -> None:
        k = 0
        while not stop.is_set():
            try:
                _post(background[0], {"prompt": prompt(shape["long"], vocab, seed + 1000 + k),
                                      "max_tokens": 2, "ignore_eos": True})
                long_done[0] += 1
            except Exception as exc:
                errors.append(f"background: {type(exc).__name__}: {exc}")
                return
            k += 1

    side = threading.Thread(target=prefills, daemon=True) if background else None
    if side is not None:
        side.start()
        time.sleep(0.5)  # the first long prompt is under way
    threads = [threading.Thread(target=one, args=(i,)) for i in range(shape["streams"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    if side is not None:
        side.join(120)
    gaps.sort()
    p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else None
    return {"itl_p99_s": p99, "itl_median_s": statistics.median(gaps) if gaps else None,
            "tokens": len(gaps), "long_prompts_done": long_done[0], "errors": errors[:5],
            "first_stream_ms": first_stream[:64]}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole run (default 420 on a GPU, 600 smoke)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    shape = SMOKE if args.smoke else GPU
    budget_s = args.budget_s if args.budget_s is not None else shape["budget_s"]
    begun = time.monotonic()

    def left() -> float:
        return budget_s - (time.monotonic() - begun)

    import torch

    device = "cpu" if args.smoke else torch.cuda.get_device_name(0)
    vocab = (TINY if args.smoke else LLAMA_31_8B)["vocab_size"]
    path = model_dir(args.smoke, shape["max_len"])
    common = ["serve", path, "--served-model-name", "m", "--max-model-len", str(shape["max_len"]),
              "--max-num-seqs", "16", "--block-size", "16", "--load-format", "dummy"]
    if not args.smoke:
        common += ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.4",
                   "--cudagraph-capture-sizes", "1", "2", "4", "8", "16"]

    def kv(role: str, transport: str = "auto") -> list[str]:
        return ["--kv-transfer-config", json.dumps({
            "kv_connector": "CpserveConnector", "kv_role": role, "kv_port": 0,
            "kv_connector_extra_config": {"kv_transport": transport}})]

    result: dict = {"device": device, "date": datetime.date.today().isoformat(),
                    "torch": torch.__version__, "shape": "tiny" if args.smoke else "llama-3.1-8b",
                    "prompt_tokens": shape["long"], "targets": TARGETS, "budget_s": budget_s,
                    "skipped": []}
    out_file = args.out / f"{result['date']}-{device.replace(' ', '-')}-disagg.json"

    def save() -> None:
        result["verdict"] = verdict(result)
        result["wall_s"] = time.monotonic() - begun
        out_file.write_text(json.dumps(result, indent=2))

    def may_start(phase: str) -> bool:
        needs = 1 if args.smoke else NEEDS_S[phase]
        if left() >= needs:
            return True
        result["skipped"].append({"phase": phase, "reason": f"{max(left(), 0):.0f} s left of "
                                  f"--budget-s {budget_s:g}, needs ~{needs} s"})
        print(f"  {phase}: skipped ({result['skipped'][-1]['reason']})", flush=True)
        save()
        return False

    servers: list[Server] = []
    try:
        prefill = Server("prefill", common + kv("kv_producer"), args.out)
        decode = Server("decode", common + kv("kv_consumer"), args.out)
        servers += [prefill, decode]
        deadline = time.monotonic() + min(shape["startup_s"], max(left(), 1))
        prefill.wait(deadline)
        decode.wait(deadline)
        proxy = Server("proxy", ["proxy", "--prefill", f"http://{prefill.url}",
                                 "--decode", f"http://{decode.url}"], args.out)
        servers.append(proxy)
        proxy.wait(time.monotonic() + 60)
        result["startup_s"] = time.monotonic() - begun
        print(f"started in {result['startup_s']:.0f} s", flush=True)
        save()
        warm = prompt(shape["long"], vocab, 1)
        _post(prefill.url, {"prompt": warm, "max_tokens": 2})  # kernels, plans, allocator
        _stream(proxy.url, {"prompt": warm[:shape["short"]], "max_tokens": 4, "logprobs": 0})
        if may_start("transfer-ipc"):
            result["transfer_ipc"] = transfer(prefill, decode, shape, vocab, 100, reps=3)
            save()
        if may_start("ttft"):
            result["ttft"] = {
                "colocated_s": [ttft(prefill.url, prompt(shape["long"], vocab, 200 + i))
                                for i in range(2)],
                "through_proxy_s": [ttft(proxy.url, prompt(shape["long"], vocab, 300 + i))
                                    for i in range(2)]}
            t = result["ttft"]
            t["ratio"] = min(t["through_proxy_s"]) / min(t["colocated_s"])
            print(f"  ttft: {t}", flush=True)
            save()
        if may_start("itl"):
            itl = {"decode_alone": decode_load(proxy.url, shape, vocab, 400, None),
                   # The 32k prompts through the proxy: the decode instance pulls their KV.
                   "disaggregated": decode_load(proxy.url, shape, vocab, 500,
                                                (proxy.url, vocab)),
                   "colocated": decode_load(prefill.url, shape, vocab, 600,
                                            (prefill.url, vocab))}
            alone = itl["decode_alone"]["itl_p99_s"]
            itl["ratio"] = (itl["disaggregated"]["itl_p99_s"] / alone) if alone else None
            result["itl"] = itl
            print(f"  itl: {json.dumps(itl)}", flush=True)
            save()
            if may_start("itl-prefill-busy"):  # the prefill instance busy alone: GPU sharing
                itl["prefill_busy_no_transfer"] = decode_load(proxy.url, shape, vocab, 800,
                                                              (prefill.url, vocab))
                save()
        if may_start("transfer-tcp"):
            decode.stop()
            tcp = Server("decode-tcp", common + kv("kv_consumer", "tcp"), args.out)
            servers.append(tcp)
            tcp.wait(time.monotonic() + min(max(left(), 1), shape["startup_s"]))
            result["transfer_tcp"] = transfer(prefill, tcp, shape, vocab, 700, reps=2)
            save()
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        print(f"error: {result['error']}", flush=True)
    finally:
        for server in reversed(servers):
            server.stop()
    save()
    print(json.dumps(result["verdict"], indent=2))
    print(f"wrote {out_file}")
    return out_file


def verdict(result: dict) -> dict:
    out = {}
    if "transfer_ipc" in result:
        ipc = result["transfer_ipc"]
        used_ipc = all(d["ipc_bytes"] == d["bytes"] > 0 for d in ipc["detail"])
        out["transfer_ipc_s"] = {"measured": ipc["best_s"], "device_path_used": used_ipc,
                                 "met": used_ipc and ipc["best_s"] <= TARGETS["transfer_ipc_s"]}
    if "ttft" in result:
        out["ttft_ratio"] = {"measured": result["ttft"]["ratio"],
                             "met": result["ttft"]["ratio"] <= TARGETS["ttft_ratio"]}
    if result.get("itl", {}).get("ratio") is not None:
        itl = result["itl"]
        out["itl_p99_ratio"] = {"measured": itl["ratio"],
                                "met": itl["ratio"] <= TARGETS["itl_p99_ratio"],
                                "colocated_p99_s": itl["colocated"]["itl_p99_s"]}
    if "transfer_tcp" in result:
        out["transfer_tcp_s"] = {"measured": result["transfer_tcp"]["best_s"]}
    return out


if __name__ == "__main__":
    main()
