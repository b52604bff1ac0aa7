"""No silent ignoring: every field of OpenAI's chat and legacy completion requests (the ``openai`` SDK's
``CompletionCreateParams``) is honoured or refused with a 400 naming it (tiny model, real uvicorn).

The tables must cover the SDK's whole parameter list: a field the SDK adds fails
``test_the_tables_cover_the_sdk`` until it is honoured or refused here and in server/protocol.py.
"""

from __future__ import annotations

import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from server.protocol import OFF_FIELDS, ChatCompletionRequest, CompletionRequest
from server.structured import INTEGER_BOUND, bound_integers

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
USER = [{"role": "user", "content": "hi"}]

HONOURED = {  # a value that asks for something this server does: 200
    "messages": USER, "model": "tiny-llama", "frequency_penalty": 0.5, "logit_bias": {"5": 1.0}, "logprobs": True,
    "max_completion_tokens": 2, "max_tokens": 2, "n": 1, "parallel_tool_calls": False, "presence_penalty": 0.1,
    "prompt_cache_key": "conversation-1", "response_format": {"type": "json_object"}, "safety_identifier": "u-1",
    "seed": 1, "stop": ["\n\n"], "stream": False, "stream_options": {"include_usage": True}, "temperature": 0.5,
    "tool_choice": "none", "tools": TOOLS, "top_logprobs": 2, "top_p": 0.9, "user": "u-1",
}
REFUSED = {  # a value that asks for something this server cannot do: 400 naming the field
    "audio": {"voice": "alloy", "format": "wav"}, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "metadata": {"team": "a"},
    "modalities": ["text", "audio"], "moderation": {"model": "omni-moderation-latest"},
    "prediction": {"type": "content", "content": "x"}, "prompt_cache_options": {"mode": "explicit"},
    "prompt_cache_retention": "24h", "reasoning_effort": "high", "service_tier": "flex", "store": True,
    "verbosity": "low", "web_search_options": {},
}
ACCEPTED_OFF = {"modalities": ["text"], "store": False, "service_tier": "auto", "metadata": {}, "reasoning_effort": "none"}
REFUSED_HONOURED = {"n": 2, "logprobs": "yes", "stream_options": {"include_obfuscation": True}}


def sdk_fields(params) -> set[str]:
    return set(params.CompletionCreateParamsBase.__annotations__) | {"stream"}


def test_the_tables_cover_the_sdk():
    chat = sdk_fields(chat_params)
    assert chat == set(HONOURED) | set(REFUSED), chat ^ (set(HONOURED) | set(REFUSED))
    assert set(REFUSED) == set(OFF_FIELDS)
    assert chat <= set(ChatCompletionRequest.model_fields)
    assert sdk_fields(completion_params) <= set(CompletionRequest.model_fields)


def test_every_honoured_field_at_once(http):
    r = http.post("/v1/chat/completions", json=HONOURED)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"].startswith("{") and choice["logprobs"]["content"]


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_refused_fields_name_themselves(http, field):
    r = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, field: REFUSED[field]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
    if field in ACCEPTED_OFF:  # the value that asks for nothing more is accepted
        ok = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, field: ACCEPTED_OFF[field]})
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(("body", "param"), [
    *(({"messages": USER, field: value}, field.split(".")[0]) for field, value in REFUSED_HONOURED.items()),
    ({"messages": USER, "frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": "hi", "flavour": "x"}]}, "messages.0.flavour"),
    ({"messages": [{"role": "assistant", "content": "hi", "refusal": "no"}, *USER]}, "messages.0.refusal"),
    ({"messages": [{"role": "assistant", "content": "hi", "audio": {"id": "a"}}, *USER]}, "messages.0.audio"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0"),
])
def test_other_refusals(http, body, param):
    r = http.post("/v1/chat/completions", json={"max_tokens": 1, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()


def test_completions_refuse_response_format_and_unknown_fields(http):
    for field, value in (("response_format", {"type": "json_object"}), ("tools", TOOLS)):
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "response_format": None}).status_code == 200


def test_integers_are_bounded_unless_the_schema_bounds_them():
    schema = {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": ["integer", "null"], "minimum": 3},
        "c": {"type": "array", "items": {"type": "integer", "exclusiveMaximum": 9}},
        "d": {"enum": [{"type": "integer"}]}, "e": {"type": "number"}}}
    out = bound_integers(schema)["properties"]
    assert out["a"] == {"type": "integer", "minimum": -INTEGER_BOUND, "maximum": INTEGER_BOUND}
    assert out["b"] == {"type": ["integer", "null"], "minimum": 3, "maximum": INTEGER_BOUND}
    assert out["c"]["items"] == {"type": "integer", "exclusiveMaximum": 9, "minimum": -INTEGER_BOUND}
    assert out["d"] == {"enum": [{"type": "integer"}]} and out["e"] == {"type": "number"}
    assert schema["properties"]["a"] == {"type": "integer"}  # a copy: the request's schema is untouched
