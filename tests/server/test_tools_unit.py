"""response_format, tools and tool replies (server/structured.py, server/tools.py, server/tool_stream.py)
without a server: validation, prompts, the reply grammar decoded by a random "model", and the parser."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from engine.config import EngineConfig
from engine.model.loader import load_tokenizer
from engine.scheduling.grammar import BatchMask, GrammarCompiler
from server.structured import MAX_SCHEMA_CHARS, FieldError, response_format_grammar, response_format_schema
from server.tool_stream import ReplyStream
from server.tools import (
    EMPTY_PARAMETERS,
    MAX_TOOLS,
    parse_tool_choice,
    parse_tools,
    plan_chat,
    render_history,
    reply_schema,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now"}}  # no parameters: takes none
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def raises_field(param, call, *args, **kwargs):
    with pytest.raises(FieldError) as info:
        call(*args, **kwargs)
    assert info.value.param == param, info.value
    return info.value


# ----- response_format -----------------------------------------------------------------------------
def test_response_format_kinds():
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None
    assert response_format_grammar({"type": "json_object"}).kind == "json_object"
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert grammar.kind == "json_schema" and list(json.loads(grammar.source)["properties"]) == ["b", "a"]
    assert response_format_schema({"type": "json_schema", "json_schema": {"name": "x"}}) == {"type": "object"}


@pytest.mark.parametrize("response_format, param", [
    ({"type": "yaml"}, "response_format.type"),
    ("json", "response_format"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"description": "x" * MAX_SCHEMA_CHARS}}},
     "response_format.json_schema.schema"),
])
def test_response_format_errors_name_the_field(response_format, param):
    raises_field(param, response_format_grammar, response_format)


# ----- tools and tool_choice -----------------------------------------------------------------------
def test_tools_parse_and_default_parameters():
    weather, clock = parse_tools([WEATHER, CLOCK])
    assert weather.name == "get_weather" and weather.parameters["required"] == ["city", "unit", "days"]
    assert clock.parameters == EMPTY_PARAMETERS and clock.description == ""
    assert parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"properties": {}}}}])[0] \
        .parameters["type"] == "object"


@pytest.mark.parametrize("tools, param", [
    ({"type": "function"}, "tools"),
    ([{"type": "retrieval"}], "tools[0].type"),
    ([WEATHER, {"type": "function", "function": {"name": "bad name"}}], "tools[1].function.name"),
    ([WEATHER, WEATHER], "tools[1].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "none"}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"description": "x" * MAX_SCHEMA_CHARS}}}],
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)], "tools"),
])
def test_bad_tools_name_the_field(tools, param):
    raises_field(param, parse_tools, tools)


def test_tool_choice():
    tools = parse_tools([WEATHER, CLOCK])
    assert parse_tool_choice(None, tools).mode == "auto" and parse_tool_choice(None, ()).mode == "none"
    assert parse_tool_choice("required", tools).mode == "required"
    named = parse_tool_choice({"type": "function", "function": {"name": "now"}}, tools)
    assert (named.mode, named.name) == ("function", "now")
    raises_field("tool_choice.function.name", parse_tool_choice, {"type": "function", "function": {"name": "x"}}, tools)
    raises_field("tool_choice", parse_tool_choice, "required", ())
    raises_field("tool_choice", parse_tool_choice, "always", tools)
    raises_field("parallel_tool_calls", plan_chat, MESSAGES, tools=[WEATHER], parallel_tool_calls="no")


def test_reply_schema_enforces_choice():
    tools = parse_tools([WEATHER, CLOCK])
    call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c", "days": 2}}
    clock = {"name": "now", "arguments": {}}
    auto = reply_schema(tools, parse_tool_choice("auto", tools), True, None)
    for ok in ({"tool_calls": [call, clock]}, {"response": "hello"}):
        jsonschema.validate(ok, auto)
    required = reply_schema(tools, parse_tool_choice("required", tools), False, None)
    named = reply_schema(tools, parse_tool_choice({"type": "function", "function": {"name": "now"}}, tools), True, None)
    bad = [
        (auto, {"tool_calls": [{**call, "arguments": {"city": "Paris"}}]}),  # arguments follow the schema
        (auto, {"tool_calls": [{"name": "other", "arguments": {}}]}),
        (auto, {"tool_calls": []}),
        (required, {"response": "hello"}),
        (required, {"tool_calls": [call, clock]}),  # parallel_tool_calls false: one call
        (named, {"tool_calls": [call]}),
    ]
    for schema, instance in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(instance, schema)
    jsonschema.validate({"tool_calls": [clock]}, named)


# ----- prompts ---------------------------------------------------------------------------------------
def test_generic_plan_merges_the_system_message_and_renders_with_the_embedded_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    plan = plan_chat(messages, tools=[WEATHER], tool_choice="required", chat_template=tokenizer.chat_template)
    assert plan.wrapped and plan.grammar_param == "tools" and plan.template_kwargs == {}
    system = plan.messages[0]["content"]
    assert system.startswith("Be brief.\n\n") and "get_weather" in system and "must call" in system
    assert [m["role"] for m in plan.messages] == ["system", "user"]
    text = tokenizer.apply_chat_template(plan.messages, tokenize=False, add_generation_prompt=True)
    assert "Weather in Paris?" in text and '"tool_calls"' in text


def test_plain_and_response_format_plans():
    plain = plan_chat(MESSAGES)
    assert plain.grammar is None and not plain.wrapped and plain.messages == MESSAGES
    none = plan_chat(MESSAGES, tools=[WEATHER], tool_choice="none",
                     response_format={"type": "json_object"})
    assert none.grammar.kind == "json_object" and none.grammar_param == "response_format" and not none.wrapped
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    both = plan_chat(MESSAGES, tools=[WEATHER],
                     response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    assert not both.response_is_text
    jsonschema.validate({"response": {"n": 1}}, json.loads(both.grammar.source))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "text"}, json.loads(both.grammar.source))


def test_history_generic_format():
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "18C"}]},
        {"role": "assistant", "content": "It is 18C."},
    ]
    rendered = render_history(history, native=False, wrap_text=True)
    assert [m["role"] for m in rendered] == ["user", "assistant", "user", "assistant"]
    assert json.loads(rendered[1]["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert json.loads(rendered[2]["content"]) == {
        "tool_result": {"tool_call_id": "call_1", "name": "get_weather", "content": "18C"}}
    assert json.loads(rendered[3]["content"]) == {"response": "It is 18C."}
    native = render_history(history, native=True, wrap_text=False)
    assert native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[2] == {"role": "tool", "content": "18C", "tool_call_id": "call_1", "name": "get_weather"}
    raises_field("messages[1].tool_call_id", render_history,
                 [MESSAGES[0], {"role": "tool", "tool_call_id": "call_9", "content": "x"}], native=False, wrap_text=True)
    # arguments cut short (a reply that ran out of max_tokens) come back as the server wrote them
    cut = [{**history[1], "tool_calls": [{**history[1]["tool_calls"][0],
                                          "function": {"name": "f", "arguments": '{"city": "Par'}}]}]
    assert render_history(cut, native=False, wrap_text=True)[0]["content"] == \
        '{"tool_calls": [{"name": "f", "arguments": {"city": "Par}]}'
    assert render_history(cut, native=True, wrap_text=False)[0]["tool_calls"][0]["function"]["arguments"] == \
        '{"city": "Par'
    not_object = [{**history[1], "tool_calls": [{**history[1]["tool_calls"][0],
                                                 "function": {"name": "f", "arguments": "[1]"}}]}]
    raises_field("messages[0].tool_calls[0].function.arguments", render_history, not_object, native=False,
                 wrap_text=True)


def test_native_template_gets_tools():
    plan = plan_chat(MESSAGES, tools=[WEATHER], chat_template="{% for tool in tools %}{{ tool }}{% endfor %}")
    assert plan.template_kwargs["tools"][0]["function"]["name"] == "get_weather"
    assert "Weather in a city" not in plan.messages[0]["content"]  # the template lists the tools itself


# ----- the reply parser ------------------------------------------------------------------------------
REPLY = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Par\\"is", "unit": "c", "days": 2}}, '
         '{"name": "now", "arguments": {}}]}')


def chunks(text, seed):
    rng, i, out = random.Random(seed), 0, []
    while i < len(text):
        n = rng.randint(1, 6)
        out.append(text[i:i + n])
        i += n
    return out


@pytest.mark.parametrize("seed", range(4))
def test_stream_deltas_have_openai_shape_and_the_sdk_assembles_them(seed):
    stream, deltas = ReplyStream(), []
    for piece in chunks(REPLY, seed):
        deltas += stream.feed(piece)
    firsts = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
    assert [(f["index"], f["type"], f["function"]) for f in firsts] == [
        (0, "function", {"name": "get_weather", "arguments": ""}), (1, "function", {"name": "now", "arguments": ""})]
    later = [d["tool_calls"][0] for d in deltas if "id" not in d["tool_calls"][0]]
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in later)
    reply = stream.finish()
    assert stream.complete and reply.content is None
    assert [json.loads(c["function"]["arguments"]) for c in reply.tool_calls] == [
        {"city": 'Par"is', "unit": "c", "days": 2}, {}]
    state = ChatCompletionStreamState(input_tools=[WEATHER, CLOCK])
    for delta in [{"role": "assistant"}, *deltas]:
        state.handle_chunk(chunk(delta, None))
    state.handle_chunk(chunk({}, "tool_calls"))
    message = state.get_final_completion().choices[0].message
    assert [c.function.name for c in message.tool_calls] == ["get_weather", "now"]
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": 'Par"is', "unit": "c", "days": 2}
    assert message.tool_calls[0].id == reply.tool_calls[0]["id"] and message.tool_calls[0].id.startswith("call_")


def chunk(delta, finish_reason):
    return ChatCompletionChunk.model_validate({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    })


def test_text_response_is_decoded_content():
    text = '{"response": "line\\nnext \\u00e9 \\ud83d\\ude00 \\"q\\""}'
    stream = ReplyStream()
    content = "".join(d.get("content", "") for c in text for d in stream.feed(c))
    assert content == json.loads(text)["response"] and stream.finish().content == content
    assert stream.finish().tool_calls == []


def test_json_response_is_verbatim_and_truncation_keeps_what_was_written():
    stream = ReplyStream(response_is_text=False)
    stream.feed('{"response": {"n": [1, 2], "s": "}"}}')
    assert json.loads(stream.finish().content) == {"n": [1, 2], "s": "}"} and stream.complete
    cut = ReplyStream()
    cut.feed(REPLY[:70])
    reply = cut.finish()
    assert not cut.complete and reply.tool_calls[0]["function"]["name"] == "get_weather"
    assert reply.tool_calls[0]["function"]["arguments"] == REPLY[REPLY.index('{"city"'):70]


# ----- the reply grammar, decoded -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, EngineConfig().cache_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


@pytest.mark.parametrize("seed", range(4))
def test_random_model_under_the_tool_grammar_makes_valid_calls(tokenizer, compiler, seed):
    """Random logits under the mask: every reply parses into calls whose arguments validate."""
    plan = plan_chat(MESSAGES, tools=[WEATHER, CLOCK], tool_choice="required", chat_template=tokenizer.chat_template)
    vocab = compiler.vocab_size
    constraint, mask, stream = compiler.constraint(plan.grammar), BatchMask(1, vocab), plan.reply_stream()
    generator, tokens = torch.Generator().manual_seed(seed), []
    for _ in range(300):
        logits = torch.randn(1, vocab, generator=generator)  # (1, V)
        assert mask.apply(logits, [constraint]) == []
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        assert constraint.accept(token)
        tokens.append(token)
    else:
        raise AssertionError("no end of reply")
    stream.feed(tokenizer.decode(tokens))
    reply = stream.finish()
    assert stream.complete and reply.tool_calls and reply.content is None, tokenizer.decode(tokens)
    schemas = {t.name: t.parameters for t in plan.tools}
    for call in reply.tool_calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
