"""`cpserve bench serve`: a load generator for any OpenAI-compatible streaming server.

It talks to the server only through the public HTTP API (`/v1/models`, `/v1/completions`,
`/v1/chat/completions`), so the same command measures cpserve and vLLM. Flags, the printed table
and the JSON keys follow `vllm bench serve`, so results sit side by side.

Timeline of one request, every instant read from `time.perf_counter()` on the client:

    sent        token chunk 1   token chunk 2   ...   token chunk n
     |--- TTFT ---|--- itl[0] ---|--- itl[1] ---| ... |
     |------------------------ E2EL -------------------|
    TPOT = (E2EL - TTFT) / (output_tokens - 1)        requests with more than one output token

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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Ids below this are where tokenizers keep <unk>, <s>, </s> and padding.
MIN_RANDOM_TOKEN_ID = 10
# 32000 is the smallest base vocabulary of the common families (Llama-2, Mistral); ids under it
# are ordinary tokens in Llama-3, Qwen and GPT-2 vocabularies too.
DEFAULT_RANDOM_VOCAB_SIZE = 32000
DEFAULT_REQUEST_TIMEOUT_S = 6 * 3600
# Common English words that BPE vocabularies hold as one token with their leading space, so a
# prompt of n words is close to n tokens whatever the server's tokenizer.
_WORDS = (
    "the of and to in is it that for you was on are as with be at this have from or one had by "
    "but not what all were we when your can said there use an each which she do how their if "
    "will up other about out many then them these so some her would make like him into time "
    "has look two more go see no way could people my than first water been call who its now "
    "find long down day did get come made may part over new sound take only little work know "
    "place year live me back give most very after thing our just name good man think say great "
    "where help through much before line right too mean old any same tell boy follow came want"
).split()


@dataclass(frozen=True)
class SampleRequest:
    prompt: str | list[int]
    prompt_len: int  # planned tokens; the server's `usage.prompt_tokens` replaces it
    max_tokens: int


@dataclass
class RequestOutput:
    success: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    generated_text: str = ""


# ---------------------------------------------------------------------------------------------
# Workload: random prompts and arrival times


def random_lengths(rng: np.random.Generator, n: int, length: int, range_ratio: float,
                   minimum: int = 1) -> np.ndarray:
    """n lengths drawn uniformly from the integers in [length*(1-r), length*(1+r)]."""
    low = max(minimum, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def sample_random_requests(num_prompts: int, input_len: int, output_len: int,
                           range_ratio: float = 0.0, prefix_len: int = 0, seed: int = 0, *,
                           vocab_size: int = DEFAULT_RANDOM_VOCAB_SIZE, tokenizer: Any = None,
                           as_text: bool = False) -> list[SampleRequest]:
    """The `random` dataset: a shared prefix of `prefix_len` tokens, then a random part.

    With a tokenizer, random ids of its vocabulary are decoded to text that encodes back to
    the planned length (the text is what is sent, as vLLM does).
    Without one, completions get token-id prompts (`prompt: [ids]`, ids in
    [MIN_RANDOM_TOKEN_ID, vocab_size)), and `as_text` (chat) gets random common words.
    """
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if prefix_len < 0 or input_len < 0 or output_len < 1:
        raise ValueError("need --random-prefix-len >= 0, --random-input-len >= 0 and "
                         "--random-output-len >= 1")
    rng = np.random.default_rng(seed)
    input_lens = random_lengths(rng, num_prompts, input_len, range_ratio,
                                minimum=0 if prefix_len else 1)
    output_lens = random_lengths(rng, num_prompts, output_len, range_ratio)
    if tokenizer is not None:
        allowed = _plain_token_ids(tokenizer)
        prefix, prefix_len = _tokenizer_prompt(tokenizer, rng, allowed, "", prefix_len)
        prompts = [_tokenizer_prompt(tokenizer, rng, allowed, prefix, prefix_len + int(n))
                   for n in input_lens]
    elif as_text:
        prefix_words = rng.choice(_WORDS, size=prefix_len).tolist()
        prompts = [(" ".join(prefix_words + rng.choice(_WORDS, size=int(n)).tolist()),
                    prefix_len + int(n)) for n in input_lens]
    else:
        if vocab_size <= MIN_RANDOM_TOKEN_ID:
            raise ValueError(f"--random-vocab-size must exceed {MIN_RANDOM_TOKEN_ID}")
        prefix_ids = rng.integers(MIN_RANDOM_TOKEN_ID, vocab_size, size=prefix_len).tolist()
        id_prompts = [prefix_ids + rng.integers(MIN_RANDOM_TOKEN_ID, vocab_size,
                                                size=int(n)).tolist() for n in input_lens]
        prompts = [(ids, len(ids)) for ids in id_prompts]
    return [SampleRequest(prompt=p, prompt_len=n, max_tokens=int(m))
            for (p, n), m in zip(prompts, output_lens)]


def _plain_token_ids(tokenizer: Any) -> np.ndarray:
    """Ids that decode on their own to valid text: no special tokens, and no byte-level pieces
    of a multi-byte character, which decode to U+FFFD and re-encode as several tokens."""
    ids = np.setdiff1d(np.arange(tokenizer.vocab_size), tokenizer.all_special_ids)
    texts = tokenizer.batch_decode(ids[:, None].tolist())
    return ids[[bool(t) and "\ufffd" not in t for t in texts]]


def _tokenizer_prompt(tokenizer: Any, rng: np.random.Generator, allowed: np.ndarray,
                      prefix: str, target: int) -> tuple[str, int]:
    """`prefix` plus random text, aiming at `target` tokens in all; returns (text, tokens).

    Decoding random ids and encoding the text again merges or splits some of them, also across
    the seam with the prefix, so the random part is trimmed or topped up until the whole prompt
    encodes to `target`. The count returned is the true one even if that never happens.
    """
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    body = rng.choice(allowed, size=max(0, target - len(encode(prefix)))).tolist()
    for _ in range(10):
        excess = len(encode(prefix + tokenizer.decode(body))) - target
        if excess == 0:
            break
        body = encode(tokenizer.decode(body))
        body = (body[:max(0, len(body) - excess)] if excess > 0
                else body + rng.choice(allowed, size=-excess).tolist())
    text = prefix + tokenizer.decode(body)
    return text, len(encode(text))


def arrival_intervals(num_requests: int, request_rate: float, burstiness: float = 1.0,
                      seed: int = 0) -> np.ndarray:
    """Seconds to wait before sending each request; the first one leaves at once.

    Gaps are Gamma(shape=burstiness, mean=1/rate): burstiness 1 is a Poisson process, lower is
    burstier, higher is more regular. An infinite rate sends everything at once.
    """
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    # A stream of its own, so changing the rate does not change the prompts.
    rng = np.random.default_rng([seed, 1])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    if num_requests:
        gaps[0] = 0.0
    return gaps


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
# The run and its metrics


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


def _percentile_key(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def calculate_metrics(outputs: Sequence[RequestOutput], duration: float,
                      percentiles: Sequence[float] = (99,)) -> dict[str, Any]:
    """Aggregate per-request timings (seconds) into totals, throughputs and ms statistics."""
    done = [o for o in outputs if o.success]
    total_input = sum(o.prompt_len for o in done)
    total_output = sum(o.output_tokens for o in done)
    per_second = 1.0 / duration if duration > 0 else 0.0
    metrics: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) * per_second,
        "output_throughput": total_output * per_second,
        "total_token_throughput": (total_input + total_output) * per_second,
    }
    samples = {
        "ttft": [o.ttft for o in done],
        "tpot": [(o.latency - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1],
        "itl": [gap for o in done for gap in o.itl],
        "e2el": [o.latency for o in done],
    }
    for name, seconds in samples.items():
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        empty = ms.size == 0
        metrics[f"mean_{name}_ms"] = 0.0 if empty else float(ms.mean())
        metrics[f"median_{name}_ms"] = 0.0 if empty else float(np.median(ms))
        metrics[f"std_{name}_ms"] = 0.0 if empty else float(ms.std())
        for p in percentiles:
            value = 0.0 if empty else float(np.percentile(ms, p))
            metrics[f"p{_percentile_key(p)}_{name}_ms"] = value
    metrics["input_lens"] = [o.prompt_len for o in outputs]
    metrics["output_lens"] = [o.output_tokens if o.success else 0 for o in outputs]
    metrics["ttfts"] = [o.ttft for o in outputs]
    metrics["itls"] = [o.itl for o in outputs]
    metrics["errors"] = [o.error for o in outputs]
    return metrics


_SECTIONS = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def format_result(result: dict[str, Any], percentiles: Sequence[float] = (99,)) -> str:
    """The table `vllm bench serve` prints, with the same labels, so scripts that read it work."""
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40} {value:<10.2f}" if isinstance(value, float)
                     else f"{label:<40} {value:<10}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result.get("max_concurrency"):
        row("Maximum request concurrency:", result["max_concurrency"])
    if "request_rate" in result:
        row("Request rate configured (RPS):", float(result["request_rate"]))
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total Token throughput (tok/s):", result["total_token_throughput"])
    for key, short, title in _SECTIONS:
        lines.append(f"{title:-^50}")
        row(f"Mean {short} (ms):", result[f"mean_{key}_ms"])
        row(f"Median {short} (ms):", result[f"median_{key}_ms"])
        for p in percentiles:
            name = _percentile_key(p)
            row(f"P{name} {short} (ms):", result[f"p{name}_{key}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)


def save_plot(result: dict[str, Any], path: Path) -> None:
    """Histograms of TTFT and ITL of the successful requests, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttfts = [t * 1000 for t, err in zip(result["ttfts"], result["errors"]) if not err]
    itls = [gap * 1000 for gaps, err in zip(result["itls"], result["errors"]) if not err
            for gap in gaps]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, values, title in ((axes[0], ttfts, "TTFT"), (axes[1], itls, "ITL")):
        ax.hist(values, bins=50)
        ax.set_title(f"{title} ({len(values)} samples)")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("count")
    fig.suptitle(f"{result['model']}  {result['endpoint']}  rate {result['request_rate']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
        # Strict JSON has no Infinity; vLLM writes an unbounded rate as the string "inf".
        saved = dict(result, request_rate=result["request_rate"] if math.isfinite(
            result["request_rate"]) else "inf")
        path.write_text(json.dumps(saved))
        print(f"Saved the result to {path}")
    if args.plot:
        save_plot(result, out_dir / f"{stem}.png")
        print(f"Saved the plot to {out_dir / f'{stem}.png'}")
    return result
