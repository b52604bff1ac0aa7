"""Malformed requests: each gets its documented status in the OpenAI error shape, never a 500.

Documented choices: empty-string content is accepted for every role (as OpenAI does); ``null`` content
only for ``assistant``; a session id that is not ``[A-Za-z0-9_-]{1,128}`` is a 400; another key's
session is a 404 (not 403, so ids reveal nothing).
"""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import KEY_A, KEY_B

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 2, **fields}


# (name, method, path, json body or raw bytes, extra headers, status, param)
CASES = [
    ("bad json", "POST", CHAT, b'{"messages": [', {}, 400, None),
    ("body not an object", "POST", CHAT, b"[1, 2]", {}, 400, None),
    ("missing messages", "POST", CHAT, {"max_tokens": 2}, {}, 400, "messages"),
    ("messages not a list", "POST", CHAT, {"messages": "hi"}, {}, 400, "messages"),
    ("empty messages", "POST", CHAT, {"messages": []}, {}, 400, "messages"),
    ("unknown role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, {}, 400, "messages.0.role"),
    ("tool message without its call", "POST", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, {}, 400,
     "messages.0.tool_call_id"),
    ("missing role", "POST", CHAT, {"messages": [{"content": "x"}]}, {}, 400, "messages.0.role"),
    ("null user content", "POST", CHAT, {"messages": [{"role": "user", "content": None}]}, {}, 400, "messages.0"),
    ("content a number", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, {}, 400,
     "messages.0.content"),
    ("image content part", "POST", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, {}, 400,
     "messages.0.content"),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), {}, 400, "max_tokens"),
    ("max_tokens negative", "POST", CHAT, chat(max_tokens=-5), {}, 400, "max_tokens"),
    ("max_tokens absurd", "POST", CHAT, chat(max_tokens=10**9), {}, 400, "max_tokens"),
    ("max_tokens a string", "POST", CHAT, chat(max_tokens="10"), {}, 400, "max_tokens"),
    ("max_completion_tokens zero", "POST", CHAT, chat(max_completion_tokens=0), {}, 400, "max_completion_tokens"),
    ("temperature negative", "POST", CHAT, chat(temperature=-0.1), {}, 400, "temperature"),
    ("temperature above 2", "POST", CHAT, chat(temperature=2.5), {}, 400, "temperature"),
    ("top_p above 1", "POST", CHAT, chat(top_p=1.5), {}, 400, "top_p"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), {}, 400, "top_p"),
    ("five stop strings", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), {}, 400, "stop"),
    ("n=2", "POST", CHAT, chat(n=2), {}, 400, "n"),
    ("top_logprobs 21", "POST", CHAT, chat(logprobs=True, top_logprobs=21), {}, 400, "top_logprobs"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), {}, 400, "top_logprobs"),
    ("logprobs wrong type", "POST", CHAT, chat(logprobs="yes"), {}, 400, "logprobs"),
    ("logit_bias bad key", "POST", CHAT, chat(logit_bias={"hello": 1}), {}, 400, "logit_bias"),
    ("logit_bias out of vocab", "POST", CHAT, chat(logit_bias={"99999999": 1}), {}, 400, None),
    ("logit_bias value 200", "POST", CHAT, chat(logit_bias={"5": 200}), {}, 400, "logit_bias"),
    ("presence_penalty 3", "POST", CHAT, chat(presence_penalty=3), {}, 400, "presence_penalty"),
    ("frequency_penalty -3", "POST", CHAT, chat(frequency_penalty=-3), {}, 400, "frequency_penalty"),
    ("stop a number", "POST", CHAT, chat(stop=5), {}, 400, "stop"),
    ("stream not a bool", "POST", CHAT, chat(stream="maybe"), {}, 400, "stream"),
    ("seed a float", "POST", CHAT, chat(seed=1.5), {}, 400, "seed"),
    ("bad session id", "POST", CHAT, chat(session_id="../etc"), {}, 400, "session_id"),
    ("bad session header", "POST", CHAT, chat(), {"X-Session-Id": "a/b"}, 400, None),
    ("unknown model", "POST", CHAT, chat(model="gpt-9"), {}, 404, "model"),
    ("oversize body", "POST", CHAT, b"{" + b" " * (5 * 1024 * 1024) + b"}", {}, 413, None),
    ("missing key", "POST", CHAT, chat(), {"Authorization": ""}, 401, None),
    ("wrong key", "POST", CHAT, chat(), {"Authorization": "Bearer nope"}, 401, None),
    ("not bearer", "POST", CHAT, chat(), {"Authorization": f"Basic {KEY_A}"}, 401, None),
    ("unknown route", "GET", "/v1/nothing", None, {}, 404, None),
    ("GET on a POST route", "GET", CHAT, None, {}, 405, None),
    ("unknown model card", "GET", "/v1/models/gpt-9", None, {}, 404, "model"),
    ("malformed session id", "GET", "/v1/sessions/bad.id", None, {}, 400, None),
    ("unknown session", "GET", "/v1/sessions/no-such-session", None, {}, 404, None),
    ("delete unknown session", "DELETE", "/v1/sessions/no-such-session", None, {}, 404, None),
    ("completions without prompt", "POST", "/v1/completions", {"max_tokens": 2}, {}, 400, "prompt"),
    ("completions two prompts", "POST", "/v1/completions", {"prompt": ["a", "b"]}, {}, 400, "prompt"),
    ("completions token id out of vocab", "POST", "/v1/completions", {"prompt": [1, 99999999]}, {}, 400,
     "prompt"),
    ("completions echo", "POST", "/v1/completions", {"prompt": "a", "echo": True}, {}, 400, "echo"),
    ("completions logprobs 6", "POST", "/v1/completions", {"prompt": "a", "logprobs": 6}, {}, 400, "logprobs"),
]


@pytest.mark.parametrize(("name", "method", "path", "body", "headers", "status", "param"), CASES,
                         ids=[case[0] for case in CASES])
def test_malformed_request(http, name, method, path, body, headers, status, param):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json", **headers}} \
        if isinstance(body, bytes) else {"json": body, "headers": headers}
    if headers.get("Authorization") == "":
        http.headers.pop("Authorization")
        kwargs["headers"] = {}
    response = http.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] in {"invalid_request_error", "authentication_error", "not_found_error"}
    if param is not None:
        assert error["param"] == param, error
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_another_keys_session_is_not_found(http, live):
    created = http.post(CHAT, json=chat())
    session = created.headers["x-session-id"]
    with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY_B}"}) as other:
        assert other.get(f"/v1/sessions/{session}").status_code == 404
        assert other.delete(f"/v1/sessions/{session}").status_code == 404
        reused = other.post(CHAT, json=chat(session_id=session))
        assert reused.status_code == 404 and reused.json()["error"]["code"] == "session_not_found"
    assert http.get(f"/v1/sessions/{session}").status_code == 200


def test_still_serving_after_the_errors(http):
    for _, method, path, body, _, _, _ in CASES[:5]:
        http.request(method, path, content=body if isinstance(body, bytes) else None,
                     json=None if isinstance(body, bytes) else body)
    response = http.post(CHAT, json=chat(messages=[{"role": "assistant", "content": None},
                                                   {"role": "user", "content": ""}]))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
