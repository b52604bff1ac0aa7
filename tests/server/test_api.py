"""Models, health, authentication, sessions, metrics, limits and the CLI."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from server.app import create_app
from server.cli import build_parser, main
from server.settings import Settings
from tests.server.conftest import KEY_A, KEY_B, LiveServer

CHAT = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_models(sdk, engine):
    assert [m.id for m in sdk.models.list()] == [engine.model_name]
    assert sdk.models.retrieve(engine.model_name).id == engine.model_name


def test_auth(live):
    health = httpx.get(f"{live.url}/health").json()  # no key needed: load balancers call it
    assert health["status"] == "ok" and health["model"]["decode"] in ("owned", "transformers")
    assert httpx.get(f"{live.url}/v1/models").status_code == 401
    assert httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    for key in (KEY_A, KEY_B):
        assert httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_sessions_api(http, live):
    session = http.post(CHAT, json=BODY).headers["x-session-id"]
    listed = http.get("/v1/sessions").json()
    assert listed["object"] == "list" and session in [s["id"] for s in listed["data"]]
    info = http.get(f"/v1/sessions/{session}").json()
    assert info["object"] == "session" and info["tokens_seen"] > 0
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY_B}"}) as other:
        assert session not in [s["id"] for s in other.get("/v1/sessions").json()["data"]]
    deleted = http.delete(f"/v1/sessions/{session}")
    assert deleted.json() == {"id": session, "object": "session.deleted", "deleted": True}
    assert http.get(f"/v1/sessions/{session}").status_code == 404


def test_metrics(http):
    http.post(CHAT, json=BODY)
    text = httpx.get(f"{http.base_url}/metrics").text
    for name in ("sinkserve_http_requests_total", "sinkserve_time_to_first_token_seconds_bucket",
                 "sinkserve_inter_token_latency_seconds_count", "sinkserve_generated_tokens_total",
                 "sinkserve_prompt_tokens_total", "sinkserve_cached_tokens_total", "sinkserve_active_sessions",
                 "sinkserve_running_requests", "sinkserve_waiting_requests", "sinkserve_resident_cache_bytes",
                 "sinkserve_cache_budget_bytes", "sinkserve_decode_steps_total", "sinkserve_decode_rows_total",
                 "sinkserve_decode_forward_seconds_total", "sinkserve_decode_seconds_total"):
        assert name in text, name
    assert 'endpoint="/v1/chat/completions",status="200"' in text


def test_per_key_concurrency_limit(engine, eos_bias):
    live = LiveServer(create_app(Settings(max_concurrent_per_key=1, max_tokens_cap=300), engine=engine)).start()
    try:
        long = {**BODY, "max_tokens": 300, "stream": True, "logit_bias": eos_bias}
        with httpx.Client(base_url=live.url, timeout=30) as client:
            with client.stream("POST", CHAT, json=long) as first:
                lines = first.iter_lines()  # keep a reference: a collected iterator closes the response
                assert next(lines).startswith("data: ")
                second = client.post(CHAT, json=BODY)
                assert second.status_code == 429 and second.headers["retry-after"] == "1"
                assert second.json()["error"]["type"] == "rate_limit_error"
            assert client.post(CHAT, json=BODY).status_code == 200  # the slot came back
    finally:
        live.stop()


class SlowEngine:
    """Stands in for Engine: ``start`` blocks until the test releases it."""

    release = threading.Event()
    stopped = threading.Event()

    def __init__(self, config) -> None:
        self.config, self.ready, self.model_name = config, False, "slow"

    def start(self):
        assert self.release.wait(20)
        self.ready = True
        return self

    def stats(self) -> dict:
        return {}

    def drain(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped.set()


def test_health_while_loading():
    live = LiveServer(create_app(Settings(), engine_factory=SlowEngine)).start()
    try:
        loading = httpx.get(f"{live.url}/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        assert httpx.get(f"{live.url}/v1/models").status_code == 503
        SlowEngine.release.set()
        deadline = time.monotonic() + 5
        while httpx.get(f"{live.url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        live.stop()
    assert SlowEngine.stopped.is_set()


def test_settings_from_env(monkeypatch, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key\n")
    monkeypatch.setenv("SINKSERVE_API_KEYS", "a, b")
    monkeypatch.setenv("SINKSERVE_WINDOW", "500")
    monkeypatch.setenv("SINKSERVE_API_KEY_FILE", str(keys))
    monkeypatch.setenv("SINKSERVE_MAX_BATCH", "3")
    monkeypatch.setenv("SINKSERVE_PREFILL_CHUNK", "64")
    settings = Settings()
    assert settings.allowed_keys() == {"a", "b", "file-key"}
    config = settings.engine_config()
    assert (config.window, config.max_batch, config.prefill_chunk) == (500, 3, 64)


def test_cli_flags_override_env(monkeypatch):
    monkeypatch.setenv("SINKSERVE_PORT", "9000")
    args = build_parser().parse_args(["serve", "--window", "200", "--window", "300", "--api-key", "x",
                                      "--api-key", "y", "--pin-system-prompt", "--max-batch", "4",
                                      "--prefill-chunk", "128"])
    assert args.window == 300 and args.api_keys == ["x", "y"] and args.pin_system_prompt is True
    assert (args.max_batch, args.prefill_chunk) == (4, 128)
    assert args.port is None  # not given: the environment decides


def test_cli_requires_a_command():
    with pytest.raises(SystemExit):
        main([])
