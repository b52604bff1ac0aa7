"""``POST /v1/chat/completions``: OpenAI chat completions, plain JSON or server-sent events.

Wire format: https://platform.openai.com/docs/api-reference/chat/create and, for streaming,
https://platform.openai.com/docs/api-reference/chat-streaming (first chunk carries the role, the last
choice chunk an empty delta and the finish reason, an optional usage chunk with ``choices: []``, then
``data: [DONE]``). SSE framing by sse-starlette (https://github.com/sysid/sse-starlette); when the
client disconnects it cancels the generator task, whose ``finally`` cancels the engine request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response

from engine.events import Generation, TokenEvent
from server.deps import ApiKeyDep, EngineDep, LimiterDep, MetricsDep, SettingsDep
from server.errors import APIError
from server.generation import (
    StreamShutdown,
    chat_logprobs,
    check_model,
    check_prompt_length,
    collect,
    error_event,
    fingerprint,
    session_headers,
    sinkserve_info,
    sse_events,
    start_generation,
    usage_info,
)
from server.limits import Slot
from server.metrics import TokenTimer
from server.protocol import (
    STREAM_RESPONSE,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkChoice,
)

router = APIRouter(tags=["chat"])
ENDPOINT = "/v1/chat/completions"


@router.post(ENDPOINT, response_model=ChatCompletionResponse, responses=STREAM_RESPONSE)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    api_key: ApiKeyDep,
    engine: EngineDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    metrics: MetricsDep,
    x_session_id: Annotated[str | None, Header()] = None,
):
    timer = TokenTimer(metrics, ENDPOINT)
    model = check_model(body.model, engine)
    if len(body.messages) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} messages per request", param="messages",
                       code="too_many_messages")
    params = body.to_sampling_params(settings.default_max_tokens, settings.max_tokens_cap)
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    pin = settings.pin_system_prompt if body.pin_system_prompt is None else body.pin_system_prompt
    prompt, system_len = await asyncio.to_thread(engine.render_chat, messages, pin)
    check_prompt_length(prompt, settings)
    gen, slot = await start_generation(
        engine, limiter, api_key, prompt, params, session_id=body.session_id or x_session_id,
        pin_prefix=system_len,
    )
    if body.stream:
        first = ChatCompletionChunk(model=model, system_fingerprint=fingerprint(engine))
        shutdown = StreamShutdown(settings.timeout_graceful_shutdown)
        events = stream_chat(gen, slot, timer, first, body.include_usage, params.logprobs, shutdown)
        return shutdown.response(events, gen)
    result = await collect(gen, slot, timer, request)
    finish = result.finish
    logprobs = None
    if params.logprobs:
        logprobs = ChoiceLogprobs(content=[lp for t in result.tokens if (lp := chat_logprobs(t))])
    response.headers.update(session_headers(gen, finish.usage.evicted_tokens))
    return ChatCompletionResponse(
        model=model, system_fingerprint=fingerprint(engine),
        choices=[ChatChoice(message=AssistantMessage(content=result.text), logprobs=logprobs,
                            finish_reason=finish.finish_reason)],
        usage=usage_info(finish), sinkserve=sinkserve_info(gen, finish),
    )


def stream_chat(
    gen: Generation, slot: Slot, timer: TokenTimer, base: ChatCompletionChunk, include_usage: bool,
    want_logprobs: bool, shutdown: StreamShutdown | None = None,
) -> AsyncIterator[dict]:
    """Chunks exactly as OpenAI sends them; every chunk shares ``base``'s id, created and model."""
    shutdown = shutdown or StreamShutdown()
    chunks = _chat_chunks(gen, timer, base, include_usage, want_logprobs, shutdown)
    return sse_events(chunks, gen, slot, shutdown)


async def _chat_chunks(
    gen: Generation, timer: TokenTimer, base: ChatCompletionChunk, include_usage: bool, want_logprobs: bool,
    shutdown: StreamShutdown,
) -> AsyncIterator[dict]:
    def chunk(choices: list[ChunkChoice], usage=None) -> dict:
        data = base.model_copy(update={"choices": choices, "usage": usage})
        return {"data": json.dumps(data.model_dump(exclude=None if include_usage else {"usage"}))}

    yield chunk([ChunkChoice(delta={"role": "assistant", "content": ""})])
    pending = []  # logprobs of tokens whose text is still held back (stop strings, partial UTF-8)
    async for event in gen:
        if isinstance(event, TokenEvent):
            timer.token()
            if want_logprobs and (lp := chat_logprobs(event)):
                pending.append(lp)
            if event.text:
                logprobs = ChoiceLogprobs(content=pending) if want_logprobs else None
                yield chunk([ChunkChoice(delta={"content": event.text}, logprobs=logprobs)])
                pending = []
            continue
        reason = shutdown.finish_reason(event)
        if reason not in ("stop", "length"):
            yield error_event(event)
            return
        if event.text or pending:
            logprobs = ChoiceLogprobs(content=pending) if want_logprobs else None
            yield chunk([ChunkChoice(delta={"content": event.text}, logprobs=logprobs)])
        yield chunk([ChunkChoice(delta={}, finish_reason=reason)])
        if include_usage:
            yield chunk([], usage=usage_info(event))
