"""Defects found by probing a real server: each reproduced against the live test server, then fixed.

Lone surrogates, out-of-range seeds and schemas that compile but cannot start are 400s naming the field
(and leave no session behind); a 500 keeps the kept-alive connection; the key's slot is taken before a
prompt is tokenized; legacy completions default to 16 tokens; client errors are logged with their
``param`` and user agent; history the server produced (cut tool-call arguments) is accepted back; strings
under a grammar leave room to close the JSON within ``max_tokens``.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from engine.prompts import PromptEncoder
from server.app import create_app
from server.settings import Settings
from server.structured import MIN_STRING_BOUND, bound_strings
from tests.server.conftest import KEY_A, LiveServer
from tests.tiny_models import tiny_engine

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 2, **fields}


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    return error


def session_ids(http: httpx.Client) -> set[str]:
    response = http.get("/v1/sessions")
    assert response.status_code == 200, response.text
    return {s["id"] for s in response.json()["data"]}


# ----- lone surrogates ----------------------------------------------------------------------------------
SURROGATE_CASES = [
    (CHAT, b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}', "messages.0.content"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "\\udfff"}', "user"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": ["x", "\\uDC00"]}',
     "stop.1"),
    (CHAT, b'{"messages": [{"role": "user", "content": "a\xed\xa0\x80"}], "max_tokens": 2}',
     "messages.0.content"),  # the surrogate's CESU-8 bytes, which json.loads passes through too
    ("/v1/completions", b'{"prompt": "\\ud83d", "max_tokens": 2}', "prompt"),
    ("/v1/responses", b'{"input": "hi", "max_output_tokens": 2, "metadata": {"k": "\\ud800"}}', "metadata.k"),
    ("/v1/responses", b'{"input": "hi", "max_output_tokens": 2, "user": "x\\ud800"}', "user"),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATE_CASES)
def test_lone_surrogate_is_a_400_naming_the_field(http, path, body, param):
    error = assert_error(http.post(path, content=body, headers={"Content-Type": "application/json"}), 400, param)
    assert "surrogate" in error["message"]


def test_paired_surrogates_and_escaped_backslashes_are_text(http):
    body = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 \\\\ud800"}], "max_tokens": 2}'
    response = http.post(CHAT, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text


# ----- seed ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1, 10**30])
def test_seed_outside_int64_is_a_400(http, seed):
    assert_error(http.post(CHAT, json=chat(seed=seed)), 400, "seed")


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63), -1, 0])
def test_seed_inside_int64_is_served(http, seed):
    response = http.post(CHAT, json=chat(seed=seed))
    assert response.status_code == 200, response.text


# ----- schemas that compile but cannot start ------------------------------------------------------------
ABUSIVE_SCHEMAS = {
    "refers to itself": {"$ref": "#"},
    "mutual refs": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "huge counted pattern": {"type": "object", "properties": {"x": {"type": "string", "pattern": "^a{1000000}$"}},
                             "required": ["x"]},
    "2000 untyped properties": {"type": "object", "properties": {f"p{i}": {} for i in range(2000)}},
    "required recursive object": {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]},
}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize("name", list(ABUSIVE_SCHEMAS))
def test_schema_that_cannot_start_is_a_400_and_leaves_no_session(http, name):
    before = session_ids(http)
    schema = ABUSIVE_SCHEMAS[name]
    assert_error(http.post(CHAT, json=chat(response_format=schema_format(schema))), 400,
                 "response_format.json_schema.schema")
    tools = [{"type": "function", "function": {"name": "ok", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "bad", "parameters": schema}}]
    assert_error(http.post(CHAT, json=chat(tools=tools, tool_choice="required")), 400, "tools[1].function.parameters")
    assert session_ids(http) == before


def test_a_failed_first_generation_leaves_no_session(http, engine, monkeypatch):
    """An engine failure after admission (here: a constraint that dies at the first step) on a stateless
    request: the 500 keeps nothing the store would list."""
    from engine.scheduling.grammar import Constraint

    assert http.post(CHAT, json=chat(response_format={"type": "json_object"})).status_code == 200  # compiled
    before = session_ids(http)
    monkeypatch.setattr(Constraint, "fill_mask", lambda self, row: (row.zero_(), False)[1])
    response = http.post(CHAT, json=chat(messages=[{"role": "user", "content": "a fresh conversation 8513"}],
                                         response_format={"type": "json_object"}))
    assert response.status_code == 500, response.text
    # nothing new is left (the key's session bound may have dropped an older idle one meanwhile)
    assert session_ids(http) - before == set()
    streamed = http.post(CHAT, json=chat(messages=[{"role": "user", "content": "another one 2291"}], stream=True,
                                         response_format={"type": "json_object"}))
    assert streamed.status_code == 200 and '"error"' in streamed.text, streamed.text
    assert session_ids(http) - before == set()


# ----- a 500 keeps the connection -----------------------------------------------------------------------
def test_a_500_keeps_the_connection(live, monkeypatch):
    import server.routes.chat as chat_route

    def broken(*args, **kwargs):
        raise RuntimeError("an unexpected failure")

    monkeypatch.setattr(chat_route, "plan_chat", broken)
    url = urlparse(live.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("POST", CHAT, body=json.dumps(chat()), headers=AUTH)
        first = conn.getresponse()
        body = json.loads(first.read())
        assert first.status == 500 and body["error"]["type"] == "server_error", body
        sock = conn.sock
        monkeypatch.undo()
        conn.request("POST", CHAT, body=json.dumps(chat()), headers=AUTH)  # the same socket, kept alive
        second = conn.getresponse()
        second.read()
        assert second.status == 200
        assert conn.sock is sock
    finally:
        conn.close()


# ----- costly work after the slot -----------------------------------------------------------------------
@pytest.fixture
def one_slot(tmp_path):
    engine = tiny_engine(tmp_path)
    server = LiveServer(create_app(Settings(api_keys=[KEY_A], max_concurrent_per_key=1, max_prompt_tokens=100), engine=engine)).start()
    yield server, engine
    server.stop()
    engine.stop()


def test_tokenizing_holds_the_keys_slot_in_its_own_pool(one_slot, monkeypatch):
    server, engine = one_slot
    entered, release, threads = threading.Event(), threading.Event(), []
    render = engine.render_chat

    def slow_render(*args, **kwargs):
        threads.append(threading.current_thread().name)
        entered.set()
        release.wait(30)
        return render(*args, **kwargs)

    monkeypatch.setattr(engine, "render_chat", slow_render)
    results = []
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        first = threading.Thread(target=lambda: results.append(client.post(CHAT, json=chat())))
        first.start()
        try:
            assert entered.wait(30)
            started = time.monotonic()
            second = client.post(CHAT, json=chat())  # the key's only slot is held by the tokenizing request
            assert_error(second, 429, None)
            assert time.monotonic() - started < 10
            assert len(threads) == 1 and threads[0].startswith("tokenize")
        finally:
            release.set()
            first.join(60)
    assert results and results[0].status_code == 200, results
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:  # the slot came back
        assert client.post(CHAT, json=chat()).status_code == 200
        for _ in range(3):  # refused after tokenizing: the slot is given back each time
            long = chat(messages=[{"role": "user", "content": "word " * 300}])
            assert_error(client.post(CHAT, json=long), 400, "messages")
        assert client.post(CHAT, json=chat()).status_code == 200


def test_the_prefix_table_keeps_no_huge_prompt(engine):
    encoder = PromptEncoder(engine.tokenizer, max_prefix_tokens=50, max_total_tokens=120)
    if not encoder.enabled:
        pytest.skip("this tokenizer does not split cleanly at special tokens")
    special = engine.tokenizer.all_special_tokens[0]
    huge = f"{special}{'word ' * 200}{special}tail"
    assert encoder.encode(huge) == encoder._encode(huge)
    assert not encoder.prefixes  # longer than max_prefix_tokens: not kept
    for i in range(10):
        encoder.encode(f"{special}{'x' * (i + 5)} some words{special}more")
    assert 0 < encoder.total_tokens <= 120
    assert encoder.total_tokens == sum(len(ids) for ids in encoder.prefixes.values())


# ----- legacy completions default -----------------------------------------------------------------------
def test_legacy_completions_default_to_16_tokens(http, eos_bias):
    response = http.post("/v1/completions", json={"prompt": "once upon a time", "logit_bias": eos_bias})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 16
    assert response.json()["choices"][0]["finish_reason"] == "length"


# ----- client errors in the log -------------------------------------------------------------------------
def test_client_errors_are_logged_with_param_route_and_user_agent(http, caplog):
    caplog.set_level(logging.INFO, logger="server.errors")
    assert_error(http.post(CHAT, json=chat(temperature=7), headers={"User-Agent": "probe-agent/1.0"}), 400,
                 "temperature")
    assert_error(http.post(CHAT, json=chat(model="gpt-9"), headers={"User-Agent": "probe-agent/2.0"}), 404, "model")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len([r for r in caplog.records if "probe-agent" in r.getMessage()]) < 2:
        time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "probe-agent" in r.getMessage()]
    assert len(lines) == 2, lines
    assert all(r.levelno == logging.INFO for r in caplog.records if "probe-agent" in r.getMessage())
    assert CHAT in lines[0] and "param=temperature" in lines[0] and "400" in lines[0] and "probe-agent/1.0" in lines[0]
    assert "param=model" in lines[1] and "404" in lines[1] and "gpt-9" in lines[1]


# ----- the server's own history -------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_a_tool_call_cut_by_max_tokens_is_accepted_back(http):
    cut = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Par'}}]}
    messages = [*USER, cut, {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    response = http.post(CHAT, json={"messages": messages, "tools": [WEATHER], "max_tokens": 2})
    assert response.status_code == 200, response.text


# ----- room to close the JSON ---------------------------------------------------------------------------
NESTED = {"type": "object", "additionalProperties": False, "required": ["a", "b"], "properties": {
    "a": {"type": "string"},
    "b": {"type": "object", "additionalProperties": False, "required": ["c"],
          "properties": {"c": {"type": "string"}}}}}


def test_bound_strings_shares_the_budget():
    bounded = bound_strings(NESTED, 60)
    a, c = bounded["properties"]["a"]["maxLength"], bounded["properties"]["b"]["properties"]["c"]["maxLength"]
    assert a == c and MIN_STRING_BOUND <= a <= 30
    assert bound_strings(NESTED, None) is NESTED
    own = {"type": "object", "properties": {"x": {"type": "string", "maxLength": 500}, "y": {"enum": ["q"]}}}
    assert bound_strings(own, 60) == own  # a schema's own bounds win
    assert bound_strings({"type": "string", "minLength": 200}, 60)["maxLength"] == 200  # never below minLength
    assert bound_strings({"type": ["string", "null"]}, 60)["maxLength"] >= MIN_STRING_BOUND
    choice = bound_strings({"anyOf": [{"type": "string"}, NESTED]}, 100)  # one branch is written: its load counts
    assert choice["anyOf"][0]["maxLength"] == choice["anyOf"][1]["properties"]["a"]["maxLength"] > 30


def test_strings_leave_room_to_close_the_object(http, eos_bias):
    """A random model at temperature 1 rarely writes a closing quote: without a bound its strings run to
    ``max_tokens``; with it every reply closes the object in time."""
    for seed in range(4):
        response = http.post(CHAT, json=chat(max_tokens=60, temperature=1.0, seed=seed,
                                             response_format=schema_format(NESTED)))
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        reply = json.loads(choice["message"]["content"])
        assert set(reply) == {"a", "b"} and set(reply["b"]) == {"c"}


# ----- JSON deeper than Python decodes (FastAPI reports it as invalid JSON: kept as a guard) -------------
@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000,
                                  b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"])
def test_deeply_nested_json_is_a_400(http, body):
    assert_error(http.post(CHAT, content=body, headers={"Content-Type": "application/json"}), 400, None)
