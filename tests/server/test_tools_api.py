"""Structured outputs and tool calls over HTTP (tiny random model, real uvicorn, httpx and the openai SDK).

The random model writes nonsense, so every shape here is the grammar's doing: a reply that validates
against the schema, tool calls whose arguments validate against the tool's parameters, OpenAI's
streaming deltas, and 400s naming the field for every bad tool or format (nothing queued). The real
clients against the embedded model are tests/server/test_clients_structured.py (slow).
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from server.structured import MAX_SCHEMA_CHARS

SMALL = {  # short enough that the random model always finishes it
    "type": "object",
    "properties": {"unit": {"enum": ["c", "f"]}, "rain": {"type": "boolean"},
                   "days": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 2}},
    "required": ["unit", "rain", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": SMALL}},
    {"type": "function", "function": {"name": "ping", "description": "No arguments"}},
]
USER = [{"role": "user", "content": "What is the weather?"}]


def chat(http, **body):
    body = {"messages": USER, "max_tokens": 60, "temperature": 1.0, **body}
    return http.post("/v1/chat/completions", json=body)


def events(http, **body) -> list[dict]:
    body = {"messages": USER, "max_tokens": 60, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}, **body}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_json_schema_reply_validates(http):
    for seed in range(3):
        r = chat(http, seed=seed, response_format={"type": "json_schema",
                                                   "json_schema": {"name": "w", "schema": SMALL, "strict": True}})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SMALL)


def test_json_object_and_text(http):
    r = chat(http, seed=1, max_tokens=200, response_format={"type": "json_object"})
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:  # cut by max_tokens: an incomplete object, still a JSON object's beginning
        assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")
    plain = chat(http, seed=1, max_tokens=5, response_format={"type": "text"}).json()["choices"][0]
    assert plain["message"]["tool_calls"] is None and isinstance(plain["message"]["content"], str)


def test_length_cuts_the_json(http):
    r = chat(http, seed=0, max_tokens=3, response_format={"type": "json_schema",
                                                          "json_schema": {"name": "w", "schema": SMALL}})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call(http, tool_choice):
    r = chat(http, seed=3, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    message = choice["message"]
    assert message["content"] is None and len(message["tool_calls"]) == 1
    call = message["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    schema = {t["function"]["name"]: t["function"].get("parameters", {}) for t in TOOLS}
    if isinstance(tool_choice, dict):
        assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), schema[call["function"]["name"]])


def test_streamed_tool_call_deltas(http):
    chunks = events(http, seed=3, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    first = chunks[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": None}
    deltas = [c["choices"][0]["delta"] for c in chunks[1:] if c["choices"] and c["choices"][0]["delta"]]
    calls = [d["tool_calls"][0] for d in deltas]
    assert all("content" not in d for d in deltas)
    head = calls[0]
    assert set(head) == {"index", "id", "type", "function"} and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:])
    arguments = "".join(c["function"]["arguments"] for c in calls)
    jsonschema.validate(json.loads(arguments), SMALL)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finish] == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


def test_sdk_stream_assembles_tool_calls(sdk):
    with sdk.chat.completions.stream(model="tiny-llama", messages=USER, tools=TOOLS, tool_choice="required",
                                     max_tokens=60, temperature=1.0, seed=4) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.function.name in ("get_weather", "ping")
        assert isinstance(json.loads(call.function.arguments), dict)


def test_tool_history_is_accepted(http):
    """A call and its result sent back render and generate (the cache reuse of such a turn needs a real
    window: tests/server/test_clients_structured.py)."""
    first = chat(http, seed=5, tools=TOOLS, tool_choice="required").json()
    call = first["choices"][0]["message"]["tool_calls"][0]
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": call["id"], "content": [{"type": "text", "text": "12 degrees"}]}]
    second = chat(http, messages=history, seed=5, max_tokens=8, tools=TOOLS)
    assert second.status_code == 200, second.text
    assert second.json()["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]


HUGE = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 40} for i in range(800)}}


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object",
      "properties": {"a": {"type": "string", "uniqueItems": True, "minLength": "x"}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": HUGE}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SMALL}}}, "response_format.json_schema.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"messages": [*USER, {"role": "tool", "tool_call_id": "call_x", "content": "42"}]}, "messages[1].tool_call_id"),
    ({"messages": [*USER, {"role": "tool", "content": "42"}]}, "messages.1.tool_call_id"),
    ({"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),  # without tools it would ask for nothing
])
def test_bad_tools_and_formats_name_the_field(http, engine, body, param):
    before = dict(engine.scheduler.counters), len(engine.scheduler.store.sessions)
    r = chat(http, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert (dict(engine.scheduler.counters), len(engine.scheduler.store.sessions)) == before  # nothing queued


def test_huge_schema_states_the_limit(http):
    r = chat(http, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": HUGE}})
    assert r.status_code == 400 and str(MAX_SCHEMA_CHARS) in r.json()["error"]["message"]
