"""``GET /health``: 200 ``{"status": "ok"}`` while the engine serves; 503 while loading, after a failed load,
or when the engine reports itself unhealthy (``Engine.health()``: several engine steps in a row failed),
with its reason. No authentication, so load balancers and ``docker compose`` health checks can call it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


def engine_health(engine) -> tuple[bool, str | None]:
    """``engine.health()`` where the engine has it (stand-ins in tests may not), else healthy."""
    check = getattr(engine, "health", None)
    return check() if check is not None else (True, None)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    if state.load_error is not None:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    if state.engine is None or not state.engine.ready:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    healthy, reason = engine_health(state.engine)
    if not healthy:
        return JSONResponse({"status": "unhealthy", "error": reason}, status_code=503)
    return JSONResponse({"status": "ok"})
