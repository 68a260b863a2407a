"""What a request must pass before the app reads it: the token, checked on the headers before any
body byte is read; a body limit counted as the bytes stream in (chunked bodies too) and a time
limit on the body; and, below the app, a time limit on a request's head (slowloris).

``Guard`` is a pure ASGI middleware (it sees a request's headers before anything reads its body;
a ``BaseHTTPMiddleware`` would not help: FastAPI reads bodies after it). ``HeadTimeoutH11`` is
uvicorn's h11 protocol with a deadline on each request's head: uvicorn itself times out only
idle keep-alive connections, so a client sending its headers a byte a second held a connection
for as long as it liked.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import h11
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/", "/health", "/webhook")  # no token: probes, and Label Studio's webhooks
CLOSE = {"Connection": "close"}  # refused: the rest of the body is not read, not worth keeping
HEAD_TIMEOUT_S = 10.0  # a request's head (request line + headers) must arrive within this
BODY_TIMEOUT_S = 60.0  # and its body within this, once the app reads it
UNAUTHORIZED = (
    "missing or wrong token: send 'Authorization: Bearer <token>' "
    "(or basic auth with the token as password)"
)


def token_ok(header: str | None, token: str) -> bool:
    """``Bearer <token>`` or ``Basic base64(user:<token>)`` (any user name)."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return False


def too_large(limit: int) -> str:
    return f"request body over {limit} bytes; send fewer tasks per call"


class Guard:
    """ASGI middleware: 401 without the token (on every path but ``OPEN_PATHS``) and 413 for a
    declared ``Content-Length`` over the path's limit, both before the body is read; 413 when the
    bytes received pass the limit, 408 when the body takes over ``body_timeout_s``. Refusals
    close the connection.

    ``limits`` maps a path to its body limit (bytes); other paths get ``max_body``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body: int,
        limits: dict[str, int],
        body_timeout_s: float,
    ) -> None:
        self.app = app
        self.token = token
        self.max_body = max_body
        self.limits = limits
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = self.limits.get(scope["path"], self.max_body)
        if (
            self.token
            and scope["path"] not in OPEN_PATHS
            and not token_ok(headers.get("authorization"), self.token)
        ):
            www = {"WWW-Authenticate": 'Bearer, Basic realm="teacher"'}
            await refuse(send, 401, UNAUTHORIZED, {**www, **CLOSE})
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await refuse(send, 413, too_large(limit), CLOSE)
            return
        await self.app(scope, self.counted(receive, limit), send)

    def counted(self, receive: Receive, limit: int) -> Receive:
        """``receive`` raising HTTPException 413 past ``limit`` body bytes, 408 past the time."""
        deadline = time.monotonic() + self.body_timeout_s
        received, done = 0, False

        async def guarded() -> Message:
            nonlocal received, done
            if done:  # the body is in: what comes now is the disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                raise HTTPException(
                    408, f"request body not received within {self.body_timeout_s:g} s", CLOSE
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if received > limit:
                    raise HTTPException(413, too_large(limit), CLOSE)
            return message

        return guarded


async def refuse(send: Send, status: int, error: str, headers: dict[str, str]) -> None:
    """A JSON ``{"error": ...}`` response with ``status``, sent from the middleware."""
    body = json.dumps({"error": error}).encode()
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request head has not arrived
    ``HEAD_TIMEOUT_S`` after the connection opened or the last response ended, or that is still
    sending the body of a request answered unread then (a 429: uvicorn reads such a body to
    its end, and discards it)."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timed_out)

    def _head_timed_out(self) -> None:
        """Drop the connection if it is still waiting for a request's head (h11's IDLE), or
        still receiving the body of a request already answered (refused unread)."""
        waiting = self.conn.their_state is h11.IDLE
        draining = (
            self.cycle is not None
            and self.cycle.response_complete
            and self.conn.their_state is h11.SEND_BODY
        )
        if (waiting or draining) and not self.transport.is_closing():
            why = "no request head" if waiting else "body still coming after the answer"
            self.logger.info("%s: %s after %g s; closed", self.client, why, HEAD_TIMEOUT_S)
            self.transport.close()
