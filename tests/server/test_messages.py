"""Anthropic's Messages API against a real ``sinkserve serve`` process (tiny model) with the real ``anthropic``
SDK: shapes and the SDK's own types, the event stream (text and tool input deltas), a tools round trip,
count_tokens, the fields Claude Code sends, errors in Anthropic's shape, and the session cache reused by a
stateless resend of the history."""

from __future__ import annotations

import json
import secrets

import anthropic
import httpx
import pytest
from anthropic.types import (
    Message,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
)

from bench.serve_process import ServerProcess

KEY = "messages-key"
MODEL = "tiny-llama"
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
                            "required": ["city"], "additionalProperties": False}}
FORCE_WEATHER = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
EVENT_TYPES = {"message_start": RawMessageStartEvent, "content_block_start": RawContentBlockStartEvent,
               "content_block_delta": RawContentBlockDeltaEvent, "content_block_stop": RawContentBlockStopEvent,
               "message_delta": RawMessageDeltaEvent, "message_stop": RawMessageStopEvent}


def unique(text: str) -> str:
    """``text`` with a random tag, so no earlier test's session shares its prefix."""
    return f"[{secrets.token_hex(4)}] {text}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("messages"), tiny=True, keys=[KEY]).start()
    yield proc
    proc.stop()


@pytest.fixture
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={"x-api-key": KEY, **(headers or {})}, timeout=60)


def sse(server, body: dict, path: str = "/v1/messages") -> list[tuple[str, dict]]:
    events = []
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=60,
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}) as reply:
        assert reply.status_code == 200, reply.read()
        name = None
        for line in reply.iter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.removeprefix("data:"))))
    return events


def test_create_matches_the_sdk_types(client, server):
    message = client.messages.create(model=MODEL, max_tokens=5, extra_body={"temperature": 0}, metadata={"user_id": "u-1"},
                                     system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                                     messages=[{"role": "user", "content": unique("Tell me about lighthouses.")}])
    assert isinstance(message, Message) and message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    [block] = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None  # the tiny model never ends
    assert message.usage.output_tokens == 5
    raw = post(server, "/v1/messages", {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert raw.status_code == 200, raw.text
    Message.model_validate(raw.json())
    assert raw.headers["x-session-id"].startswith("sess_")


def test_count_tokens_is_the_prompt_the_model_reads(client):
    messages = [{"role": "user", "content": unique("How many tokens is this?")}]
    counted = client.messages.count_tokens(model=MODEL, messages=messages, system="Be brief.")
    message = client.messages.create(model=MODEL, max_tokens=2, messages=messages, system="Be brief.")
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens > 5
    with_tools = client.messages.count_tokens(model=MODEL, messages=messages, system="Be brief.", tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens + 20  # the tool list and reply format are in the prompt


def test_stream_event_sequence_validates_against_the_sdk(server):
    events = sse(server, {"model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": unique("Stream.")}]})
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events)
    for name, data in events:
        if name in EVENT_TYPES:
            EVENT_TYPES[name].model_validate(data)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 6


def test_sdk_stream_accumulates_text(client):
    with client.messages.stream(model=MODEL, max_tokens=6, messages=[{"role": "user", "content": unique("Go.")}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 6


def test_streamed_tool_input_deltas(client, server):
    body = {"model": MODEL, "max_tokens": 60, "tools": [WEATHER], "tool_choice": FORCE_WEATHER,
            "messages": [{"role": "user", "content": unique("Weather in Rome?")}]}
    events = sse(server, body)
    starts = [data for name, data in events if name == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["tool_use"]
    assert starts[0]["content_block"]["name"] == "get_weather" and starts[0]["content_block"]["id"].startswith("toolu_")
    pieces = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert pieces and {p["type"] for p in pieces} == {"input_json_delta"}
    assert json.loads("".join(p["partial_json"] for p in pieces))["city"] in {"Paris", "Rome", "Oslo"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    with client.messages.stream(**body) as stream:
        final = stream.get_final_message()
    [call] = final.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input["city"] in {"Paris", "Rome", "Oslo"}
    assert final.stop_reason == "tool_use"


def test_tools_round_trip_and_the_cache(client):
    question = {"role": "user", "content": unique("What is the weather in Oslo?")}
    first = client.messages.create(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice=FORCE_WEATHER,
                                   messages=[question])
    [call] = first.content
    assert call.type == "tool_use" and first.stop_reason == "tool_use"
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                            "content": [{"type": "text", "text": "Sunny, 18 C"}]}]}
    history = [question, {"role": "assistant", "content": first.content}, result]
    # the same tools and tool_choice: the same system prompt, so the resent history is found in the cache
    second = client.messages.create(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice=FORCE_WEATHER,
                                    messages=history)
    assert second.content[0].type == "tool_use"
    assert second.usage.cache_read_input_tokens > first.usage.input_tokens + first.usage.cache_read_input_tokens
    answer = client.messages.create(model=MODEL, max_tokens=8, tools=[WEATHER], tool_choice={"type": "none"},
                                    messages=history)
    assert [b.type for b in answer.content] == ["text"] and answer.stop_reason == "max_tokens"
    errored = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "is_error": True,
                                             "content": "Sunny, 18 C"}]}
    count = client.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=[*history[:2], result]).input_tokens
    assert client.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=[*history[:2], errored]).input_tokens > count


