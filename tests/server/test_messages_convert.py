"""The Messages API request in chat terms (server/messages/convert.py) and the stream's block regrouping
(server/messages/formatter.py), without a server."""

from __future__ import annotations

import json

import pytest

from server.messages.convert import ERROR_PREFIX, anthropic_param, convert, without_trivial_keywords
from server.messages.formatter import Blocks, matched_stop, parse_input
from server.messages.protocol import MessagesRequest
from server.structured import FieldError
from server.tool_stream import ReplyStream

TOOL = {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}


def request(messages: list, **fields) -> MessagesRequest:
    return MessagesRequest(model="m", max_tokens=4, messages=messages, **fields)


def test_history_with_tools_becomes_chat_messages():
    body = request(system=[{"type": "text", "text": "A."}, {"type": "text", "text": "B."}], tools=[TOOL], messages=[
        {"role": "user", "content": "find x"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                          {"type": "text", "text": "Looking."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                      "content": [{"type": "text", "text": "not found"}]},
                                     {"type": "text", "text": "try again"}]},
        {"role": "system", "content": "Mid-conversation note."},
    ])
    conversation, where = convert(body)
    assert conversation.messages == [
        {"role": "system", "content": "A.\n\nB."},
        {"role": "user", "content": "find x"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"q": "x"})}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": ERROR_PREFIX + "not found"},
        {"role": "user", "content": "try again"},
        {"role": "system", "content": "Mid-conversation note."},
    ]
    assert conversation.tools[0]["function"]["parameters"] == TOOL["input_schema"] and where == [0]
    assert conversation.prefill == ""


def test_tool_choice_left_out_tools_and_prefill():
    body = request([{"role": "user", "content": "hi"}], tools=[{"type": "bash_20250124", "name": "bash"}, TOOL],
                   tool_choice={"type": "any", "disable_parallel_tool_use": True})
    conversation, where = convert(body)
    assert conversation.tool_choice == "required" and conversation.parallel_tool_calls is False
    assert conversation.left_out == ["bash"] and where == [1]
    prefilled, _ = convert(request([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure:"}]))
    assert prefilled.prefill == "Sure:" and prefilled.messages[-1]["role"] == "user"
    with pytest.raises(FieldError) as refused:
        convert(request([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure:"}], tools=[TOOL]))
    assert refused.value.param == "messages[1].role"


@pytest.mark.parametrize(("messages", "param"), [
    ([{"role": "user", "content": [{"type": "image", "source": {}}]}], "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": "a", "colour": 1}]}], "messages[0].content[0].colour"),
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope"}]}], "messages[0].content[0].tool_use_id"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "n", "input": "x"}]}], "messages[1].content[0].input"),
])
def test_bad_blocks_name_themselves(messages, param):
    with pytest.raises(FieldError) as bad:
        convert(request(messages))
    assert bad.value.param == param and param in str(bad.value)


def test_chat_field_names_become_this_apis():
    where = [1, 3]  # tools[0] and tools[1] of the chat request are the client's tools[1] and tools[3]
    assert anthropic_param("tools[1].function.parameters.properties", where) == "tools[3].input_schema.properties"
    assert anthropic_param("tools[0].function.name", where) == "tools[1].name"
    assert anthropic_param("tool_choice.function.name", where) == "tool_choice.name"
    assert anthropic_param("response_format.json_schema.schema", where) == "output_config.format.schema"


def test_only_trivial_property_names_are_dropped():
    schema = {"type": "object", "properties": {
        "meta": {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {}},
        "propertyNames": {"type": "string"},  # a property called propertyNames stays
        "ids": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}}}
    out = without_trivial_keywords(schema)
    assert "propertyNames" not in out["properties"]["meta"]
    assert out["properties"]["propertyNames"] == {"type": "string"}
    assert out["properties"]["ids"]["propertyNames"] == {"pattern": "^[a-z]+$"}  # a real constraint: kept


def test_blocks_regroup_a_tool_reply_and_its_input():
    reply, blocks, events = ReplyStream(), Blocks(), []
    text = '{"tool_calls": [{"name": "lookup", "arguments": {"q": "x y"}}, {"name": "lookup", "arguments": {}}]}'
    for piece in (text[:20], text[20:41], text[41:]):
        for delta in reply.feed(piece):
            events += list(blocks.delta(delta))
    events += list(blocks.close())
    kinds = [json.loads(e["data"])["type"] for e in events]
    assert kinds[0] == "content_block_start" and kinds.count("content_block_start") == 2
    assert kinds.count("content_block_stop") == 2 and kinds[-1] == "content_block_stop"
    assert [b["input"] for b in blocks.blocks()] == [{"q": "x y"}, {}]
    assert all(b["id"].startswith("toolu_") for b in blocks.blocks())
    assert parse_input('{"q": "x') == {"q": "x"}  # cut short: as far as it goes


def test_matched_stop():
    assert matched_stop("hello world END more", "hello world ", ("END", "more")) == "END"
    assert matched_stop("hello", "hello", ("END",)) is None


def test_keepalive_during_a_long_prefill_is_an_empty_text_delta(monkeypatch):
    from types import SimpleNamespace

    import server.messages.formatter as formatter_module
    from engine.events import Admission, TokenEvent
    from server.messages.formatter import PING, MessagesFormatter

    formatter = MessagesFormatter(None, (), lambda ids: "")
    assert formatter.keepalive() == PING  # before message_start
    run = SimpleNamespace(model="m", gen=SimpleNamespace(admission=Admission("s", 10, 0, 0)))
    list(formatter.start(run))
    assert formatter.keepalive() == PING  # an event was just sent
    monkeypatch.setattr(formatter_module, "KEEPALIVE_S", 0.0)
    opened, delta = json.loads(formatter.keepalive()["data"]), json.loads(formatter.keepalive()["data"])
    assert opened == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert delta == {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ""}}
    events = [json.loads(e["data"]) for e in formatter.token(run, TokenEvent(text="Hi", token_id=1))]
    assert events == [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}]
    assert formatter.keepalive() == PING  # tokens flow: plain pings again
