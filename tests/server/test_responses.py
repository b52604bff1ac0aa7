"""The Responses API against a real ``sinkserve serve`` process (tiny model) with the real ``openai`` SDK:
shapes, streaming events, chains on the session cache, forks, stored responses and their errors."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from openai.types.responses import Response, ResponseItemList

from bench.serve_process import ServerProcess

KEY_A, KEY_B = "resp-key-a", "resp-key-b"
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}},
                       "required": ["city"], "additionalProperties": False}}
WORDS = "lighthouse keeper harbour storm lantern rope tide gull anchor sail ".split()


def filler(turn: int, words: int = 60) -> str:
    """About ``words`` tokens of text that differs per turn."""
    return " ".join(WORDS[(turn + i) % len(WORDS)] for i in range(words))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("responses"), tiny=True, keys=[KEY_A, KEY_B]).start()
    yield proc
    proc.stop()


@pytest.fixture
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY_A, max_retries=0, timeout=60)


def create(client: OpenAI, **fields):
    return client.responses.create(**{"model": "tiny-llama", "max_output_tokens": 4, "temperature": 0, **fields})


def test_create_with_a_string_matches_the_sdk_type(client, server):
    raw = httpx.post(f"{server.url}/v1/responses", headers={"Authorization": f"Bearer {KEY_A}"},
                     json={"model": "tiny-llama", "input": "Tell me about lighthouses.", "max_output_tokens": 5},
                     timeout=60)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    response = Response.model_validate(body)  # every field the SDK requires, with the SDK's types
    assert response.id.startswith("resp_") and response.object == "response"
    assert body["store"] is True and body["metadata"] == {} and body["tools"] == []
    assert response.status == "incomplete"  # the random tiny model never says end-of-turn
    assert response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    [part] = message.content
    assert part.type == "output_text" and part.annotations == [] and part.text
    usage = response.usage
    assert usage.output_tokens == 5 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert raw.headers["x-session-id"] == body["sinkserve"]["session_id"]


def test_create_with_items_and_instructions(client):
    items = [
        {"role": "system", "content": "Answer briefly."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Blue.", "annotations": []}]},
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "content": "Another one?"},
    ]
    response = create(client, input=items, instructions="You are terse.", metadata={"run": "7"}, user="u1",
                      truncation="auto", prompt_cache_key="conversation-1")
    assert response.instructions == "You are terse." and response.metadata == {"run": "7"}
    assert response.user == "u1" and response.truncation == "auto" and response.prompt_cache_key == "conversation-1"
    listed = client.responses.input_items.list(response.id, order="asc")
    assert [(i.role, i.content[0].text) for i in listed.data] == [
        ("system", "Answer briefly."), ("user", "Name a colour."), ("assistant", "Blue."), ("developer", "Be kind."),
        ("user", "Another one?"),
    ]
    assert listed.data[2].type == "message" and listed.data[2].content[0].type == "output_text"
    newest = client.responses.input_items.list(response.id, limit=2)  # default order: newest first
    assert [i.content[0].text for i in newest.data] == ["Another one?", "Be kind."] and newest.has_more
    ResponseItemList.model_validate(newest.model_dump())


def _sse(server, body: dict) -> list[tuple[str, dict]]:
    events = []
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY_A}"}) as reply:
        assert reply.status_code == 200
        name = None
        for line in reply.iter_lines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line.removeprefix("data:"))))
    return events


def test_stream_events_in_order_with_one_sequence(server, client):
    events = _sse(server, {"model": "tiny-llama", "input": "Stream a story.", "stream": True, "max_output_tokens": 6})
    names = [name for name, _ in events]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(names[4:-4]) == {"response.output_text.delta"}
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert all(data["type"] == name for name, data in events)
    assert events[3][1]["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    deltas = "".join(data["delta"] for name, data in events if name == "response.output_text.delta")
    final = Response.model_validate(events[-1][1]["response"])
    assert final.output_text == deltas == events[-4][1]["text"]
    assert client.responses.retrieve(final.id).output_text == deltas  # stored before the last event


def test_sdk_stream_accumulates_the_same_text(client):
    with client.responses.stream(model="tiny-llama", input="Stream again.", max_output_tokens=6) as stream:
        events = list(stream)
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas and events[-1].type == "response.incomplete"  # the tiny model never ends its turn
    assert events[-1].response.output_text == "".join(deltas)
    assert client.responses.retrieve(events[-1].response.id).output_text == "".join(deltas)


def test_chain_past_the_window_prefills_only_new_tokens(client):
    previous, evicted = None, 0
    for turn in range(6):  # ~75 new tokens a turn through a 4 + 100 token cache
        response = create(client, input=filler(turn), previous_response_id=previous.id if previous else None)
        assert response.previous_response_id == (previous.id if previous else None)
        if previous is not None:
            before = previous.usage.input_tokens + previous.usage.output_tokens
            assert response.usage.input_tokens > before
            assert response.usage.input_tokens_details.cached_tokens >= 0.9 * before, (turn, response.usage)
        previous = response
        evicted = response.model_extra["sinkserve"]["evicted_tokens"]
    assert previous.usage.input_tokens > 400 and evicted > 0  # well past the window


def test_fork_from_an_older_response_keeps_the_later_branch(client):
    first = create(client, input=filler(1))
    second = create(client, input=filler(2), previous_response_id=first.id)
    third = create(client, input=filler(3), previous_response_id=second.id)
    other = create(client, input=filler(9), previous_response_id=first.id)  # a fork from the first
    assert other.usage.input_tokens_details.cached_tokens >= 0.9 * first.usage.input_tokens
    again = create(client, input=filler(3), previous_response_id=second.id)  # the later branch is intact
    assert again.output_text == third.output_text
    assert again.usage.input_tokens == third.usage.input_tokens
    assert again.usage.input_tokens_details.cached_tokens >= 0.9 * third.usage.input_tokens


def test_instructions_are_not_carried_over(client):
    first = create(client, input="Hi.", instructions="Speak like a pirate.")
    second = create(client, input="Again.", previous_response_id=first.id)
    assert second.instructions is None
    # without the system message the rendered prompt no longer starts like the first one's
    assert second.usage.input_tokens_details.cached_tokens < first.usage.input_tokens


def test_retrieve_delete_and_not_found(client, server):
    response = create(client, input="Keep this.")
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()
    other_key = OpenAI(base_url=f"{server.url}/v1", api_key=KEY_B, max_retries=0)
    with pytest.raises(NotFoundError):
        other_key.responses.retrieve(response.id)  # scoped to the key
    with pytest.raises(NotFoundError) as foreign:
        create(other_key, input="x", previous_response_id=response.id)
    assert foreign.value.body["code"] == "previous_response_not_found"
    client.responses.delete(response.id)
    with pytest.raises(NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(NotFoundError):
        client.responses.delete(response.id)
    for unknown in (response.id, "resp_unknown", "../etc/passwd"):
        with pytest.raises(NotFoundError) as missing:
            create(client, input="x", previous_response_id=unknown)
        assert missing.value.body["code"] == "previous_response_not_found"
        assert missing.value.body["param"] == "previous_response_id"


def test_store_false_is_neither_retrievable_nor_chainable(client):
    response = create(client, input="Forget this.", store=False)
    assert response.model_extra["store"] is False and response.output_text
    with pytest.raises(NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(NotFoundError):
        create(client, input="x", previous_response_id=response.id)


def test_stateless_client_resending_history_gets_the_cache(client):
    items = [{"role": "user", "content": filler(4)}]
    first = create(client, input=items, store=False)
    items += [{"role": "assistant", "content": first.output_text}, {"role": "user", "content": filler(5)}]
    second = create(client, input=items, store=False)
    assert second.usage.input_tokens_details.cached_tokens >= 0.9 * first.usage.input_tokens


def test_cancel_is_refused_and_unknown_fields_name_themselves(client, server):
    response = create(client, input="x")
    with pytest.raises(BadRequestError) as cancel:
        client.responses.cancel(response.id)
    assert "background" in cancel.value.body["message"]
    with pytest.raises(NotFoundError):
        client.responses.cancel("resp_unknown")
    cases = {
        "frobnicate": {"frobnicate": 1},
        "background": {"background": True},
        "reasoning.flavour": {"reasoning": {"effort": "high", "flavour": "x"}},
        "include": {"include": ["file_search_call.results"]},
        "tools.0.type": {"tools": [{"type": "local_shell"}]},
        "tools.0.tools.0.type": {"tools": [{"type": "namespace", "name": "n", "description": "d",
                                            "tools": [{"type": "custom", "name": "x"}]}]},
        "user": {"user": "u" * 1_000_000},  # stored with the response: bounded
        "client_metadata": {"client_metadata": {"k": "v" * 5000}},
        "tools.0.parameters": {"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
        "tool_choice": {"tool_choice": "required"},  # needs tools
        "tool_choice.name": {"tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}},
        "text.format.name": {"text": {"format": {"type": "json_schema", "name": "bad name", "schema": {}}}},
        "input": {"input": [{"role": "robot", "content": "x"}]},
        "max_output_tokens": {"max_output_tokens": 0},
        "truncation": {"truncation": "sometimes"},
        "metadata": {"metadata": {str(i): "v" for i in range(17)}},
    }
    for param, fields in cases.items():
        body = {"model": "tiny-llama", "input": "x", **fields}
        reply = httpx.post(f"{server.url}/v1/responses", json=body, headers={"Authorization": f"Bearer {KEY_A}"})
        assert reply.status_code == 400, (param, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param and param.split(".")[0] in error["message"], error
    orphan = [{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]  # answers no call
    reply = httpx.post(f"{server.url}/v1/responses", json={"model": "tiny-llama", "input": orphan},
                       headers={"Authorization": f"Bearer {KEY_A}"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "input", reply.text
    assert "call_nope" in reply.json()["error"]["message"]
    off = create(client, input="x", background=False, include=[], service_tier="auto", reasoning=None)
    assert off.status == "incomplete"
    reply = httpx.post(f"{server.url}/v1/responses", json={"model": "another-model", "input": "x"},
                       headers={"Authorization": f"Bearer {KEY_A}"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


def test_tool_call_then_its_output_chained(client):
    """tool_choice required: the grammar makes the random model call the tool with valid arguments and stop."""
    call = create(client, input="Weather in Paris?", tools=[TOOL], tool_choice="required", max_output_tokens=64)
    assert call.status == "completed"
    [item] = call.output
    assert item.type == "function_call" and item.name == "get_weather" and item.call_id.startswith("call_")
    assert json.loads(item.arguments)["city"] in ("Paris", "Rome", "Oslo")
    Response.model_validate(call.model_dump())
    # the same tools and tool_choice: the prompt's system part (tool list, reply rules) is unchanged
    answer = create(client, previous_response_id=call.id, tools=[TOOL], tool_choice="required", max_output_tokens=8,
                    input=[{"type": "function_call_output", "call_id": item.call_id, "output": "Sunny, 21 C"}])
    before = call.usage.input_tokens + call.usage.output_tokens
    assert answer.usage.input_tokens_details.cached_tokens >= 0.9 * before, answer.usage
    listed = client.responses.input_items.list(answer.id)
    assert [(i.type, i.call_id) for i in listed.data] == [("function_call_output", item.call_id)]
    # the same turn sent statelessly: the call replayed as an input item renders the same prompt
    replay = create(client, store=False, tools=[TOOL], tool_choice="required", max_output_tokens=8, input=[
        {"role": "user", "content": "Weather in Paris?"}, item.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": item.call_id, "output": "Sunny, 21 C"}])
    assert replay.usage.input_tokens == answer.usage.input_tokens


def test_streamed_tool_call_and_json_format(server, client):
    events = _sse(server, {"model": "tiny-llama", "input": "Weather?", "stream": True, "tools": [TOOL],
                           "tool_choice": "required", "max_output_tokens": 64, "temperature": 0})
    names = [name for name, _ in events]
    assert names[2] == "response.output_item.added" and events[2][1]["item"]["type"] == "function_call"
    arguments = "".join(d["delta"] for n, d in events if n == "response.function_call_arguments.delta")
    done = next(d for n, d in events if n == "response.function_call_arguments.done")
    assert done["arguments"] == arguments and json.loads(arguments)["city"]
    assert names[-1] == "response.completed"
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    schema = {"type": "object", "properties": {"mood": {"enum": ["calm", "stormy"]}}, "required": ["mood"],
              "additionalProperties": False}
    with client.responses.stream(model="tiny-llama", input="The sea's mood?", max_output_tokens=32,
                                 text={"format": {"type": "json_schema", "name": "mood", "schema": schema}}) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and json.loads(final.output_text)["mood"] in ("calm", "stormy")
    assert final.text.format.type == "json_schema"


def test_kill_between_chained_responses(server):
    """kill -9 after a response, restart: the chain continues from the saved cache, same greedy output.

    The last test of this module on the module's server, which it kills (one restart, not two more starts)."""
    history = [{"role": "user", "content": "Remember the word lighthouse. " * 5}]
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY_A, max_retries=0, timeout=60)
        first = create(client, input=history, max_output_tokens=6)
        # the reference: the same second turn as a stateless request under another key (a fresh session)
        reference_client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY_B, max_retries=0, timeout=60)
        turn = [{"role": "user", "content": "Which word?"}]
        expected = create(reference_client, input=[*history, {"role": "assistant", "content": first.output_text},
                                                    *turn], store=False, max_output_tokens=6)
        assert expected.usage.input_tokens_details.cached_tokens == 0
    finally:
        server.kill()  # SIGKILL right after the replies: no shutdown hook runs
    restarted = ServerProcess(server.data_dir, tiny=True, keys=[KEY_A, KEY_B]).start()
    try:
        client = OpenAI(base_url=f"{restarted.url}/v1", api_key=KEY_A, max_retries=0, timeout=60)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        second = create(client, input=turn, previous_response_id=first.id, max_output_tokens=6)
        assert second.usage.input_tokens == expected.usage.input_tokens
        assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
        assert second.output_text == expected.output_text
    finally:
        restarted.kill()


