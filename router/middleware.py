"""ASGI middleware of the router, outermost first: unexpected errors, API keys, the request body size.

Plain ASGI (not BaseHTTPMiddleware) so streamed responses pass through untouched.

- `CatchUnexpectedErrors`: an exception no handler turned into a response becomes a 500 with the OpenAI error
  body, and the connection stays usable. (Starlette's outermost handler answers 500 too but then re-raises, so
  uvicorn drops the keep-alive connection and the client's next request on it fails.)
- `RequireApiKey`: /v1/* needs `Authorization: Bearer <key>` with one of the configured keys, compared in
  constant time; /health, /ready, /metrics (and the OpenAPI docs) stay open, as in vLLM.
- `LimitBodySize`: a body over the limit is a 413, whether it announces its length or not (then it is read
  here, up to the limit, before the app sees it).
"""
from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from router.errors import RouterError

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, error: RouterError, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps(error.to_dict()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class CatchUnexpectedErrors:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            if started:  # part of the response is out: nothing sensible can follow it
                raise
            logger.exception("unhandled error on %s", scope.get("path"))
            await send_error(send, RouterError(f"internal error: {type(error).__name__}", status=500))


class RequireApiKey:
    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self._expected = [f"Bearer {key}".encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and not self._authorized(scope):
            error = RouterError("Missing or incorrect API key: send `Authorization: Bearer <key>`.", status=401,
                                code="invalid_api_key")
            await send_error(send, error, ((b"www-authenticate", b"Bearer"),))
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        sent = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        # Compare with every key, without stopping at a match, so the time says nothing about which one.
        matches = [hmac.compare_digest(sent, expected) for expected in self._expected]
        return any(matches)


class LimitBodySize:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, self._error())
            return
        # Read the body here (the app would read all of it anyway), so one without a length is bounded too.
        body, more, disconnect = bytearray(), True, None
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnect = message
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await send_error(send, self._error())
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return disconnect or {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _error(self) -> RouterError:
        return RouterError(f"the request body is larger than the limit of {self.max_bytes} bytes", status=413,
                           code="request_too_large")
