"""The server's side of a cluster, in-process (uvicorn on loopback, tiny engines): the replica and
session-source headers, ``/health``'s ``session_store`` and the metrics; a single server (no
``--session-store``) sends none of them; the settings and the CLI flags reach the engine config."""

from __future__ import annotations

import httpx
import pytest

from server.app import create_app
from server.cli import build_parser
from server.settings import Settings
from tests.server.conftest import LiveServer
from tests.tiny_models import tiny_engine

BAN_SPECIAL = {"0": -100, "1": -100, "2": -100}


def chat(url: str, messages: list[dict], session_id: str | None = None) -> httpx.Response:
    headers = {"X-Session-Id": session_id} if session_id else {}
    body = {"model": "tiny-llama", "messages": messages, "max_tokens": 4, "temperature": 0, "logit_bias": BAN_SPECIAL}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response


@pytest.fixture
def servers(tmp_path, redis_server):
    redis_server.proc.poll() is None or redis_server.start()
    engines, lives = [], []
    for name in ("r1", "r2"):
        engine = tiny_engine(tmp_path, replica=name, session_store=redis_server.url)
        engines.append(engine)
        lives.append(LiveServer(create_app(Settings(), engine=engine)).start())
    yield lives
    for live, engine in zip(lives, engines, strict=True):
        live.stop()
        engine.stop()


def test_replica_headers_health_and_metrics(servers):
    r1, r2 = servers
    messages = [{"role": "user", "content": "hello there"}]
    first = chat(r1.url, messages, "srv-conv")
    assert first.headers["x-sinkserve-replica"] == "r1"
    assert first.headers["x-sinkserve-session-source"] == "prefill"
    messages += [{"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "and then?"}]
    second = chat(r1.url, messages, "srv-conv")
    assert second.headers["x-sinkserve-session-source"] == "local"
    messages += [{"role": "assistant", "content": second.json()["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "and after that?"}]
    moved = chat(r2.url, messages, "srv-conv")
    assert moved.headers["x-sinkserve-replica"] == "r2"
    assert moved.headers["x-sinkserve-session-source"] == "shared"
    assert moved.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    health = httpx.get(f"{r2.url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["session_store"] == "up"
    metrics = httpx.get(f"{r2.url}/metrics", timeout=5).text
    assert 'sinkserve_session_requests_total{source="shared"} 1.0' in metrics
    assert "sinkserve_session_store_up 1.0" in metrics


def test_single_server_sends_no_cluster_headers(tmp_path):
    engine = tiny_engine(tmp_path)
    live = LiveServer(create_app(Settings(), engine=engine)).start()
    try:
        response = chat(live.url, [{"role": "user", "content": "hello"}])
        assert "x-sinkserve-replica" not in response.headers
        assert "x-sinkserve-session-source" not in response.headers
        assert "session_store" not in httpx.get(f"{live.url}/health", timeout=5).json()
        metrics = httpx.get(f"{live.url}/metrics", timeout=5).text
        assert "sinkserve_session_store_up" not in metrics
        assert 'sinkserve_session_requests_total{source="prefill"} 1.0' in metrics
    finally:
        live.stop()
        engine.stop()


def test_flags_and_environment_reach_the_engine_config(monkeypatch):
    args = build_parser().parse_args(["serve", "--session-store", "redis://h:1/0", "--replica-name", "r7"])
    assert (args.session_store, args.replica) == ("redis://h:1/0", "r7")
    monkeypatch.setenv("SINKSERVE_SESSION_STORE", "redis://e:2/0")
    monkeypatch.setenv("SINKSERVE_REPLICA", "env-replica")
    config = Settings().engine_config()
    assert (config.session_store, config.replica) == ("redis://e:2/0", "env-replica")
    assert Settings(session_store=None, replica=None).engine_config().session_store is None
