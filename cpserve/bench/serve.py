"""`cpserve bench serve`: a load generator for any OpenAI-compatible streaming server.

It talks to the server only through the public HTTP API (`/v1/models`, `/v1/completions`,
`/v1/chat/completions`), so the same command measures cpserve and vLLM. Flags, the printed table
and the JSON keys follow `vllm bench serve`, so results sit side by side.

This module holds the client (SSE parsing, one streamed request timed chunk by chunk), the run
loop that sends the requests on their schedule, and the command line. The workload is made in
`cpserve.bench.datasets`; the metrics, the table, the JSON and the plot in
`cpserve.bench.metrics`, whose docstring draws what TTFT, ITL, TPOT and E2EL measure.

A request waiting for `--max-concurrency` is not yet sent: its clock starts when it goes out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from cpserve.bench.datasets import (
    DEFAULT_RANDOM_VOCAB_SIZE,
    MIN_RANDOM_TOKEN_ID,
    SampleRequest,
    arrival_intervals,
    sample_random_requests,
)
from cpserve.bench.metrics import (
    RequestOutput,
    calculate_metrics,
    format_result,
    result_json,
    save_plot,
)

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DEFAULT_REQUEST_TIMEOUT_S = 6 * 3600


# ---------------------------------------------------------------------------------------------
# Wire: server-sent events and one streamed request


class SSEDecoder:
    """Incremental server-sent-events parser: bytes in, the `data` of each complete event out.

    A network read can end anywhere, even inside a UTF-8 character, so the partial last line is
    kept until its newline arrives. As the SSE spec says, an event ends at a blank line, its
    `data:` lines are joined by "\\n", lines starting with ":" are comments (keep-alives), and
    other fields (`event:`, `id:`) are ignored.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        return [event for line in lines if (event := self._line(line)) is not None]

    def close(self) -> list[str]:
        """Events left when the stream ends, for servers that skip the final blank line."""
        events = self.feed(b"\n") if self._pending else []
        last = self._line(b"")
        return events + ([last] if last is not None else [])

    def _line(self, raw: bytes) -> str | None:
        line = raw.rstrip(b"\r").decode("utf-8")
        if not line:
            event = "\n".join(self._data) if self._data else None
            self._data = []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


def token_text(event: dict[str, Any], chat: bool) -> str | None:
    """Text of the generated token(s) in one stream chunk, or None if it carries no token.

    A completions chunk with empty text still marks a token unless it only closes the stream
    (`finish_reason` set): the detokenizer holds back bytes of an unfinished UTF-8 character and
    drops special tokens. A chat chunk must carry content: the first chunk of a chat stream may
    hold only the role, and a server is free to send it before the prompt is even scheduled.
    """
    choices = event.get("choices")
    if not choices:
        return None
    choice = choices[0]
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        return text or None
    text = choice.get("text")
    if text is None or (text == "" and choice.get("finish_reason") is not None):
        return None
    return text


def build_payload(request: SampleRequest, model: str, chat: bool, ignore_eos: bool = False,
                  temperature: float | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        payload["messages"] = [{"role": "user", "content": request.prompt}]
        payload["max_completion_tokens"] = request.max_tokens
    else:
        payload["prompt"] = request.prompt
        payload["max_tokens"] = request.max_tokens
    if ignore_eos:
        payload["ignore_eos"] = True
    if temperature is not None:
        payload["temperature"] = temperature
    return payload


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[float, str]]:
    """(arrival time, data) of each event; events of one network read share its arrival time."""
    decoder = SSEDecoder()
    async for chunk in response.content.iter_any():
        now = time.perf_counter()
        for data in decoder.feed(chunk):
            yield now, data
    now = time.perf_counter()
    for data in decoder.close():
        yield now, data


def _error_message(event: dict[str, Any]) -> str:
    error = event.get("error", event)
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


