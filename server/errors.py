"""Every failure as an OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``.

Shape and types follow the OpenAI API reference (https://platform.openai.com/docs/guides/error-codes)
so the official SDKs raise their matching exception classes (BadRequestError, NotFoundError, ...).
Client input never produces a 500: validation errors become 400 naming the offending field.

Every client error (4xx) is logged at INFO with its route, message, ``param`` and the client's user agent,
so an operator sees why a client failed. An unexpected exception becomes a JSON 500 inside the app
(:class:`UnexpectedErrors`), before Starlette's ``ServerErrorMiddleware``, which sends its handler's
response and then re-raises, so uvicorn would log the error again and close the kept-alive connection.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import (
    EngineError,
    InvalidRequest,
    NotReady,
    Overloaded,
    SessionBusy,
    SessionNotFound,
    ShuttingDown,
)

log = logging.getLogger(__name__)

TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """Raised anywhere in the server; the handler below turns it into the OpenAI error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or TYPE_FOR_STATUS.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine_error(exc: EngineError) -> APIError:
    """Engine errors carry no HTTP knowledge; this is the one place that maps them."""
    if isinstance(exc, InvalidRequest):  # a field error of the tool machinery names its field
        return APIError(400, str(exc), param=getattr(exc, "param", None), code=exc.code)
    if isinstance(exc, SessionNotFound):
        return APIError(404, str(exc), param="session_id", code=exc.code)
    if isinstance(exc, SessionBusy):
        return APIError(409, str(exc), param="session_id", code=exc.code)
    if isinstance(exc, Overloaded):
        retry = max(1, round(exc.retry_after))
        return APIError(429, str(exc), code=exc.code, headers={"Retry-After": str(retry)})
    if isinstance(exc, NotReady | ShuttingDown):
        return APIError(503, str(exc), code=exc.code, headers={"Retry-After": "5"})
    return APIError(500, str(exc), code=exc.code, type="server_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 becomes OpenAI's 400; ``param`` names the first bad field (``messages.0.role``)."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    loc = []
    for part in first.get("loc", ())[1:]:  # the first element is body/query/path/header
        if isinstance(part, str) and (part in UNION_TAGS or "[" in part or "(" in part):
            break  # pydantic names the union member it tried (``stop.str``): not part of the field
        loc.append(str(part))
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        return APIError(400, f"missing required parameter: {param}", param=param, code="missing_required_parameter")
    if param:
        message = f"invalid value for {param}: {message}"
    return APIError(400, message, param=param, code="invalid_value")


def log_client_error(method: str, path: str, user_agent: str | None, error: APIError) -> None:
    """One INFO line per client error: what was refused, why, which field, and who asked."""
    if 400 <= error.status < 500:
        log.info("%s %s -> %d %s: %s (param=%s, user-agent=%r)", method, path, error.status,
                 error.code or error.type, error.message, error.param, user_agent or "")


def respond(request: Request, error: APIError) -> JSONResponse:
    log_client_error(request.method, request.url.path, request.headers.get("user-agent"), error)
    return error.response()


def internal_error() -> APIError:
    return APIError(500, "internal server error", type="server_error")


class UnexpectedErrors:
    """ASGI middleware just outside the routes: an exception that escapes them becomes a JSON 500 and goes
    no further, so the connection stays usable. A response already started (a stream) cannot be replaced:
    the exception then goes on, and the server closes that connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await internal_error().response()(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """The handlers of every error kind, and :class:`UnexpectedErrors` (added first, so innermost)."""
    app.add_middleware(UnexpectedErrors)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(request, exc)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return respond(request, from_engine_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return respond(request, validation_error(exc))

    @app.exception_handler(json.JSONDecodeError)
    async def _bad_json(request: Request, exc: json.JSONDecodeError):
        return respond(request, APIError(400, "the request body is not valid JSON", code="invalid_json"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"unknown route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return respond(request, APIError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # errors of the middleware outside the routes
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return internal_error().response()
