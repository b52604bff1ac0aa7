"""Request limits: body size (413) and text the tokenizer cannot take (400) as ASGI middleware, concurrent
requests per API key (429), and the bounded thread pool that renders and tokenizes prompts.

The body check reads ``Content-Length`` and also counts the bytes of chunked uploads, buffering at
most ``max_body_bytes`` before the route sees the body; later ``receive`` calls go straight to the
server so streaming routes still learn of client disconnects (ASGI spec,
https://asgi.readthedocs.io/en/latest/specs/www.html#disconnect-receive-event).

The same middleware refuses a JSON body with a lone UTF-16 surrogate in any string (``"\\ud800"``
unpaired, or its CESU-8 bytes): Python decodes it into a ``str`` that cannot be encoded as UTF-8, so a
tokenizer, a log line or a stored response would fail on it later. One check covers every route and
every field; the 400 names the field by its JSON path (``messages.0.content``, ``metadata.k``).
A body without the escape's text or bytes (nearly all) is only scanned, never parsed twice.

Tokenizing a long prompt takes seconds of CPU. It runs in :data:`TOKENIZER_POOL`, a small pool of its
own, after the key's concurrency slot is taken (``server/generation.py``): the default thread pool
(six threads on two cores) stays free for everything else, and one key cannot occupy it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, log_client_error

log = logging.getLogger(__name__)
T = TypeVar("T")

# "\ud800"-"\udfff" as a JSON escape, or a surrogate's 3 bytes as CESU-8 (json.loads passes them through)
SURROGATE_HINT = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
TOKENIZER_POOL = ThreadPoolExecutor(max_workers=max(2, min(4, (os.cpu_count() or 2) // 2)),
                                    thread_name_prefix="tokenize")


async def in_tokenizer_pool(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in :data:`TOKENIZER_POOL` (rendering and tokenizing prompts), off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(TOKENIZER_POOL, functools.partial(fn, *args))


def lone_surrogate(value: Any, path: tuple = ()) -> tuple | None:
    """The JSON path of the first string (or object key) holding an unpaired surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if lone_surrogate(key) is not None:
                return (*path, key.encode("utf-8", "backslashreplace").decode())
            found = lone_surrogate(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, (*path, i))
            if found is not None:
                return found
    return None


def surrogate_error(body: bytes) -> APIError | None:
    """A 400 naming the field when the JSON ``body`` holds a lone surrogate; None otherwise (bad JSON
    included: the route reports that)."""
    if not SURROGATE_HINT.search(body):
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    path = lone_surrogate(value)
    if path is None:
        return None
    param = ".".join(str(part) for part in path) or None
    return APIError(400, f"invalid value for {param or 'the body'}: the text holds a lone UTF-16 surrogate "
                    "(an unpaired \\ud800-\\udfff escape), which is not valid Unicode",
                    param=param, code="invalid_value")


async def refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    """The error as the route's API shapes it: Anthropic's for ``/v1/messages``, OpenAI's elsewhere."""
    headers = dict(scope.get("headers") or [])
    log_client_error(scope.get("method", ""), scope.get("path", ""), headers.get(b"user-agent", b"").decode(
        "latin-1"), error)
    response = error.response()
    if scope.get("path", "").startswith("/v1/messages"):
        from fastapi.responses import JSONResponse

        response = JSONResponse({"type": "error", "error": {"type": error.type, "message": error.message}},
                                status_code=error.status, headers=error.headers)
    await response(scope, receive, send)

BODY_METHODS = {"POST", "PUT", "PATCH"}


class BodySizeLimit:
    """The body's size (413) and its text (400 for a lone surrogate), before any route reads it."""

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
            await refuse(too_large, scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending the body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await refuse(too_large, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        bad_text = surrogate_error(b"".join(chunks))
        if bad_text is not None:
            await refuse(bad_text, scope, receive, send)
            return
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
