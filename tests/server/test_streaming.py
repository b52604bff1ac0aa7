"""Stream formatting in isolation: failures after the first byte, held-back text, chunked uploads."""

from __future__ import annotations

import asyncio
import json

from engine.events import Admission, FinishEvent, Generation, TokenEvent, TokenLogprob, Usage
from engine.scheduling.sampling import SamplingParams
from server.generation import Run, stream_events
from server.limits import KeyLimiter
from server.metrics import Metrics, TokenTimer
from server.routes.chat import ChatFormatter


def fake_generation(*events) -> tuple[Generation, list[bool]]:
    queue: asyncio.Queue = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)
    cancelled: list[bool] = []
    return Generation(Admission("s1", 3, 0, 0), queue, lambda: cancelled.append(True)), cancelled


def chat_stream(gen: Generation, slot, include_usage=False, logprobs=False):
    run = Run("m", "fp_x", SamplingParams(logprobs=logprobs), gen, include_usage=include_usage)
    return stream_events(run, slot, ChatFormatter(), TokenTimer(Metrics(lambda: None), "t"))


async def run_stream(gen: Generation, include_usage=False, logprobs=False) -> list[str]:
    limiter = KeyLimiter(1)
    slot = limiter.acquire(None)
    payloads = [e["data"] async for e in chat_stream(gen, slot, include_usage, logprobs)]
    assert slot.released and not limiter.active
    return payloads


async def test_error_after_the_stream_began():
    gen, _ = fake_generation(TokenEvent("Hi", 5), FinishEvent("error", Usage(3, 1, 0, 0), error="device lost"))
    payloads = await run_stream(gen)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[1])["choices"][0]["delta"] == {"content": "Hi"}
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "server_error" and "device lost" in error["message"]


async def test_held_back_text_and_logprobs_are_flushed_at_the_end():
    lp = TokenLogprob("x", -0.5, [120])
    gen, _ = fake_generation(TokenEvent("", 7, lp, [lp]), FinishEvent("stop", Usage(3, 1, 0, 0), text="x"))
    chunks = [json.loads(p) for p in (await run_stream(gen, include_usage=True, logprobs=True))[:-1]]
    flushed = chunks[1]["choices"][0]
    assert flushed["delta"] == {"content": "x"} and flushed["logprobs"]["content"][0]["token"] == "x"
    assert chunks[2]["choices"][0]["finish_reason"] == "stop" and chunks[3]["usage"]["total_tokens"] == 4


async def test_closing_the_stream_cancels_the_generation():
    gen, cancelled = fake_generation(TokenEvent("a", 1))
    limiter = KeyLimiter(1)
    slot = limiter.acquire(None)
    stream = chat_stream(gen, slot)
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    assert cancelled and slot.released


def test_chunked_upload_over_the_limit(http):
    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(5):
            yield b"x" * 1024 * 1024
        yield b'"}]}'

    response = http.post("/v1/chat/completions", content=body(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_completion_from_token_ids(http):
    response = http.post("/v1/completions", json={"prompt": [1, 2, 3, 4], "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 4


