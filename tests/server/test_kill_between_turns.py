"""kill -9 between two turns: after a restart the next turn continues from the saved cache."""

from __future__ import annotations

import httpx

from bench.serve_process import ServerProcess


def _chat(url: str, messages: list[dict], session_id: str | None = None) -> httpx.Response:
    body = {"messages": messages, "max_tokens": 6, "temperature": 0}
    headers = {"X-Session-Id": session_id} if session_id else {}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def test_restart_after_kill_reuses_the_saved_cache(tmp_path):
    data_dir = tmp_path / "sessions"
    history = [{"role": "user", "content": "Remember the word lighthouse. " * 5}]
    server = ServerProcess(data_dir, tiny=True).start()
    try:
        first = _chat(server.url, history)
        assert first.status_code == 200
        session_id = first.headers["x-session-id"]
        history += [first.json()["choices"][0]["message"], {"role": "user", "content": "Which word?"}]
        expected = _chat(server.url, history, session_id="reference-" + session_id[-8:])  # same turn, fresh
    finally:
        server.kill()  # SIGKILL right after the reply: no shutdown hook runs
    restarted = ServerProcess(data_dir, tiny=True).start()
    try:
        second = _chat(restarted.url, history, session_id=session_id)
        assert second.status_code == 200, second.text
        usage = second.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= first.json()["usage"]["prompt_tokens"]
        # greedy: the continued session answers exactly like a fresh prefill of the same history
        assert second.json()["choices"][0]["message"] == expected.json()["choices"][0]["message"]
    finally:
        restarted.kill()
