"""Anthropic's error shape for the Messages API routes: ``{"type": "error", "error": {"type", "message"}}``.

Statuses and types follow https://docs.anthropic.com/en/api/errors, so the ``anthropic`` SDK raises its
matching classes: 400 ``invalid_request_error``, 401 ``authentication_error``, 403 ``permission_error``,
404 ``not_found_error``, 413 ``request_too_large``, 429 ``rate_limit_error`` (this key's concurrency
limit), 500 ``api_error``, 529 ``overloaded_error`` (the engine's queue is full, the model is loading or
the server is shutting down; ``Retry-After`` says when to try again). Anthropic's errors have no
``param``: the message names the field.

:class:`MessagesRoute` is the routes' ``route_class``: whatever the rest of the server raises for a
request of these routes (the shared serving path's ``APIError``, the engine's errors, FastAPI's
validation errors, authentication in ``server/deps.py``) is answered in this shape, and logged at INFO
with its route and the client's user agent.
"""

from __future__ import annotations

import logging
import secrets

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from engine import EngineError
from server.errors import APIError, from_engine_error, validation_error

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
         429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
OVERLOADED = 529
OVERLOADED_CODES = {"overloaded"}  # the engine's full queue (a 429 on the OpenAI routes)


def status_of(error: APIError) -> int:
    if error.status == 503 or (error.status == 429 and error.code in OVERLOADED_CODES):
        return OVERLOADED
    if error.status >= 500:
        return 500
    return error.status


def message_of(error: APIError) -> str:
    """The message, naming its field when the message itself does not."""
    if error.param and error.param not in error.message:
        return f"{error.param}: {error.message}"
    return error.message


def error_body(error: APIError) -> dict:
    status = status_of(error)
    return {"type": "error", "error": {"type": TYPES.get(status, "api_error"), "message": message_of(error)},
            "request_id": "req_" + secrets.token_hex(12)}


def error_response(error: APIError) -> JSONResponse:
    body = error_body(error)
    headers = {**(error.headers or {}), "request-id": body["request_id"]}
    return JSONResponse(body, status_code=status_of(error), headers=headers)


def as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineError):
        return from_engine_error(exc)
    return validation_error(exc)


class MessagesRoute(APIRoute):
    """An ``APIRoute`` whose errors take Anthropic's shape (module doc)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request):
            try:
                return await handler(request)
            except (APIError, EngineError, RequestValidationError) as exc:
                error = as_api_error(exc)
                log.info("%s %s -> %d: %s (%s)", request.method, request.url.path, status_of(error),
                         message_of(error), request.headers.get("user-agent", "-"))
                return error_response(error)

        return handle
