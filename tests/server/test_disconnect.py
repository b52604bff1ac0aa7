"""A client that drops a stream must stop its generation within about one decode step."""

from __future__ import annotations

import time

import httpx

from tests.server.conftest import KEY_A


def generated(engine) -> int:
    return engine.stats()["generated_tokens"]


def test_disconnect_cancels_generation(live, engine, eos_bias):
    body = {"messages": [{"role": "user", "content": "Talk forever."}], "max_tokens": 2000,
            "stream": True, "logit_bias": eos_bias}
    before = generated(engine)
    client = httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 5:
                break
    client.close()  # drops the connection mid-stream
    time.sleep(1.0)
    settled = generated(engine)
    time.sleep(0.5)
    assert generated(engine) == settled, "the engine kept generating after the client left"
    assert settled - before < 1000
    assert engine.stats()["running"] == 0


def test_non_streaming_disconnect_cancels_generation(live, engine, eos_bias):
    body = {"messages": [{"role": "user", "content": "Talk on."}], "max_tokens": 2000, "logit_bias": eos_bias}
    before = generated(engine)
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=0.5) as client:
        try:
            client.post("/v1/chat/completions", json=body)
        except httpx.ReadTimeout:
            pass  # the client gives up and closes the connection
    time.sleep(1.0)
    settled = generated(engine)
    time.sleep(0.5)
    assert generated(engine) == settled and settled - before < 1000
    assert engine.stats()["running"] == 0