async def send_request(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                       body: bytes, chat: bool, prompt_len: int) -> RequestOutput:
    """Stream one request (`body`: its JSON payload, encoded) and time its token chunks.

    Failures are recorded in the output, never raised."""
    out = RequestOutput(prompt_len=prompt_len)
    texts: list[str] = []
    completion_tokens: int | None = None
    start = last = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                out.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return out
            async for now, data in _sse_events(response):
                if data.strip() == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event or event.get("object") == "error":
                    out.error = _error_message(event)
                    return out
                if usage := event.get("usage"):
                    out.prompt_len = usage.get("prompt_tokens") or out.prompt_len
                    completion_tokens = usage.get("completion_tokens", completion_tokens)
                text = token_text(event, chat)
                if text is None:
                    continue
                if texts:
                    out.itl.append(now - last)
                else:
                    out.ttft = now - start
                last = now
                texts.append(text)
    except Exception as e:  # a load generator records what went wrong and keeps going
        out.error = f"{type(e).__name__}: {e}"
        return out
    if not texts:
        out.error = "the stream ended without a generated token"
        return out
    out.success = True
    out.latency = last - start
    out.output_tokens = completion_tokens if completion_tokens is not None else len(texts)
    out.generated_text = "".join(texts)
    return out


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def fetch_model_id(base_url: str, api_key: str | None = None, timeout_s: float = 60) -> str:
    """The first model id of GET /v1/models, as vLLM's benchmark picks a default model."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{base_url}/v1/models", headers=_headers(api_key)) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {base_url}/v1/models answered HTTP {response.status}: "
                                   f"{(await response.text())[:500]}")
            models = (await response.json()).get("data") or []
    if not models:
        raise RuntimeError(f"GET {base_url}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


# ---------------------------------------------------------------------------------------------
# The run


async def run_benchmark(*, base_url: str, model: str, requests: Sequence[SampleRequest],
                        endpoint: str = "completions", request_rate: float = math.inf,
                        burstiness: float = 1.0, max_concurrency: int | None = None,
                        ignore_eos: bool = False, temperature: float | None = None,
                        api_key: str | None = None, seed: int = 0, disable_tqdm: bool = True,
                        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                        percentiles: Sequence[float] = (99,)) -> dict[str, Any]:
    """Send `requests` on their arrival schedule and return vLLM-style metrics."""
    chat = endpoint == "chat"
    url = base_url + ENDPOINTS[endpoint]
    headers = _headers(api_key)
    gaps = arrival_intervals(len(requests), request_rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    # No connection cap in aiohttp (its default is 100): the only bound is --max-concurrency.
    connector = aiohttp.TCPConnector(limit=0)
    # Encoded before the clock starts: serialising a long prompt inside the run would stall the
    # event loop and show up as latency of the requests already streaming.
    bodies = [json.dumps(build_payload(r, model, chat, ignore_eos, temperature)).encode()
              for r in requests]
    progress = tqdm(total=len(requests), disable=disable_tqdm)

    async def one(body: bytes, prompt_len: int) -> RequestOutput:
        if limit is None:
            out = await send_request(session, url, headers, body, chat, prompt_len)
        else:
            async with limit:
                out = await send_request(session, url, headers, body, chat, prompt_len)
        progress.update(1)
        return out

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        send_at = start
        tasks = []
        for request, body, gap in zip(requests, bodies, gaps):
            # Absolute send times, so time spent creating tasks does not stretch the schedule.
            send_at += float(gap)
            if (delay := send_at - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body, request.prompt_len)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    progress.close()
    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        "model": model,
        "model_id": model,
        "endpoint": ENDPOINTS[endpoint],
        "base_url": base_url,
        "num_prompts": len(requests),
        "request_rate": request_rate,
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
    }
    result.update(calculate_metrics(outputs, duration, percentiles))
    return result


# ---------------------------------------------------------------------------------------------
# Command line


def _endpoint(value: str) -> str:
    """`completions`, `chat`, or the path as vLLM takes it (`/v1/chat/completions`)."""
    if value in ENDPOINTS:
        return value
    for name, path in ENDPOINTS.items():
        if value.rstrip("/") in (path, path.removeprefix("/v1")):
            return name
    raise argparse.ArgumentTypeError(f"unknown endpoint {value!r}: use completions, chat, "
                                     f"{ENDPOINTS['completions']} or {ENDPOINTS['chat']}")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `vllm bench serve` that this benchmark implements, with vLLM's names."""
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (a trailing "
                   "/v1 is accepted); overrides --host/--port")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", type=_endpoint, default=None,
                   help="completions (/v1/completions, the default) or chat "
                        "(/v1/chat/completions)")
    g.add_argument("--backend", default="openai", choices=["openai", "vllm", "openai-chat"],
                   help="for vLLM command lines; openai-chat means --endpoint chat")
    g.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    g.add_argument("--api-key", default=None, help="sent as a Bearer token; default: "
                   "$OPENAI_API_KEY")
    g.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                   help="seconds one request may take in all")

    g = parser.add_argument_group("workload")
    g.add_argument("--dataset-name", default="random", choices=["random"])
    g.add_argument("--num-prompts", type=int, default=1000)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    g.add_argument("--random-prefix-len", type=int, default=0,
                   help="tokens of one shared prefix put before every random prompt")
    g.add_argument("--random-vocab-size", type=int, default=DEFAULT_RANDOM_VOCAB_SIZE,
                   help="without a tokenizer, token ids are drawn from "
                        f"[{MIN_RANDOM_TOKEN_ID}, this)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer path or name, to send text of exact token lengths; default: "
                        "the model id when it is a local directory")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals; inf sends all at once")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps; 1 is Poisson")
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)

    g = parser.add_argument_group("output")
    g.add_argument("--metric-percentiles", default="99",
                   help="comma-separated percentiles to report, e.g. 50,90,99")
    g.add_argument("--save-result", action="store_true")
    g.add_argument("--result-dir", default=".")
    g.add_argument("--result-filename", default=None)
    g.add_argument("--plot", action="store_true",
                   help="save TTFT and ITL histograms as a PNG next to the JSON")
    g.add_argument("--disable-tqdm", action="store_true")


