"""Tool definitions never scroll away: with tools in play, the system prompt carrying them is pinned by
default when it fits in ``TOOL_PIN_SHARE`` of the cache, for chat completions and the Messages API alike;
otherwise the response says so (``x-sinkserve-pinned-tokens``: the sinks only; ``x-sinkserve-warning``)."""

from __future__ import annotations

import httpx
import pytest

from server.app import create_app
from server.pinning import TOOL_PIN_SHARE, WARNING_HEADER
from server.settings import Settings
from tests.server.conftest import LiveServer
from tests.tiny_models import tiny_engine

SINKS, WINDOW = 4, 400
WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
                            "required": ["city"], "additionalProperties": False}}
CHAT_WEATHER = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                 "parameters": WEATHER["input_schema"]}}
LONG_DESCRIPTION = "A tool with a long description. " * 60  # ~400 tokens: more than half the cache


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = tiny_engine(tmp_path_factory.mktemp("pinning"), sink_tokens=SINKS, window=WINDOW, max_positions=512)
    server = LiveServer(create_app(Settings(), engine=engine)).start()
    yield server, engine
    server.stop()
    engine.stop()


def system_tokens(engine, tools: list[dict]) -> int:
    """The rendered system prompt of a request forcing one call of the first tool."""
    from server.tools import plan_chat

    plan = plan_chat([{"role": "user", "content": "hi"}], tools=tools, parallel_tool_calls=False,
                     tool_choice={"type": "function", "function": {"name": tools[0]["function"]["name"]}},
                     chat_template=engine.tokenizer.chat_template)
    return engine.render_chat(plan.messages, True, plan.template_kwargs)[1]


def messages_turn(url: str, content: list | str, tools: list[dict], **extra) -> httpx.Response:
    body = {"model": "tiny-llama", "max_tokens": 30, "tools": tools,
            "tool_choice": {"type": "tool", "name": tools[0]["name"], "disable_parallel_tool_use": True},
            "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(f"{url}/v1/messages", json=body, timeout=60)


def test_tools_are_pinned_by_default_on_both_routes(live):
    server, engine = live
    expected = system_tokens(engine, [CHAT_WEATHER])
    assert SINKS < expected <= TOOL_PIN_SHARE * engine.config.cache_size
    reply = messages_turn(server.url, "Weather in Paris?", [WEATHER])
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-sinkserve-pinned-tokens"] == str(expected) and WARNING_HEADER not in reply.headers
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Weather in Rome?"}], "max_tokens": 30, "tools": [CHAT_WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False})
    assert chat.status_code == 200, chat.text
    assert chat.json()["sinkserve"]["pinned_tokens"] == expected and WARNING_HEADER not in chat.headers
    plain = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], "max_tokens": 2})
    assert plain.json()["sinkserve"]["pinned_tokens"] == SINKS  # no tools: nothing more pinned than before
    unpinned = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 30, "tools": [CHAT_WEATHER],
        "tool_choice": "required", "pin_system_prompt": False})
    assert unpinned.json()["sinkserve"]["pinned_tokens"] == SINKS  # the client's explicit choice wins


def test_a_tool_list_too_large_to_pin_is_reported(live):
    server, engine = live
    tools = [{**WEATHER, "description": LONG_DESCRIPTION}]
    reply = messages_turn(server.url, "Weather?", tools)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-sinkserve-pinned-tokens"] == str(SINKS)
    assert "not pinned" in reply.headers[WARNING_HEADER] and str(engine.config.cache_size) in reply.headers[WARNING_HEADER]


def test_tools_stay_in_the_cache_through_a_long_conversation(live):
    server, engine = live
    expected = system_tokens(engine, [CHAT_WEATHER])
    history, evicted = [], 0
    for turn in range(4):  # ~160 new tokens a turn through a 404-slot cache
        history.append({"role": "user", "content": f"turn {turn}: " + "the harbour lights and the tide " * 20})
        body = {"model": "tiny-llama", "max_tokens": 30, "tools": [WEATHER],
                "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                "messages": history}
        reply = httpx.post(f"{server.url}/v1/messages", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-sinkserve-pinned-tokens"] == str(expected)
        [call] = reply.json()["content"]
        assert call["type"] == "tool_use" and call["input"]["city"] in {"Paris", "Rome", "Oslo"}
        history += [{"role": "assistant", "content": [call]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny"}]}]
        evicted = int(reply.headers["x-sinkserve-evicted-tokens"])
    assert evicted > 0  # the conversation is well past the window, the tool prompt still pinned
