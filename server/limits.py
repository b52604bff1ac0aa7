"""Request limits: body size (413) as ASGI middleware, and concurrent requests per API key (429).

The body check reads ``Content-Length`` and also counts the bytes of chunked uploads, buffering at
most ``max_body_bytes`` before the route sees the body; later ``receive`` calls go straight to the
server so streaming routes still learn of client disconnects (ASGI spec,
https://asgi.readthedocs.io/en/latest/specs/www.html#disconnect-receive-event).
"""

from __future__ import annotations

import threading
from collections import Counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError

BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"request body exceeds {self.max_body_bytes} bytes", code="body_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await too_large.response()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending the body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await too_large.response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class KeyLimiter:
    """At most ``limit`` requests in flight per API key (``None`` = the anonymous key)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active: Counter[str | None] = Counter()
        self._lock = threading.Lock()

    def acquire(self, key: str | None) -> Slot:
        with self._lock:
            if self.active[key] >= self.limit:
                raise APIError(429, f"too many concurrent requests for this API key (limit {self.limit})",
                               code="concurrency_limit_exceeded", headers={"Retry-After": "1"})
            self.active[key] += 1
        return Slot(self, key)

    def _release(self, key: str | None) -> None:
        with self._lock:
            self.active[key] -= 1
            if self.active[key] <= 0:
                del self.active[key]


class Slot:
    """One acquired place; ``release()`` is idempotent so every exit path may call it."""

    def __init__(self, limiter: KeyLimiter, key: str | None) -> None:
        self.limiter, self.key, self.released = limiter, key, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._release(self.key)
