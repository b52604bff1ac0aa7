"""Graceful shutdown of the real ``serve`` process: SIGTERM mid-stream ends the stream properly."""

from __future__ import annotations

import json
import signal
import time

import httpx

from bench.serve_process import ServerProcess
from bench.tiny_server import BAN_SPECIAL

GRACE = 3.0


def test_sigterm_mid_stream_finishes_the_stream_and_persists_the_session(tmp_path):
    server = ServerProcess(tmp_path / "sessions", "--graceful-timeout", str(GRACE), tiny=True,
                           env={"SINKSERVE_MAX_TOKENS_CAP": "1000000"}).start()
    try:
        body = {"messages": [{"role": "user", "content": "Talk forever."}], "max_tokens": 1_000_000,
                "stream": True, "logit_bias": BAN_SPECIAL}
        data, session_id, sent_at = [], None, None
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            session_id = response.headers["x-session-id"]
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data.append(line.removeprefix("data: "))
                if len(data) == 5:
                    sent_at = time.monotonic()
                    server.proc.send_signal(signal.SIGTERM)
                    time.sleep(0.3)  # the listener is closed: a new connection is refused
                    try:
                        httpx.get(f"{server.url}/health", timeout=2)
                        refused = False
                    except httpx.TransportError:
                        refused = True
                    assert refused, "the server still accepts connections after SIGTERM"
        ended_at = time.monotonic()
        assert sent_at is not None, "the stream ended before SIGTERM was sent"
        assert data[-1] == "[DONE]", data[-3:]
        finish = json.loads(data[-2])
        assert finish["choices"][0]["finish_reason"] == "length", finish
        assert "error" not in finish
        assert ended_at - sent_at < GRACE + 1.0
        assert server.proc.wait(timeout=GRACE + 5) == 0
        assert time.monotonic() - sent_at < GRACE + 5
        assert (tmp_path / "sessions" / f"{session_id}.safetensors").exists()
    finally:
        server.kill()
