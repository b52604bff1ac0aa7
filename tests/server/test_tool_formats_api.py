"""Tool calls in the family's own format over HTTP: a tiny random model whose tokenizer carries Qwen2.5's
(and Mistral's) real chat template, a real uvicorn server and the openai SDK.

The random model writes nonsense, so ``tool_choice`` required or named forces a call (one:
``parallel_tool_calls: false``, or it may keep adding calls until ``max_tokens``): what is checked is
that the request's tools reach the template (the rendered prompt holds the tool's JSON), that the
``<tool_call>`` reply comes back as OpenAI ``tool_calls``, whole and streamed, valid for the tool's
schema, and that a call history is rendered by the family's template.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.server.conftest import LiveServer
from tests.tiny_models import (
    LLAMA31_TEMPLATE,
    MISTRAL_TEMPLATE,
    QWEN25_TEMPLATE,
    QWEN_TOOL_TOKENS,
    tiny_template_engine,
)

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": PARAMETERS}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time"}}
USER = [{"role": "user", "content": "What is the weather in Oslo?"}]


class Served:
    """A server around an engine whose renders are recorded (the prompt text of each request)."""

    def __init__(self, tmp_path, template: str, special_tokens: tuple[str, ...] = (),
                 added_tokens: tuple[str, ...] = ()) -> None:
        from openai import OpenAI

        from server.app import create_app
        from server.settings import Settings

        self.engine = tiny_template_engine(tmp_path, template, special_tokens, added_tokens=added_tokens)
        self.prompts: list[str] = []
        render = self.engine.render_chat

        def recording(*args, **kwargs):
            tokens, pinned = render(*args, **kwargs)
            self.prompts.append(self.engine.tokenizer.decode(tokens))
            return tokens, pinned

        self.engine.render_chat = recording
        self.live = LiveServer(create_app(Settings(), engine=self.engine)).start()
        self.sdk = OpenAI(base_url=f"{self.live.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def stop(self) -> None:
        self.live.stop()
        self.engine.stop()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("qwen"), QWEN25_TEMPLATE, added_tokens=QWEN_TOOL_TOKENS)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("mistral"), MISTRAL_TEMPLATE, ("[TOOL_CALLS]",))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("llama"), LLAMA31_TEMPLATE)
    yield served
    served.stop()


def check_calls(calls, names=("get_weather", "get_time")) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMETERS if call.function.name == "get_weather" else
                            {"type": "object", "properties": {}, "additionalProperties": False})


@pytest.mark.parametrize("seed", range(2))
def test_qwen_tools_reach_the_template_and_the_reply_is_tool_calls(qwen, seed):
    r = qwen.sdk.chat.completions.create(model=qwen.engine.model_name, messages=USER, tools=[WEATHER, CLOCK],
                                         tool_choice="required", parallel_tool_calls=False, max_tokens=150,
                                         temperature=1.0, seed=seed)
    prompt = qwen.prompts[-1]
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": PARAMETERS}}
    assert json.dumps(tool) in prompt and "<tools>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert "Reply with one JSON object only" not in prompt
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls)


def test_qwen_streamed_tool_call_deltas(qwen):
    stream = qwen.sdk.chat.completions.create(
        model=qwen.engine.model_name, messages=USER, tools=[WEATHER], stream=True, max_tokens=150,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
        temperature=1.0, seed=5)
    calls: dict[int, dict] = {}
    finish, firsts = None, []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        assert not choice.delta.content
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:
                firsts.append(delta)
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            calls[delta.index]["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    assert firsts[0].type == "function" and firsts[0].function.name == "get_weather"
    call = calls[0]
    assert call["id"].startswith("call_") and call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), PARAMETERS)


def test_qwen_call_history_goes_through_the_template(qwen):
    first = qwen.sdk.chat.completions.create(model=qwen.engine.model_name, messages=USER, tools=[WEATHER],
                                             tool_choice="required", parallel_tool_calls=False, max_tokens=150, temperature=1.0, seed=2)
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = [*USER, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "5 degrees"}]
    second = qwen.sdk.chat.completions.create(model=qwen.engine.model_name, messages=history, tools=[WEATHER],
                                              tool_choice="required", parallel_tool_calls=False, max_tokens=150, temperature=1.0, seed=3)
    prompt = qwen.prompts[-1]
    arguments = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call><|im_end|>' in prompt
    assert "<|im_start|>user\n<tool_response>\n5 degrees\n</tool_response><|im_end|>" in prompt
    check_calls(second.choices[0].message.tool_calls)


def test_mistral_calls_behind_a_special_token(mistral):
    r = mistral.sdk.chat.completions.create(model=mistral.engine.model_name, messages=USER, tools=[WEATHER],
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=150, temperature=1.0, seed=1)
    assert "[AVAILABLE_TOOLS] [" in mistral.prompts[-1]
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    check_calls(message.tool_calls)
    assert all(len(c.id) == 9 and c.id.isalnum() for c in message.tool_calls)
    history = [*USER, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "5 degrees"}]
    again = mistral.sdk.chat.completions.create(model=mistral.engine.model_name, messages=history, tools=[WEATHER],
                                                tool_choice="required", parallel_tool_calls=False, max_tokens=150, temperature=1.0, seed=2)
    assert f'"call_id": "{message.tool_calls[0].id}"' in mistral.prompts[-1]
    check_calls(again.choices[0].message.tool_calls)


def test_llama_json_call_with_a_pinned_system_prompt(llama):
    """Llama 3.1's template puts the tools in the first user message and cannot render a system message
    alone: the system prompt is then not pinned, and the request still succeeds."""
    messages = [{"role": "system", "content": "You are terse."}, *USER]
    r = llama.sdk.chat.completions.create(model=llama.engine.model_name, messages=messages, tools=[WEATHER],
                                          tool_choice="required", max_tokens=150, temperature=1.0, seed=4,
                                          extra_body={"pin_system_prompt": True})
    prompt = llama.prompts[-1]
    assert "Given the following functions" in prompt and '"name": "get_weather"' in prompt
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    check_calls(message.tool_calls)
