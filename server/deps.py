"""Dependencies routes declare with ``Annotated`` aliases: the engine, settings, the caller's key.

Pattern from full-stack-fastapi-template (``backend/app/api/deps.py``). Authentication is an OpenAI-style
bearer token (RFC 6750) or Anthropic's ``x-api-key`` header; when no keys are configured every caller
shares the anonymous scope.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from engine import Engine
from server.errors import APIError
from server.limits import KeyLimiter
from server.metrics import Metrics
from server.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    engine = request.app.state.engine
    if engine is None or not engine.ready:
        raise APIError(503, "the model is still loading", code="model_loading", headers={"Retry-After": "5"})
    return engine


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_limiter(request: Request) -> KeyLimiter:
    return request.app.state.limiter


def get_api_key(request: Request) -> str | None:
    """The caller's key when authentication is on (401 if absent or unknown), else ``None``."""
    keys: frozenset[str] = request.app.state.api_keys
    if not keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    token = token or request.headers.get("x-api-key", "").strip()  # Anthropic's header
    if not token:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                       code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not any(secrets.compare_digest(token.encode(), key.encode()) for key in keys):
        raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return token


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
LimiterDep = Annotated[KeyLimiter, Depends(get_limiter)]
ApiKeyDep = Annotated[str | None, Depends(get_api_key)]
