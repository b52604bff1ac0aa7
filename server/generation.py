"""What chat and legacy completions share: admission, collecting events, usage, headers, errors.

The engine yields ``TokenEvent``s then one ``FinishEvent`` (``engine/events.py``); this module turns
them into OpenAI usage and logprob objects. Routes only choose the response shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from fastapi import Request
from sse_starlette import EventSourceResponse

from engine.engine import Engine
from engine.events import FinishEvent, Generation, TokenEvent, TokenLogprob
from engine.sampling import SamplingParams
from server.errors import APIError
from server.limits import KeyLimiter, Slot
from server.metrics import TokenTimer
from server.protocol import PromptTokensDetails, SinkserveInfo, TokenLogprobs, TopLogprob, UsageInfo
from server.settings import Settings

log = logging.getLogger(__name__)


def check_model(model: str | None, engine: Engine) -> str:
    if model is not None and model != engine.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {engine.model_name!r}",
                       param="model", code="model_not_found")
    return engine.model_name


def check_prompt_length(prompt: list[int], settings: Settings, param: str = "messages") -> None:
    if len(prompt) > settings.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(prompt)} tokens, this server allows {settings.max_prompt_tokens} "
                       "(max_prompt_tokens)", param=param, code="context_length_exceeded")


def fingerprint(engine: Engine) -> str:
    """Changes whenever the model or the cache geometry (which shapes outputs) changes."""
    c = engine.config
    key = f"{engine.model_name}|{c.dtype}|{c.sink_tokens}|{c.window}|{c.evict_block}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]


async def start_generation(
    engine: Engine, limiter: KeyLimiter, api_key: str | None, prompt: list[int], params: SamplingParams,
    session_id: str | None, pin_prefix: int,
) -> tuple[Generation, Slot]:
    """Take a concurrency slot for the key, then wait for the engine to admit the request."""
    slot = limiter.acquire(api_key)
    try:
        gen = await engine.generate(prompt, params, api_key=api_key, session_id=session_id, pin_prefix=pin_prefix)
    except BaseException:
        slot.release()
        raise
    return gen, slot


PING_SECONDS = 5  # SSE comment lines keep proxies from closing the connection during a long prefill
SHUTDOWN_MARGIN_S = 1.5  # streams still running this long before uvicorn's deadline are ended cleanly


class StreamShutdown:
    """Graceful shutdown for one SSE stream.

    On SIGTERM sse-starlette sets ``event`` (its watcher polls every 0.5 s) and, by default, cancels the
    stream at once: a cut connection. Instead the stream may keep generating for the grace period
    (``timeout_graceful_shutdown`` less a margin); a generation still running then is cancelled in the
    engine, and its ``cancelled`` finish is sent as a normal ``length`` finish chunk followed by ``[DONE]``,
    before uvicorn's own deadline would cut the connection.
    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.event = anyio.Event()
        self.timeout = timeout_s
        self.grace = max(0.0, self.timeout - SHUTDOWN_MARGIN_S)

    def response(self, events, gen: Generation) -> EventSourceResponse:
        return EventSourceResponse(events, ping=PING_SECONDS, sep="\n", headers=session_headers(gen),
                                   shutdown_event=self.event, shutdown_grace_period=self.timeout)

    async def _cancel_after_grace(self, gen: Generation) -> None:
        await self.event.wait()
        await asyncio.sleep(self.grace)
        log.info("shutdown grace period over; ending the stream of session %s", gen.session_id)
        gen.cancel()

    def watch(self, gen: Generation) -> asyncio.Task:
        return asyncio.create_task(self._cancel_after_grace(gen))

    def finish_reason(self, finish: FinishEvent) -> str:
        """``length`` for a generation cut short by the shutdown; otherwise the engine's reason."""
        if finish.finish_reason == "cancelled" and self.event.is_set():
            return "length"
        return finish.finish_reason