def _base_url(args: argparse.Namespace) -> str:
    url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    return url.removesuffix("/v1")


def _load_tokenizer(name: str | None, model: str) -> Any:
    if name is None:
        local = Path(model)
        if not (local / "tokenizer.json").is_file() and not (
                local / "tokenizer_config.json").is_file():
            return None
        name = model
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _result_stem(args: argparse.Namespace, result: dict[str, Any]) -> str:
    if args.result_filename:
        return Path(args.result_filename).stem
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    model = result["model"].rstrip("/").split("/")[-1]
    return f"openai-{args.request_rate}qps{concurrency}-{model}-{result['date']}"


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by `args`, print the table, save JSON/PNG when asked."""
    endpoint = args.endpoint or ("chat" if args.backend == "openai-chat" else "completions")
    base_url = _base_url(args)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    model = args.model or asyncio.run(fetch_model_id(base_url, api_key))
    tokenizer = _load_tokenizer(args.tokenizer, model)
    requests = sample_random_requests(
        args.num_prompts, args.random_input_len, args.random_output_len,
        args.random_range_ratio, args.random_prefix_len, args.seed,
        vocab_size=args.random_vocab_size, tokenizer=tokenizer, as_text=endpoint == "chat")
    print(f"Benchmarking {model} at {base_url}{ENDPOINTS[endpoint]}: {len(requests)} prompts, "
          f"request rate {args.request_rate}, max concurrency {args.max_concurrency}")
    result = asyncio.run(run_benchmark(
        base_url=base_url, model=model, requests=requests, endpoint=endpoint,
        request_rate=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, ignore_eos=args.ignore_eos,
        temperature=args.temperature, api_key=api_key, seed=args.seed,
        disable_tqdm=args.disable_tqdm, request_timeout_s=args.request_timeout,
        percentiles=percentiles))
    result.update({
        "tokenizer_id": getattr(tokenizer, "name_or_path", None),
        "dataset_name": args.dataset_name,
        "random_input_len": args.random_input_len,
        "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio,
        "random_prefix_len": args.random_prefix_len,
        "ignore_eos": args.ignore_eos,
        "seed": args.seed,
    })
    print(format_result(result, percentiles))
    if result["failed"]:
        first = next(e for e in result["errors"] if e)
        print(f"{result['failed']} requests failed; the first error: {first}")
    stem = _result_stem(args, result)
    out_dir = Path(args.result_dir)
    if args.save_result or args.plot:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.save_result:
        path = out_dir / (args.result_filename or f"{stem}.json")
        path.write_text(result_json(result))
        print(f"Saved the result to {path}")
    if args.plot:
        save_plot(result, out_dir / f"{stem}.png")
        print(f"Saved the plot to {out_dir / f'{stem}.png'}")
    return result

