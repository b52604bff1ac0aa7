"""``GET /metrics``: Prometheus text exposition of this app's registry (``server/metrics.py``).

Format: https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
