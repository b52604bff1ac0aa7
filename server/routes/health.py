"""``GET /health``: 200 ``{"status": "ok"}`` once the model is loaded, 503 while loading or after a failed load.

No authentication, so load balancers and ``docker compose`` health checks can call it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    if state.load_error is not None:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    if state.engine is None or not state.engine.ready:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok"})
