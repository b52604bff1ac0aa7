"""Tool calls in each family's own format (server/tool_formats.py) without a server: the format found in the
real chat templates, the tools and the call history rendered by them, the grammar decoded by a random
"model", and the parser of fixed replies, whole and streamed in pieces."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from engine.config import EngineConfig
from engine.model.loader import load_tokenizer
from engine.scheduling.grammar import BatchMask, GrammarCompiler
from server.tool_formats import HERMES, LLAMA3_JSON, MISTRAL, NativeReplyStream, detect_format, short_id
from server.tools import plan_chat
from tests.tiny_models import (
    FAMILY_TEMPLATES,
    LLAMA31_TEMPLATE,
    QWEN25_TEMPLATE,
    QWEN_TOOL_TOKENS,
    tokenizer_with_template,
)

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": PARAMETERS}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time"}}
USER = [{"role": "user", "content": "Weather in Oslo?"}]
CALLED = [*USER,
          {"role": "assistant", "content": "", "tool_calls": [{"id": "call_abc", "type": "function", "function": {
              "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c", "days": 1}'}}]},
          {"role": "tool", "tool_call_id": "call_abc", "content": "5 degrees"}]
SPECIAL = {"mistral": ("[TOOL_CALLS]",)}  # a control token in Mistral's tokenizer
ADDED = {"qwen2": QWEN_TOOL_TOKENS}  # one token each, kept by the detokenizer (Qwen3 here: several tokens of text)
FORMATS = {"qwen2": HERMES, "qwen3": HERMES, "llama": LLAMA3_JSON, "mistral": MISTRAL}


@pytest.fixture(scope="module")
def tokenizers():
    return {family: tokenizer_with_template(template, SPECIAL.get(family, ()), ADDED.get(family, ()))
            for family, template in FAMILY_TEMPLATES.items()}


def render(tokenizer, plan) -> str:
    return tokenizer.apply_chat_template(plan.messages, add_generation_prompt=True, tokenize=False,
                                         **plan.template_kwargs)


# ----- the format, from the template ------------------------------------------------------------------
def test_the_format_is_found_in_each_real_template():
    assert {family: detect_format(t) for family, t in FAMILY_TEMPLATES.items()} == FORMATS
    embedded = load_tokenizer(None, EngineConfig().cache_dir).chat_template
    assert detect_format(embedded) is None  # SmolLM2's template renders no tools: the generic format
    assert detect_format("{% for tool in tools %}{{ tool }}{% endfor %}") is None
    assert detect_format(QWEN25_TEMPLATE.replace("tools", "")) is None


def test_templates_without_a_native_format_keep_the_generic_one():
    plan = plan_chat(USER, tools=[WEATHER], tool_choice="required",
                     chat_template="{% for tool in tools %}{{ tool }}{% endfor %}")
    assert plan.tool_format is None and plan.grammar.kind == "json_schema" and plan.template_kwargs
    assert "Reply with one JSON object only" in plan.messages[0]["content"]


# ----- the prompt: tools and history through the family's template ------------------------------------
@pytest.mark.parametrize("family", list(FAMILY_TEMPLATES))
def test_tools_and_call_history_reach_the_template(tokenizers, family):
    tokenizer = tokenizers[family]
    plan = plan_chat(CALLED, tools=[WEATHER], tool_choice="required", chat_template=tokenizer.chat_template,
                     tokenizer=tokenizer)
    assert plan.tool_format is FORMATS[family] and plan.grammar.kind == "lark"
    text = render(tokenizer, plan)
    tool = plan.template_kwargs["tools"][0]
    assert tool == {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                     "parameters": PARAMETERS}}
    shown = {"llama": json.dumps(tool, indent=4), "mistral": f'"parameters": {json.dumps(PARAMETERS)}'}
    assert shown.get(family, json.dumps(tool)) in text  # the tool's JSON, as the template writes it
    assert "Reply with one JSON object only" not in text  # the template's own instructions, not the generic ones
    arguments = '{"city": "Oslo", "unit": "c", "days": 1}'
    if family in ("qwen2", "qwen3"):
        assert f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>' in text
        assert "<tool_response>\n5 degrees\n</tool_response>" in text
    elif family == "llama":
        assert f'{{"name": "get_weather", "parameters": {arguments}}}<|eot_id|>' in text
        assert '<|start_header_id|>ipython<|end_header_id|>\n\n"5 degrees"' in text
    else:  # Mistral: the marker is its special token; 9-character ids, the same for the call and its result
        assert f"<[{tokenizer.convert_tokens_to_ids('[TOOL_CALLS]')}]>" in plan.grammar.source
        assert not plan.marker_shown
        mapped = short_id("call_abc")
        assert len(mapped) == 9 and mapped.isalnum()
        assert f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {arguments}, "id": "{mapped}"}}]' in text
        assert f'[TOOL_RESULTS] {{"content": 5 degrees, "call_id": "{mapped}"}}[/TOOL_RESULTS]' in text
    assert short_id("abcDEF123") == "abcDEF123"


def test_tool_choice_none_renders_no_tools(tokenizers):
    tokenizer = tokenizers["qwen2"]
    plan = plan_chat(USER, tools=[WEATHER], tool_choice="none", chat_template=tokenizer.chat_template,
                     tokenizer=tokenizer)
    assert plan.grammar is None and not plan.wrapped and "get_weather" not in render(tokenizer, plan)


# ----- the grammar, decoded --------------------------------------------------------------------------
def decode_randomly(tokenizer, grammar, seed: int, end_after: int = 400) -> str:
    """Random logits under the grammar's mask until the end of the reply (after ``end_after`` tokens the
    end is made likely wherever the grammar allows it)."""
    vocab = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab, {tokenizer.eos_token_id})
    constraint, mask = compiler.constraint(grammar), BatchMask(1, vocab)
    generator, tokens = torch.Generator().manual_seed(seed), []
    for _ in range(400):
        logits = torch.randn(1, vocab, generator=generator)  # (1, V)
        if len(tokens) >= end_after:
            logits[0, tokenizer.eos_token_id] += 1000.0
        assert mask.apply(logits, [constraint]) == []
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            return tokenizer.decode(tokens, skip_special_tokens=True)
        assert constraint.accept(token)
        tokens.append(token)
    raise AssertionError("no end of reply")


def accepts(tokenizer, grammar, text: str) -> bool:
    compiler = GrammarCompiler(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    constraint = compiler.constraint(grammar)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return all(constraint.accept(t) for t in ids) and constraint.can_end()


@pytest.mark.parametrize("family", list(FAMILY_TEMPLATES))
@pytest.mark.parametrize("seed", range(2))
def test_random_model_under_the_native_grammar_makes_valid_calls(tokenizers, family, seed):
    tokenizer = tokenizers[family]
    plan = plan_chat(USER, tools=[WEATHER, CLOCK], tool_choice="required", chat_template=tokenizer.chat_template,
                     tokenizer=tokenizer, max_tokens=200)
    text = decode_randomly(tokenizer, plan.grammar, seed)
    if family in ("qwen2", "qwen3"):
        assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
        assert plan.marker_shown
    elif family == "llama":
        assert text.startswith('{"name": "')
    else:
        assert text.startswith(' [{"name": "') and text.endswith("}]")  # [TOOL_CALLS] is a dropped special token
    stream = plan.reply_stream()
    stream.feed(text)
    reply = stream.finish()
    assert reply.content is None and reply.tool_calls
    if family == "llama":
        assert len(reply.tool_calls) == 1
    schemas = {"get_weather": PARAMETERS, "get_time": {"type": "object", "properties": {},
                                                       "additionalProperties": False}}
    for call in reply.tool_calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        if family == "mistral":
            assert len(call["id"]) == 9 and call["id"].isalnum()


@pytest.mark.parametrize("family", list(FAMILY_TEMPLATES))
def test_a_named_function_and_one_call_at_a_time(tokenizers, family):
    tokenizer = tokenizers[family]
    choice = {"type": "function", "function": {"name": "get_time"}}
    plan = plan_chat(USER, tools=[WEATHER, CLOCK], tool_choice=choice, parallel_tool_calls=False,
                     chat_template=tokenizer.chat_template, tokenizer=tokenizer)
    stream = plan.reply_stream()
    stream.feed(decode_randomly(tokenizer, plan.grammar, 3))
    calls = stream.finish().tool_calls
    assert [c["function"]["name"] for c in calls] == ["get_time"] and calls[0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("family", list(FAMILY_TEMPLATES))
def test_auto_allows_text_or_a_valid_call_only(tokenizers, family):
    tokenizer = tokenizers[family]
    plan = plan_chat(USER, tools=[WEATHER], chat_template=tokenizer.chat_template, tokenizer=tokenizer)
    assert plan.grammar.kind == "lark"
    arguments = '{"city": "Oslo", "unit": "c", "days": 2}'
    call = {"qwen2": f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>',
            "llama": f'{{"name": "get_weather", "parameters": {arguments}}}',
            "mistral": f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {arguments}}}]'}
    call["qwen3"] = call["qwen2"]
    assert accepts(tokenizer, plan.grammar, "It is sunny.")
    assert accepts(tokenizer, plan.grammar, call[family])
    assert not accepts(tokenizer, plan.grammar, call[family].replace('"days": 2', '"days": 9'))
    if family in ("qwen2", "qwen3"):  # text first, then the call; a marker always opens a call
        assert accepts(tokenizer, plan.grammar, "Let me look.\n\n" + call[family])
        assert not accepts(tokenizer, plan.grammar, "Let me look. <tool_call> no json")
    else:  # the reply's first character tells text from a call
        assert not accepts(tokenizer, plan.grammar, "{not a call}")
    text = decode_randomly(tokenizer, plan.grammar, 0, end_after=20)  # the random model writes text here
    stream = plan.reply_stream()
    stream.feed(text)
    assert stream.finish().content == text


def test_auto_with_a_response_format_keeps_the_generic_format(tokenizers):
    tokenizer = tokenizers["qwen2"]
    plan = plan_chat(USER, tools=[WEATHER], response_format={"type": "json_object"},
                     chat_template=tokenizer.chat_template, tokenizer=tokenizer)
    assert plan.tool_format is None and plan.grammar.kind == "json_schema" and plan.template_kwargs["tools"]


# ----- the parser, on fixed replies ------------------------------------------------------------------
ARGS_1, ARGS_2 = '{"city": "O\\"slo}", "unit": "c", "days": 1}', '{"city": "Rome", "unit": "f", "days": 7}'
REPLIES = {  # (format, marker shown, reply text, content, [(name, arguments)])
    "hermes text and two calls": (HERMES, True, f'Let me check.\n\n<tool_call>\n{{"name": "get_weather", "arguments": '
                                  f'{ARGS_1}}}\n</tool_call>\n<tool_call>\n{{"name": "get_weather", "arguments": '
                                  f'{ARGS_2}}}\n</tool_call>', "Let me check.",
                                  [("get_weather", ARGS_1), ("get_weather", ARGS_2)]),
    "hermes plain text": (HERMES, True, "Sunny, <tool_c... no call <tool", "Sunny, <tool_c... no call <tool", []),
    "hermes marker dropped": (HERMES, False, f'\n{{"name": "get_weather", "arguments": {ARGS_1}}}\n\n',
                              None, [("get_weather", ARGS_1)]),
    "llama bare json": (LLAMA3_JSON, True, f'{{"name": "get_weather", "parameters": {ARGS_2}}}', None,
                        [("get_weather", ARGS_2)]),
    "llama text": (LLAMA3_JSON, True, "It is 5 degrees {so} cold.", "It is 5 degrees {so} cold.", []),
    "mistral marker shown": (MISTRAL, True, f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {ARGS_1}}}, '
                             f'{{"name": "get_time", "arguments": {{}}}}]', None,
                             [("get_weather", ARGS_1), ("get_time", "{}")]),
    "mistral marker dropped": (MISTRAL, False, f' [{{"name": "get_weather", "arguments": {ARGS_2}}}]', None,
                               [("get_weather", ARGS_2)]),
}


def stream_in_pieces(fmt, shown, text: str, size: int) -> tuple[list[dict], NativeReplyStream]:
    stream, deltas = NativeReplyStream(fmt, shown), []
    for start in range(0, len(text), size):
        deltas += stream.feed(text[start:start + size])
    return deltas + stream.flush(), stream


@pytest.mark.parametrize("case", list(REPLIES))
def test_fixed_replies_parse_into_tool_calls(case):
    fmt, shown, text, content, calls = REPLIES[case]
    stream = NativeReplyStream(fmt, shown)
    stream.feed(text)
    reply = stream.finish()
    assert reply.content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls] == calls
    for call in reply.tool_calls:
        json.loads(call["function"]["arguments"])
    for size in (1, 3, 7, len(text)):  # streamed in pieces, the deltas add up to the same message
        deltas, streamed = stream_in_pieces(fmt, shown, text, size)
        state = ChatCompletionStreamState()
        state.handle_chunk(ChatCompletionChunk.model_validate(
            {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}))
        for delta in deltas:
            state.handle_chunk(ChatCompletionChunk.model_validate(
                {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": delta}]}))
        message = state.current_completion_snapshot.choices[0].message
        assert (message.content or None) == content
        got = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        assert got == calls
        assert [c.id for c in message.tool_calls or []] == [c["id"] for c in streamed.finish().tool_calls]


def test_a_call_cut_short_keeps_its_arguments_so_far():
    stream = NativeReplyStream(HERMES, True)
    stream.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os')
    reply = stream.finish()
    assert not stream.complete
    assert reply.tool_calls[0]["function"]["arguments"] == '{"city": "Os'


# ----- a model directory: its own template, end-of-turn tokens and sampling defaults ------------------
def test_a_model_directory_brings_its_template_end_tokens_and_defaults(tmp_path):
    from engine.model.loader import load
    from engine.scheduling.grammar import GrammarCompiler as Compiler
    from tests.tiny_models import tiny_family_dir

    ends = ("<|eot_id|>", "<|eom_id|>")  # Llama 3.1's ends of turn, beside its end of text
    directory = tiny_family_dir(tmp_path / "model", LLAMA31_TEMPLATE, (*ends, "<|python_tag|>"), end_tokens=ends,
                                temperature=0.7, top_p=0.8)
    loaded = load(EngineConfig(model=directory, sink_tokens=4, window=60, evict_block=8, data_dir=tmp_path / "sessions"))
    tokenizer = loaded.tokenizer
    assert tokenizer.chat_template == LLAMA31_TEMPLATE
    end_ids = set(tokenizer.convert_tokens_to_ids(list(ends)))
    assert loaded.eos_token_ids == {tokenizer.eos_token_id, *end_ids}
    assert loaded.sampling_defaults == {"temperature": 0.7, "top_p": 0.8}
    assert end_ids <= Compiler.for_model(loaded).stop_token_ids  # a grammar may end on every end-of-turn token
    plan = plan_chat(USER, tools=[WEATHER], tool_choice="required", chat_template=tokenizer.chat_template,
                     tokenizer=tokenizer)
    assert plan.tool_format is LLAMA3_JSON
