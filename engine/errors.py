"""Errors the engine raises for callers to map onto their own protocol (the server maps them to HTTP)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class; ``code`` is a short machine-readable reason."""

    code = "engine_error"


class InvalidRequest(EngineError, ValueError):
    code = "invalid_request"


class SessionNotFound(EngineError):
    code = "session_not_found"


class SessionBusy(EngineError):
    code = "session_busy"


class Overloaded(EngineError):
    """The queue is full; ``retry_after`` seconds is a fair guess of when to come back."""

    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(EngineError):
    code = "not_ready"


class ShuttingDown(EngineError):
    code = "shutting_down"
