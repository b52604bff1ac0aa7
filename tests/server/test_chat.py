"""Chat completions through the real ``openai`` SDK and raw SSE, against a live uvicorn server."""

from __future__ import annotations

import json

import httpx
import pytest

MODEL = "tiny-llama"
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


def sse_payloads(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order (comment/ping lines skipped)."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_sdk_non_streaming(sdk):
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    reply = raw.parse()
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL and reply.system_fingerprint.startswith("fp_")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    extra = reply.model_extra["sinkserve"]
    assert raw.headers["x-session-id"] == extra["session_id"]
    assert int(raw.headers["x-sinkserve-evicted-tokens"]) >= 0


def test_sdk_streaming_with_usage(sdk, eos_bias):
    stream = sdk.chat.completions.create(
        model=MODEL, messages=HELLO, max_completion_tokens=6, stream=True, logit_bias=eos_bias,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


async def test_async_sdk_streaming(async_sdk):
    text = []
    stream = await async_sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    reply = await async_sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert reply.choices[0].message.content is not None
    await async_sdk.close()


def test_raw_sse_sequence(http, eos_bias):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True, "logit_bias": eos_bias,
            "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-session-id"]
        assert int(response.headers["x-sinkserve-evicted-tokens"]) >= 0
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({(c["id"], c["created"], c["model"], c["system_fingerprint"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    first, *content, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content and all(c["choices"][0]["delta"]["content"] for c in content)
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in content)
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in content) == 5
    token = content[0]["choices"][0]["logprobs"]["content"][0]
    assert set(token) == {"token", "logprob", "bytes", "top_logprobs"} and len(token["top_logprobs"]) == 2
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


def test_stream_without_usage_has_no_usage_key(http):
    body = {"messages": HELLO, "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(p) for p in sse_payloads(response)[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_prompt_three_times_the_model_positions(http, engine, eos_bias):
    story = " ".join(f"Sentence {i} tells about a river and a mountain." for i in range(45))
    messages = [{"role": "user", "content": story}]
    assert len(engine.render_chat(messages)[0]) >= 3 * engine.loaded.max_positions
    body = {"messages": messages, "max_tokens": 12, "logit_bias": eos_bias}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] >= 384 and usage["completion_tokens"] == 12
    assert int(response.headers["x-sinkserve-evicted-tokens"]) > 0
    assert response.json()["sinkserve"]["evicted_tokens"] > 0


def test_multi_turn_reuses_the_session(sdk):
    messages = [{"role": "system", "content": "You count sheep."}, {"role": "user", "content": "One sheep?"}]
    first = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Two?"}]
    second = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.model_extra["sinkserve"]["session_id"] == first.model_extra["sinkserve"]["session_id"]


def test_explicit_session_header(http):
    body = {"messages": HELLO, "max_tokens": 2}
    response = http.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "explicit-session-1"})
    assert response.status_code == 200, response.text
    assert response.headers["x-session-id"] == "explicit-session-1"


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_completions(sdk, stream, eos_bias):
    if stream:
        chunks = list(sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, stream=True,
                                             logit_bias=eos_bias, stream_options={"include_usage": True}))
        assert chunks[0].object == "text_completion"
        assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 4
    else:
        reply = sdk.completions.create(model=MODEL, prompt=["Once upon a time"], max_tokens=4, logprobs=2,
                                       logit_bias=eos_bias)
        assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
        assert reply.usage.completion_tokens == 4 and len(reply.choices[0].logprobs.tokens) == 4


def test_pinned_tokens_are_reported(http, engine):
    """``x-sinkserve-pinned-tokens`` / ``sinkserve.pinned_tokens``: the sinks, or the pinned system prompt."""
    system = [{"role": "system", "content": "You answer in one short sentence about lighthouses only."}]
    body = {"messages": [*system, {"role": "user", "content": "Hi."}], "max_tokens": 2, "temperature": 0}
    plain = http.post("/v1/chat/completions", json=body)
    assert plain.status_code == 200, plain.text
    assert plain.headers["x-sinkserve-pinned-tokens"] == str(plain.json()["sinkserve"]["pinned_tokens"])
    assert plain.json()["sinkserve"]["pinned_tokens"] == engine.config.sink_tokens
    pinned = http.post("/v1/chat/completions", json={**body, "pin_system_prompt": True})
    assert pinned.status_code == 200, pinned.text
    system_tokens = engine.render_chat(system, True)[1]  # the rendered system prompt's length
    assert pinned.json()["sinkserve"]["pinned_tokens"] == max(system_tokens, engine.config.sink_tokens) > 4
    assert pinned.headers["x-sinkserve-pinned-tokens"] == str(pinned.json()["sinkserve"]["pinned_tokens"])
