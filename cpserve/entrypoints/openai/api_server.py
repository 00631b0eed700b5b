"""The OpenAI-compatible HTTP server: `build_app(...)` for an engine, `run_server(args)` for
the CLI, and `ServerThread` to run an app in the background (tests, notebooks).

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET|POST /ping, GET /metrics, POST /tokenize, POST /detokenize, GET /version.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

import cpserve
from cpserve.engine.async_engine import AsyncEngine
from cpserve.entrypoints.openai.errors import APIError, error_response, install_error_handlers
from cpserve.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from cpserve.entrypoints.openai.middleware import APIKeyMiddleware, BodySizeLimitMiddleware
from cpserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from cpserve.entrypoints.openai.serving import OpenAIServing
from cpserve.entrypoints.openai.serving_chat import ChatServing
from cpserve.entrypoints.openai.serving_completion import CompletionServing

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BODY_BYTES = 64 * 2**20  # a 1M-token prompt sent as token ids fits
# After the engine dies, /health answers 503 for a moment (so probes and load balancers see
# it), then uvicorn stops, waiting a little for open connections; a timer makes sure the
# process is gone well within 10 s whatever happens.
_DEATH_NOTICE_S = 1.0
_DEATH_GRACEFUL_S = 3
_DEATH_HARD_EXIT_S = 8.0


def build_app(engine: AsyncEngine, *, served_model_names: Sequence[str] = ("tiny",),
              api_key: str | None = None,
              max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
              chat_template: str | None = None) -> FastAPI:
    """An app serving `engine` (which the caller starts and shuts down). `chat_template`
    replaces the tokenizer's own (the text of a Jinja template)."""
    serving = OpenAIServing(engine, served_model_names, chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        serving.close()

    app = FastAPI(title="cpserve", version=cpserve.__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    completions = CompletionServing(serving)
    chat = ChatServing(serving)
    metrics = ServerMetrics(engine.stats, model_name=serving.model_name,
                            max_model_len=serving.max_model_len)
    engine.observers.append(metrics)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.serving = serving
    created = int(time.time())
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw_request: Request) -> Response:
        return await completions.create(req, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest,
                                     raw_request: Request) -> Response:
        return await chat.create(req, raw_request)

    @app.get("/v1/models")
    async def list_models() -> dict:
        # `root` names the model as served, not where its files are on this machine.
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "cpserve",
             "root": serving.model_name, "max_model_len": serving.max_model_len}
            for name in serving.model_names]}

    @app.get("/health")
    async def health() -> Response:
        reason = engine.health()
        if reason is not None:
            return error_response(503, reason)
        return Response(status_code=200)

    # vLLM's (and SageMaker's) alias of /health.
    @app.get("/ping")
    async def ping_get() -> Response:
        return await health()

    @app.post("/ping")
    async def ping_post() -> Response:
        return await health()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict:
        return {"version": cpserve.__version__}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send exactly one of prompt and messages")
        if req.messages is not None:
            text = await serving.render_chat(req.messages, req.add_generation_prompt)
            special = bool(req.add_special_tokens)  # the template wrote them already
        else:
            text = req.prompt
            special = req.add_special_tokens is not False
        param = "prompt" if req.messages is None else "messages"
        ids = await serving.encode(text, special, param, serving.max_model_len)
        return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": list(ids)}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        serving.check_model(req.model)
        serving.check_token_ids(req.tokens, "tokens")
        text = await serving.in_tokenizer_thread(lambda tok: tok.decode(req.tokens),
                                                 len(req.tokens))
        return {"prompt": text}

    # The last added runs first: the key is checked before the body is read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_body_bytes)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app


def add_server_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: loopback only; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("CPSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $CPSERVE_API_KEY)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model names clients may ask for; the first is reported back "
                        "(default: the model argument)")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES)
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="Jinja chat template (a file, or the template itself) instead of the "
                        "tokenizer's")
    g.add_argument("--enable-log-requests", action="store_true", default=False,
                   help="log a line when each request arrives and finishes")
    g.add_argument("--disable-log-requests", dest="enable_log_requests",
                   action="store_false", help="do not log requests (the default)")
    g.add_argument("--api-server-count", type=int, default=1,
                   help="API server processes; only 1 is supported")
    g.add_argument("--headless", action="store_true",
                   help="run this node's ranks without an API server (--node-rank >= 1)")


def run_server(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the process exit code (1 if the engine died).

    This process serves HTTP; the engine runs in a process of its own, started here (rank 0
    of the layout, which starts the other local ranks). Under torchrun, the ranks other than
    0 serve no HTTP: they follow rank 0's plans.
    """
    from cpserve.engine.args import EngineArgs
    from cpserve.engine.worker import follow_torchrun_driver, is_torchrun_worker
    from cpserve.entrypoints.openai.chat_template import load_chat_template

    engine_args = EngineArgs.from_cli_args(args)
    if is_torchrun_worker():
        return follow_torchrun_driver(engine_args.create_engine_config())
    chat_template = load_chat_template(args.chat_template)
    engine = AsyncEngine.from_engine_args(engine_args, log_requests=args.enable_log_requests)
    names = args.served_model_name or [args.model]
    app = build_app(engine, served_model_names=names, api_key=args.api_key,
                    max_request_body_bytes=args.max_request_body_bytes,
                    chat_template=chat_template)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=_DEATH_GRACEFUL_S))

    def on_engine_death(exc: BaseException) -> None:
        logger.error("the engine died (%r); the server stops", exc)
        for delay, action in ((_DEATH_NOTICE_S, lambda: setattr(server, "should_exit", True)),
                              (_DEATH_HARD_EXIT_S, lambda: os._exit(1))):
            timer = threading.Timer(delay, action)
            timer.daemon = True
            timer.start()

    engine.on_death.append(on_engine_death)
    engine.start()
    logger.info("serving %s on http://%s:%d", ", ".join(names), args.host, args.port)
    try:
        server.run()
    finally:
        engine.shutdown()
    return 1 if engine.is_dead else 0


class ServerThread:
    """Runs an app with uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning") -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level,
                                                    timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="cpserve-uvicorn", daemon=True)

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self._socket.close()
