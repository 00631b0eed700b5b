"""ASGI middleware that guards the server before a handler runs: API key, body size."""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cpserve.entrypoints.openai.errors import error_response

# Probes and scrapes work without the key, as in vLLM.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/ping"})


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>`; the comparison takes the same time whatever
    the client sent (both sides are hashed first, so not even the key's length leaks)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if not hmac.compare_digest(hashlib.sha256(sent).digest(), self._expected):
            response = error_response(401, "invalid or missing API key: send "
                                           "'Authorization: Bearer <key>'")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Answers 413 to a request body over `max_bytes`, whether or not it declares its length.

    The body is read here (the handlers would read it whole anyway) and replayed to the app;
    later `receive()` calls go to the server, so handlers still see the client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if too_large:
                await self._refuse(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        pending: list[Message] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # a disconnect: let the app see it
                pending.append(message)
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending.insert(0, {"type": "http.request", "body": b"".join(chunks), "more_body": False})

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body is larger than the server's limit of "
                                       f"{self.max_bytes} bytes (--max-request-body-bytes)")
        await response(scope, receive, send)
