"""The Responses API as Codex CLI and other clients send it (tiny engine, real uvicorn): fields that ask for
nothing this model has accepted, namespace and hosted tools, outputs without ``call_id``, logprobs, and the
bounds on what a response stores (echoed strings, stored responses per key, concurrent continuations)."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest
from openai.types.responses import Response

from server.app import create_app
from server.responses import store as store_module
from server.responses.protocol import ResponseCreateRequest
from server.settings import Settings
from tests.server.conftest import KEY_A, KEY_B, LiveServer

NS_TOOL = {"type": "namespace", "name": "agents", "description": "Sub-agents.",
           "tools": [{"type": "function", "name": "spawn", "description": "Start one.", "strict": False,
                      "parameters": {"type": "object", "properties": {"task": {"enum": ["a", "b"]}},
                                     "required": ["task"], "additionalProperties": False}}]}
SHELL = {"type": "function", "name": "exec_command", "description": "Run a command.", "strict": False,
         "parameters": {"type": "object", "properties": {"cmd": {"enum": ["echo hi"]}}, "required": ["cmd"],
                        "additionalProperties": False}}
CODEX = {  # the fields Codex CLI 0.171 sends besides its prompt (its first request, captured)
    "stream": True, "store": False, "tool_choice": "auto", "parallel_tool_calls": True,
    "reasoning": {"summary": "auto", "effort": "medium"}, "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "01a2539b-d101-7ae2-a1a6-af0e1148614d",
    "client_metadata": {"session_id": "01a2539b", "x-codex-turn-metadata": json.dumps({"turn": "x" * 600})},
    "tools": [SHELL, NS_TOOL, {"type": "web_search", "external_web_access": True}],
}


def post(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/responses", json={"max_output_tokens": 8, "temperature": 0, **body})


def events(reply: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: ")]


def test_codex_request_is_accepted_and_hosted_tools_named(http):
    input_ = [{"type": "message", "role": "developer", "id": "m1",
               "content": [{"type": "input_text", "text": "You are a coding agent."}]},
              {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "run echo hi"}]}]
    reply = post(http, input=input_, **CODEX)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-sinkserve-ignored-tools"] == "web_search"
    final = events(reply)[-1]
    assert final["type"] in ("response.completed", "response.incomplete")
    Response.model_validate(final["response"])
    assert final["response"]["reasoning"] is None  # no reasoning was done, none is claimed


def test_namespaced_call_comes_back_with_its_namespace_and_replays(http):
    body = {"input": "start an agent", "tools": [NS_TOOL], "tool_choice": "required", "max_output_tokens": 40}
    reply = post(http, **body)
    assert reply.status_code == 200, reply.text
    calls = [item for item in reply.json()["output"] if item["type"] == "function_call"]
    assert calls and calls[0]["namespace"] == "agents" and calls[0]["name"] == "spawn", reply.json()["output"]
    assert json.loads(calls[0]["arguments"])["task"] in ("a", "b")
    chained = post(http, previous_response_id=reply.json()["id"], tools=[NS_TOOL],
                   input=[{"type": "function_call_output", "name": "spawn", "namespace": "agents", "output": "ok"}])
    assert chained.status_code == 200, chained.text  # matched by name, no call_id


def test_outputs_without_call_id_match_by_name_then_order(http):
    calls = [{"type": "function_call", "call_id": "c1", "name": "exec_command", "arguments": "{}"},
             {"type": "function_call", "call_id": "c2", "name": "other", "arguments": "{}"}]
    by_name = [{"type": "function_call_output", "name": "other", "output": "2"},
               {"type": "function_call_output", "output": "1"}]
    reply = post(http, input=[{"role": "user", "content": "go"}, *calls, *by_name])
    assert reply.status_code == 200, reply.text
    orphan = post(http, input=[{"role": "user", "content": "go"}, calls[0], *by_name])
    assert orphan.status_code == 400 and orphan.json()["error"]["param"] == "input.2.call_id", orphan.text


def test_output_text_logprobs_when_included(http):
    reply = post(http, input="count", include=["message.output_text.logprobs"], top_logprobs=2)
    assert reply.status_code == 200, reply.text
    text = reply.json()["output"][0]["content"][0]
    assert len(text["logprobs"]) == reply.json()["usage"]["output_tokens"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in text["logprobs"])
    streamed = post(http, input="count", include=["message.output_text.logprobs"], stream=True)
    deltas = [e for e in events(streamed) if e["type"] == "response.output_text.delta"]
    assert sum(len(d["logprobs"]) for d in deltas) >= 1
    assert post(http, input="x", top_logprobs=2).status_code == 400  # logprobs were not asked for


@pytest.mark.parametrize(("field", "value"), [
    ("user", "u" * 257), ("prompt_cache_key", "k" * 257), ("safety_identifier", "s" * 129),
    ("metadata", {"k": "v" * 513}), ("client_metadata", {f"k{i}": "v" for i in range(33)}),
])
def test_echoed_fields_are_bounded(http, field, value):
    reply = post(http, input="x", **{field: value})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == field, reply.text


def test_client_metadata_is_stored(http, engine):
    reply = post(http, input="x", client_metadata={"thread_id": "t-1"})
    assert reply.status_code == 200, reply.text
    path = engine.config.data_dir / "responses" / f"{reply.json()['id']}.json"
    assert json.loads(path.read_text())["extra"] == {"client_metadata": {"thread_id": "t-1"}}


@pytest.fixture
def small_store(engine, monkeypatch):
    """A server of its own whose store keeps two responses per key."""
    monkeypatch.setattr(store_module, "MAX_PER_OWNER", 2)
    server = LiveServer(create_app(Settings(api_keys=["full-key", KEY_B]), engine=engine)).start()
    yield server
    server.stop()


def test_stored_responses_per_key_are_bounded(small_store):
    with httpx.Client(base_url=small_store.url, headers={"Authorization": "Bearer full-key"}, timeout=60) as http:
        ids = [post(http, input="x").json()["id"] for _ in range(2)]
        full = post(http, input="x")
        assert full.status_code == 429, full.text
        assert full.json()["error"]["code"] == "stored_responses_limit" and full.json()["error"]["param"] == "store"
        assert post(http, input="x", store=False).status_code == 200  # not stored: not counted
        assert http.delete(f"/v1/responses/{ids[0]}").status_code == 200
        assert post(http, input="x").status_code == 200  # room again


def test_concurrent_continuations_of_one_response_are_both_served(http, live, caplog, eos_bias, monkeypatch):
    caplog.set_level(logging.INFO, logger="server.responses.route")
    bias = {int(token): value for token, value in eos_bias.items()}  # no early end: the two overlap
    monkeypatch.setattr(ResponseCreateRequest, "requested_options", lambda self: {"logit_bias": bias})
    # a reply forced to end by its grammar, so the continuations extend its session exactly (no divergence)
    fmt = {"type": "json_schema", "name": "word", "schema": {"type": "string", "enum": ["ok"]}}
    first = post(http, input="begin", max_output_tokens=20, text={"format": fmt})
    assert first.status_code == 200, first.text
    body = {"previous_response_id": first.json()["id"], "max_output_tokens": 4000, "temperature": 0}
    results: dict[str, httpx.Response] = {}

    def continue_(name: str) -> None:
        with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=120) as client:
            results[name] = client.post("/v1/responses", json={**body, "input": f"continue {name}"})

    threads = [threading.Thread(target=continue_, args=(name,)) for name in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert sorted(r.status_code for r in results.values()) == [200, 200], {k: r.text for k, r in results.items()}
    sessions = {r.json()["sinkserve"]["session_id"] for r in results.values()}
    assert len(sessions) == 2  # the second continuation ran on a fork
    assert "is busy with another continuation" in caplog.text  # they did overlap


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "user": "\ud800"}, "user"),
    ({"input": "x", "metadata": {"k": "a\udfffb"}}, "metadata.k"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "\ud800"}]}]}, "input.0.content.0.text"),
])
def test_lone_surrogates_are_refused_before_they_are_stored(http, body, param):
    raw = json.dumps({"max_output_tokens": 2, **body})  # ensure_ascii: the surrogate travels as \ud800
    reply = http.post("/v1/responses", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text


def test_include_of_a_stored_response(http):
    created = post(http, input="x")
    path = f"/v1/responses/{created.json()['id']}"
    assert http.get(path, params={"include": "reasoning.encrypted_content"}).status_code == 200
    refused = http.get(path, params={"include": "file_search_call.results"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "include", refused.text
    assert http.get(path + "/input_items", params={"include[]": "message.output_text.logprobs"}).status_code == 200
