"""``GET /health`` reports an unhealthy engine (repeated failed steps) with 503, its reason and a gauge."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings


class SickEngine:
    """Stands in for a loaded Engine whose ``health()`` says what the test sets."""

    def __init__(self) -> None:
        self.ready, self.model_name = True, "sick"
        self.state: tuple[bool, str | None] = (True, None)

    def health(self) -> tuple[bool, str | None]:
        return self.state

    def stats(self) -> dict:
        return {}


def test_health_follows_the_engine():
    engine = SickEngine()
    with TestClient(create_app(Settings(), engine=engine)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert "sinkserve_healthy 1.0" in client.get("/metrics").text
        engine.state = (False, "5 engine steps in a row failed: RuntimeError: device lost")
        sick = client.get("/health")
        assert sick.status_code == 503
        assert sick.json() == {"status": "unhealthy", "error": "5 engine steps in a row failed: RuntimeError: device lost"}
        assert "sinkserve_healthy 0.0" in client.get("/metrics").text
        engine.state = (True, None)
        assert client.get("/health").status_code == 200