async def sse_events(chunks: AsyncIterator[dict], gen: Generation, slot: Slot,
                     shutdown: StreamShutdown) -> AsyncIterator[dict]:
    """A streamed reply's SSE events: ``chunks``, then ``[DONE]``; an unexpected failure becomes an error
    event. The shutdown watcher, the generation and the concurrency slot are released whatever happens
    (the client leaving closes this generator)."""
    watcher = shutdown.watch(gen)
    try:
        async for chunk in chunks:
            yield chunk
        yield {"data": "[DONE]"}
    except Exception:
        yield unexpected_error_event()
        yield {"data": "[DONE]"}
    finally:
        watcher.cancel()
        gen.cancel()
        slot.release()


def session_headers(gen: Generation, evicted: int | None = None) -> dict[str, str]:
    evicted = gen.admission.evicted_tokens if evicted is None else evicted
    return {"x-session-id": gen.session_id, "x-sinkserve-evicted-tokens": str(evicted)}


@dataclass
class Collected:
    text: str
    tokens: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None


async def cancel_on_disconnect(request: Request, gen: Generation) -> None:
    """Non-streaming requests: the body is read, so the next ASGI message is the client leaving."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    log.info("client left; cancelling session %s", gen.session_id)
    gen.cancel()


async def collect(gen: Generation, slot: Slot, timer: TokenTimer, request: Request) -> Collected:
    """Run a generation to its end (non-streaming); cancelled and failed ones become HTTP errors.

    The request's concurrency slot and the generation are released whatever happens.
    """
    parts: list[str] = []
    tokens: list[TokenEvent] = []
    finish = None
    watcher = asyncio.create_task(cancel_on_disconnect(request, gen))
    try:
        async for event in gen:
            if isinstance(event, TokenEvent):
                timer.token()
                tokens.append(event)
                parts.append(event.text)
            else:
                finish = event
    finally:
        watcher.cancel()
        slot.release()
        gen.cancel()
    assert finish is not None
    check_finish(finish)
    parts.append(finish.text)
    return Collected("".join(parts), tokens, finish)


def check_finish(finish: FinishEvent) -> None:
    if finish.finish_reason == "error":
        log.error("generation failed: %s", finish.error)
        raise APIError(500, f"generation failed: {finish.error}", type="server_error", code="generation_failed")
    if finish.finish_reason == "cancelled":
        raise APIError(503, "the generation was cancelled (the server is shutting down)", code="cancelled")


def error_event(finish: FinishEvent) -> dict:
    """The SSE event that reports a failure after the stream began (then ``[DONE]`` follows)."""
    if finish.finish_reason == "cancelled":
        error = APIError(503, "the generation was cancelled (the server is shutting down)", code="cancelled")
    else:
        log.error("generation failed mid-stream: %s", finish.error)
        error = APIError(500, f"generation failed: {finish.error}", type="server_error", code="generation_failed")
    return {"data": json.dumps(error.body())}


def unexpected_error_event() -> dict:
    log.exception("stream failed")
    return {"data": json.dumps(APIError(500, "internal server error", type="server_error").body())}


def usage_info(finish: FinishEvent) -> UsageInfo:
    u = finish.usage
    return UsageInfo(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
    )


def sinkserve_info(gen: Generation, finish: FinishEvent) -> SinkserveInfo:
    return SinkserveInfo(session_id=gen.session_id, evicted_tokens=finish.usage.evicted_tokens,
                         cached_tokens=finish.usage.cached_tokens)


def _top(lp: TokenLogprob) -> TopLogprob:
    return TopLogprob(token=lp.token, logprob=lp.logprob, bytes=lp.bytes)


def chat_logprobs(event: TokenEvent) -> TokenLogprobs | None:
    if event.logprob is None:
        return None
    lp = event.logprob
    return TokenLogprobs(token=lp.token, logprob=lp.logprob, bytes=lp.bytes,
                         top_logprobs=[_top(t) for t in event.top_logprobs])
