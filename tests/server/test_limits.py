"""Every request limit, each configurable in Settings, each with its documented error."""

from __future__ import annotations

import threading

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.server.conftest import LiveServer
from tests.tiny_models import tiny_engine

CHAT = "/v1/chat/completions"
KEYS = ["key-1", "key-2", "key-3"]
LIMITS = dict(max_body_bytes=2000, max_messages=3, max_prompt_tokens=80, max_tokens_cap=5000,
              max_concurrent_per_key=1)


def user(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """One resident session row and a queue of one, so the second waiter is refused."""
    engine = tiny_engine(tmp_path_factory.mktemp("limits"), max_queue=1, max_resident_sessions=1)
    server = LiveServer(create_app(Settings(api_keys=KEYS, **LIMITS), engine=engine)).start()
    yield server, engine
    server.stop()
    engine.stop()


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_settings_defaults_and_env(monkeypatch):
    s = Settings()
    assert (s.max_body_bytes, s.max_messages, s.max_tokens_cap, s.max_concurrent_per_key, s.max_queue) == (
        4 * 1024 * 1024, 2048, 4096, 16, 256)
    monkeypatch.setenv("SINKSERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("SINKSERVE_MAX_PROMPT_TOKENS", "99")
    s = Settings()
    assert s.max_queue == 7 and s.engine_config().max_queue == 7 and s.max_prompt_tokens == 99


def test_small_window_gets_a_small_eviction_block():
    assert Settings(window=60).engine_config().evict_block == 60


def test_body_bytes(limited):
    server, _ = limited
    with client(server.url, KEYS[0]) as http:
        body = error(http.post(CHAT, json={"messages": user("x" * 3000), "max_tokens": 1}), 413)
        assert body["code"] == "body_too_large" and "2000" in body["message"]


def test_messages_per_request(limited):
    server, _ = limited
    with client(server.url, KEYS[0]) as http:
        body = error(http.post(CHAT, json={"messages": user() * 4, "max_tokens": 1}), 400)
        assert body["param"] == "messages" and body["code"] == "too_many_messages" and "3" in body["message"]
        assert http.post(CHAT, json={"messages": user() * 3, "max_tokens": 1}).status_code == 200


def test_prompt_tokens(limited):
    server, _ = limited
    with client(server.url, KEYS[0]) as http:
        body = error(http.post(CHAT, json={"messages": user("hello " * 100), "max_tokens": 1}), 400)
        assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
        assert "80" in body["message"] and "max_prompt_tokens" in body["message"]
        body = error(http.post("/v1/completions", json={"prompt": list(range(81)), "max_tokens": 1}), 400)
        assert body["code"] == "context_length_exceeded" and body["param"] == "prompt"


def test_max_tokens_cap(limited):
    server, _ = limited
    with client(server.url, KEYS[0]) as http:
        for path, body in ((CHAT, {"messages": user()}), ("/v1/completions", {"prompt": "hi"})):
            err = error(http.post(path, json={**body, "max_tokens": 5001}), 400)
            assert err["param"] == "max_tokens" and "5000" in err["message"]
        err = error(http.post(CHAT, json={"messages": user(), "max_completion_tokens": 5001}), 400)
        assert "5000" in err["message"]


def test_concurrency_per_key_and_queue_length(limited):
    server, engine = limited
    ban = {str(t): -100 for t in engine.loaded.eos_token_ids}
    long = {"messages": user("talk"), "max_tokens": 5000, "stream": True, "logit_bias": ban}
    with client(server.url, KEYS[0]) as a, client(server.url, KEYS[1]) as b, client(server.url, KEYS[2]) as c:
        with a.stream("POST", CHAT, json=long) as running:  # holds the only session row
            assert running.status_code == 200
            lines = running.iter_lines()
            assert all(next(lines) is not None for _ in range(4))
            # the same key again: its one concurrent slot is taken
            err = error(a.post(CHAT, json={"messages": user(), "max_tokens": 1}), 429)
            assert err["code"] == "concurrency_limit_exceeded"
            # another key waits for admission (the row is busy) and fills the queue of one ...
            waiter: dict = {}
            thread = threading.Thread(target=lambda: waiter.update(
                r=b.post(CHAT, json={"messages": user("wait"), "max_tokens": 1})))
            thread.start()
            deadline = threading.Event()
            while engine.stats()["waiting"] < 1 and not deadline.wait(0.01):
                pass
            # ... so a third key is refused with 429 and a Retry-After
            response = c.post(CHAT, json={"messages": user("more"), "max_tokens": 1})
            err = error(response, 429)
            assert err["code"] == "overloaded" or "waiting" in err["message"]
            assert int(response.headers["retry-after"]) >= 1
        thread.join(timeout=30)  # the long stream closed: the waiter gets the row
        assert waiter["r"].status_code == 200