def test_sigterm_mid_stream_ends_it_as_incomplete_and_stores_it(tmp_path):
    """Graceful shutdown: the stream ends with ``response.incomplete`` (no cut connection), the response
    is stored, and the process exits 0 within the grace period."""
    grace = 3.0
    server = ServerProcess(tmp_path / "data", "--graceful-timeout", str(grace), tiny=True,
                           env={"SINKSERVE_MAX_TOKENS_CAP": "1000000"}).start()
    try:
        body = {"model": "tiny-llama", "input": "Talk forever.", "stream": True, "temperature": 0,
                "max_output_tokens": 1_000_000}  # greedy: the tiny model's reply is the same every run
        events, sent_at = [], None
        with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=30) as reply:
            for line in reply.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line.removeprefix("data:")))
                    if len(events) == 6:
                        sent_at = time.monotonic()
                        server.proc.send_signal(signal.SIGTERM)
        assert sent_at is not None, "the stream ended before SIGTERM was sent"
        final = events[-1]
        assert final["type"] == "response.incomplete", final["type"]
        assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert server.proc.wait(timeout=grace + 5) == 0 and time.monotonic() - sent_at < grace + 5
        assert (tmp_path / "data" / "responses" / f"{final['response']['id']}.json").exists()
    finally:
        server.kill()
