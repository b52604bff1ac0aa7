"""``GET /health``: 200 ``{"status": "ok"}`` while the engine serves; 503 while loading, after a failed load,
or when the engine reports itself unhealthy (``Engine.health()``: several engine steps in a row failed),
with its reason. A cluster replica adds ``"session_store": "up"`` or ``"down"`` (Redis unreachable: it
still serves its local sessions, so it stays 200). ``"model"`` says which decode path the model takes:
``{"model_type": "llama", "family": "llama", "decode": "owned"}``, or ``"decode": "transformers"`` (with
``"family": null`` for a model type no family owns). No authentication, so load balancers and ``docker compose`` health checks can call it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


def engine_health(engine) -> tuple[bool, str | None]:
    """``engine.health()`` where the engine has it (stand-ins in tests may not), else healthy."""
    check = getattr(engine, "health", None)
    return check() if check is not None else (True, None)


def store_status(engine) -> str | None:
    """``up`` / ``down`` for a cluster replica's shared session store, None for a single server."""
    check = getattr(engine, "session_store_status", None)
    return check() if check is not None else None


def model_info(engine) -> dict | None:
    """``engine.model_info()`` where the engine has it (stand-ins in tests may not), else None."""
    info = getattr(engine, "model_info", None)
    return info() if info is not None else None


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    if state.load_error is not None:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    if state.engine is None or not state.engine.ready:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    healthy, reason = engine_health(state.engine)
    store = store_status(state.engine)
    extra = {"session_store": store} if store is not None else {}
    model = model_info(state.engine)
    extra.update({"model": model} if model is not None else {})
    if not healthy:
        return JSONResponse({"status": "unhealthy", "error": reason, **extra}, status_code=503)
    return JSONResponse({"status": "ok", **extra})  # a cluster replica whose Redis is down still serves