def test_second_turn_reuses_the_session_cache(client):
    messages = [{"role": "user", "content": unique("Tell me a story about a harbour.")}]
    first = client.messages.create(model=MODEL, max_tokens=6, extra_body={"temperature": 0}, messages=messages)
    assert first.usage.input_tokens >= 10  # the question is new (only the template's default system prompt is cached)
    messages += [{"role": "assistant", "content": first.content}, {"role": "user", "content": "And then?"}]
    second = client.messages.create(model=MODEL, max_tokens=6, extra_body={"temperature": 0}, messages=messages)
    prompt = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= prompt  # the whole first prompt, and more of the reply
    assert second.usage.cache_creation_input_tokens == 0


def test_stop_sequences(client):
    messages = [{"role": "user", "content": unique("Count.")}]
    free = client.messages.create(model=MODEL, max_tokens=8, extra_body={"temperature": 0}, messages=messages)
    words = free.content[0].text.split()
    stop = words[len(words) // 2]
    stopped = client.messages.create(model=MODEL, max_tokens=8, extra_body={"temperature": 0}, messages=messages,
                                     stop_sequences=[stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    text = stopped.content[0].text if stopped.content else ""
    assert stop not in text and free.content[0].text.startswith(text)


def test_the_fields_claude_code_sends_are_accepted(server):
    body = {"model": MODEL, "max_tokens": 32000, "stream": True, "thinking": {"type": "adaptive"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "high"}, "metadata": {"user_id": '{"device_id": "d"}'},
            "service_tier": "auto", "temperature": 1,
            "system": [{"type": "text", "text": "You are a CLI.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": unique("say hi")},
                                                      {"type": "text", "text": "now", "cache_control": {"type": "ephemeral"}}]},
                         {"role": "system", "content": "Mid-conversation context."}]}
    headers = {"anthropic-beta": "claude-code-20250219,context-management-2025-06-27", "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", f"{server.url}/v1/messages?beta=true", json={**body, "max_tokens": 32000}, timeout=60,
                      headers={"x-api-key": KEY, **headers}) as reply:
        assert reply.status_code == 200, reply.read()
        assert "clamped" in reply.headers["x-sinkserve-warning"]  # max_tokens above the server's cap
        text = reply.read().decode()
    assert "event: message_stop" in text
    assert httpx.head(server.url, timeout=10).status_code == 200  # Claude Code's probe


def anthropic_error(reply: httpx.Response, status: int, kind: str) -> str:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    return body["error"]["message"]


def test_errors_in_anthropic_shape(client, server):
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=MODEL, max_tokens=4, messages=hello, extra_body={"frobnicate": 1})
    assert bad.value.body["error"]["type"] == "invalid_request_error" and "frobnicate" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=hello)
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=hello)
    assert MODEL in missing.value.body["error"]["message"]
    assert "max_tokens" in anthropic_error(post(server, "/v1/messages", {"model": MODEL, "messages": hello}), 400,
                                           "invalid_request_error")
    image = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                          "data": "AAAA"}}]}]
    message = anthropic_error(post(server, "/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": image}), 400,
                              "invalid_request_error")
    assert "messages[0].content[0].type" in message
    unanswered = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]
    message = anthropic_error(post(server, "/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": unanswered}),
                              400, "invalid_request_error")
    assert "messages[0].content[0].tool_use_id" in message
    bad_schema = {**WEATHER, "name": "other", "input_schema": {"type": "string"}}
    tools = [{"type": "web_search_20250305", "name": "web_search"}, WEATHER, bad_schema]  # indexes as sent
    message = anthropic_error(post(server, "/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": hello,
                                                            "tools": tools}), 400, "invalid_request_error")
    assert "tools[2].input_schema" in message
    no_auth = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": hello})
    assert "x-api-key" in anthropic_error(no_auth, 401, "authentication_error")
    bearer = post(server, "/v1/messages/count_tokens", {"model": MODEL, "messages": hello},
                  headers={"x-api-key": "", "Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 200 and bearer.json()["input_tokens"] > 0


def test_anthropic_defined_tools_are_left_out_and_named(server):
    tools = [WEATHER, {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]
    reply = post(server, "/v1/messages", {"model": MODEL, "max_tokens": 60, "tools": tools, "tool_choice": {"type": "any"},
                                          "messages": [{"role": "user", "content": unique("Search.")}]})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-sinkserve-tools-left-out"] == "web_search"
    assert {b["name"] for b in reply.json()["content"] if b["type"] == "tool_use"} == {"get_weather"}


SDK_HEADERS = {"user_profile_id", "workspace_id"}  # sent by the SDK as anthropic-* headers, not in the body
SDK_REMOVED = {"temperature", "top_p", "top_k"}  # dropped from the SDK's signature, still in the API (extra_body)


def test_every_field_the_sdk_sends_is_declared():
    from anthropic.types import message_count_tokens_params, message_create_params

    from server.messages.protocol import CountTokensRequest, MessagesRequest

    create = set(message_create_params.MessageCreateParamsBase.__annotations__) - SDK_HEADERS
    assert create <= set(MessagesRequest.model_fields), create - set(MessagesRequest.model_fields)
    count = set(message_count_tokens_params.MessageCountTokensParams.__annotations__) - SDK_HEADERS
    assert count <= set(CountTokensRequest.model_fields), count - set(CountTokensRequest.model_fields)
    assert SDK_REMOVED <= set(MessagesRequest.model_fields)
