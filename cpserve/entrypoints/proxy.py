"""`cpserve proxy`: one OpenAI endpoint in front of prefill and decode instances.

    client --> proxy --(1) prompt, max_tokens 1, kv_transfer_params {"do_remote_decode": true}
                     |      --> a prefill instance: computes the prompt, keeps its KV, answers
                     |          with kv_transfer_params (where the KV is)
                     +-(2) the client's request + those kv_transfer_params
                            --> a decode instance: pulls the KV, generates; its answer (a
                                stream or not) goes back to the client as it comes

This is the protocol of vLLM's disaggregation proxy (`toy_proxy_server.py`), so either proxy
works in front of cpserve instances. Backends are picked round-robin or by fewest requests in
flight. A client that hangs up aborts the request where it is: the prefill call (the instance
sees the disconnect), the decode call (likewise), or in between (the prefill instance is told
to release the KV it holds). Routes: /v1/completions, /v1/chat/completions, /v1/models (a
decode instance's), /health (200 while each side has a healthy instance), /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp
import msgpack
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cpserve.entrypoints.openai.errors import APIError, error_response, install_error_handlers
from cpserve.entrypoints.openai.middleware import BodySizeLimitMiddleware
from cpserve.entrypoints.openai.serving import SSEResponse, run_unless_disconnected

logger = logging.getLogger(__name__)

POLICIES = ("round_robin", "least_loaded")
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
HEALTH_TIMEOUT_S = 3.0


@dataclass
class Backend:
    url: str
    in_flight: int = 0


class Pool:
    """The instances of one side, and how the next one is picked."""

    def __init__(self, urls: Sequence[str], policy: str) -> None:
        self.backends = [Backend(url.rstrip("/")) for url in urls]
        self.policy = policy
        self._turn = itertools.count()

    def pick(self) -> Backend:
        turn = next(self._turn)
        if self.policy == "round_robin":
            return self.backends[turn % len(self.backends)]
        fewest = min(b.in_flight for b in self.backends)
        idle = [b for b in self.backends if b.in_flight == fewest]
        return idle[turn % len(idle)]


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cpserve:proxy_requests", "Requests sent to each instance, by "
                                "HTTP status.", ["stage", "backend", "status"],
                                registry=self.registry)
        self.in_flight = Gauge("cpserve:proxy_requests_in_flight", "Requests in flight at each "
                               "instance.", ["stage", "backend"], registry=self.registry)
        self.prefill_seconds = Histogram(
            "cpserve:proxy_prefill_seconds", "Seconds of the prefill call.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry)
        self.disconnects = Counter("cpserve:proxy_client_disconnects",
                                   "Clients that hung up before their answer was complete.",
                                   registry=self.registry)


class Proxy:
    def __init__(self, prefill: Sequence[str], decode: Sequence[str],
                 policy: str = "round_robin") -> None:
        if not prefill or not decode:
            raise ValueError("the proxy needs at least one --prefill and one --decode URL")
        if policy not in POLICIES:
            raise ValueError(f"--policy {policy!r} must be one of {', '.join(POLICIES)}")
        self.prefill = Pool(prefill, policy)
        self.decode = Pool(decode, policy)
        self.metrics = ProxyMetrics()
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    @contextlib.contextmanager
    def _tracking(self, stage: str, backend: Backend):
        backend.in_flight += 1
        gauge = self.metrics.in_flight.labels(stage, backend.url)
        gauge.inc()
        try:
            yield
        finally:
            backend.in_flight -= 1
            gauge.dec()

    def _headers(self, raw_request: Request, request_id: str) -> dict[str, str]:
        headers = {"X-Request-Id": request_id}
        if "authorization" in raw_request.headers:  # the instances check the client's key
            headers["Authorization"] = raw_request.headers["authorization"]
        return headers

    async def handle(self, path: str, raw_request: Request) -> Response:
        try:
            body = json.loads(await raw_request.body())
        except json.JSONDecodeError as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        headers = self._headers(raw_request, f"{uuid.uuid4()}")
        prefill = self.prefill.pick()
        status, answer = await self._prefill(prefill, path, body, headers, raw_request)
        if status != 200:  # the prefill instance's refusal (or error) is the client's answer
            return Response(answer, status_code=status, media_type="application/json")
        kv_params = json.loads(answer).get("kv_transfer_params")
        decode_body = dict(body)
        if kv_params:
            decode_body["kv_transfer_params"] = kv_params
        decode = self.decode.pick()
        try:
            upstream = await run_unless_disconnected(
                self._post(decode, path, decode_body, headers), raw_request)
        except BaseException:
            await self._release(kv_params)  # it never reached the decode instance
            raise
        if upstream.status != 200:
            await self._release(kv_params)  # refused: it will not pull the KV
        return SSEResponse(self._relay(upstream, decode), status_code=upstream.status,
                           media_type=upstream.content_type or "application/json")

    async def _prefill(self, backend: Backend, path: str, body: dict, headers: dict,
                       raw_request: Request) -> tuple[int, bytes]:
        """The prefill call as vLLM's proxy makes it: one token, not streamed."""
        request = dict(body, stream=False, max_tokens=1, kv_transfer_params={
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None})
        if "max_completion_tokens" in request:
            request["max_completion_tokens"] = 1
        for key in ("stream_options", "min_tokens", "min_completion_tokens"):
            request.pop(key, None)
        started = time.monotonic()

        async def call() -> tuple[int, bytes]:
            with self._tracking("prefill", backend):
                response = await self._post(backend, path, request, headers)
                async with response:
                    return response.status, await response.read()

        try:
            status, answer = await run_unless_disconnected(call(), raw_request)
        except APIError as exc:
            if exc.status == 499:
                self.metrics.disconnects.inc()
            raise
        self.metrics.prefill_seconds.observe(time.monotonic() - started)
        self.metrics.requests.labels("prefill", backend.url, str(status)).inc()
        return status, answer

    async def _post(self, backend: Backend, path: str, body: dict,
                    headers: dict) -> aiohttp.ClientResponse:
        try:
            return await self.session.post(f"{backend.url}{path}", json=body, headers=headers)
        except aiohttp.ClientError as exc:
            raise APIError(502, f"cannot reach {backend.url}: {exc}") from None

    async def _relay(self, upstream: aiohttp.ClientResponse,
                     backend: Backend) -> AsyncIterator[bytes]:
        """The decode instance's answer, chunk by chunk; closing it (the client left)
        closes the upstream connection, which aborts the request there."""
        complete = False
        with self._tracking("decode", backend):
            try:
                async for chunk in upstream.content.iter_any():
                    yield chunk
                complete = True
            finally:
                upstream.close()
                self.metrics.requests.labels("decode", backend.url, str(upstream.status)).inc()
                if not complete:
                    self.metrics.disconnects.inc()

    async def _release(self, kv_params: dict | None) -> None:
        """Tell the prefill instance to drop the KV it keeps for this request (best effort:
        otherwise its lease expires)."""
        if not kv_params or not kv_params.get("remote_host"):
            return
        frame = msgpack.packb({"op": "release", "request": kv_params["remote_request_id"],
                               "bytes": 0}, use_bin_type=True)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                kv_params["remote_host"], kv_params["remote_port"]), HEALTH_TIMEOUT_S)
            writer.write(len(frame).to_bytes(4, "big") + frame)
            await writer.drain()
            await asyncio.wait_for(reader.read(64), HEALTH_TIMEOUT_S)
            writer.close()
        except (TimeoutError, OSError) as exc:
            logger.info("could not release the KV of %s: %s", kv_params.get("remote_request_id"),
                        exc)

    async def health(self) -> tuple[bool, dict]:
        async def probe(backend: Backend) -> str:
            try:
                async with self.session.get(
                        f"{backend.url}/health",
                        timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as response:
                    return "ok" if response.status == 200 else f"HTTP {response.status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                return f"unreachable: {type(exc).__name__}"

        report = {}
        for side, pool in (("prefill", self.prefill), ("decode", self.decode)):
            states = await asyncio.gather(*(probe(b) for b in pool.backends))
            report[side] = {b.url: s for b, s in zip(pool.backends, states)}
        healthy = all("ok" in side.values() for side in report.values())
        return healthy, report


def build_proxy_app(proxy: Proxy, max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
                    ) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await proxy.start()
        yield
        await proxy.close()

    app = FastAPI(title="cpserve proxy", docs_url=None, redoc_url=None, lifespan=lifespan)
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(raw_request: Request) -> Response:
        return await proxy.handle("/v1/completions", raw_request)

    @app.post("/v1/chat/completions")
    async def chat(raw_request: Request) -> Response:
        return await proxy.handle("/v1/chat/completions", raw_request)

    @app.get("/v1/models")
    async def models(raw_request: Request) -> Response:
        backend = proxy.decode.pick()
        try:
            async with proxy.session.get(f"{backend.url}/v1/models",
                                         headers=proxy._headers(raw_request, "models")) as r:
                return Response(await r.read(), status_code=r.status,
                                media_type="application/json")
        except aiohttp.ClientError as exc:
            return error_response(502, f"cannot reach {backend.url}: {exc}")

    @app.get("/health")
    async def health() -> Response:
        healthy, report = await proxy.health()
        return JSONResponse(report, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(proxy.metrics.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_body_bytes)
    return app


def add_proxy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", nargs="+", required=True, metavar="URL",
                        help="prefill instances (kv_producer), e.g. http://10.0.0.1:8100")
    parser.add_argument("--decode", nargs="+", required=True, metavar="URL",
                        help="decode instances (kv_consumer)")
    parser.add_argument("--policy", default="round_robin", choices=POLICIES,
                        help="how an instance is picked for each request")
    parser.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--uvicorn-log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])


def run_proxy(args: argparse.Namespace) -> int:
    for url in (*args.prefill, *args.decode):
        if not url.startswith(("http://", "https://")):
            print(f"cpserve proxy: {url!r} is not an http:// or https:// URL", file=sys.stderr)
            return 2
    app = build_proxy_app(Proxy(args.prefill, args.decode, args.policy),
                          args.max_request_body_bytes)
    logger.info("proxy on http://%s:%d: prefill %s, decode %s", args.host, args.port,
                " ".join(args.prefill), " ".join(args.decode))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    return 0
