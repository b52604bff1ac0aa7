"""``POST /v1/completions``: the legacy text completion API over the same engine (no chat template).

Wire format: https://platform.openai.com/docs/api-reference/completions (``text_completion`` objects,
legacy logprobs with ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``). One prompt per
request (a string, a list of one string, or a list of token ids); ``echo``, ``suffix`` and ``best_of > 1``
are refused.
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
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)

router = APIRouter(tags=["completions"])
ENDPOINT = "/v1/completions"


def legacy_logprobs(tokens: list[TokenEvent], offset: int = 0) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for event in tokens:
        if event.logprob is None:
            continue
        out.tokens.append(event.logprob.token)
        out.token_logprobs.append(event.logprob.logprob)
        out.top_logprobs.append({t.token: t.logprob for t in event.top_logprobs})
        out.text_offset.append(offset)
        offset += len(event.text)
    return out


@router.post(ENDPOINT, response_model=CompletionResponse, responses=STREAM_RESPONSE)
async def create_completion(
    body: CompletionRequest,
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
    params = body.to_sampling_params(settings.default_max_tokens, settings.max_tokens_cap)
    if isinstance(body.prompt, list):  # token ids: the engine does not range-check prompts itself
        prompt = body.prompt
        if not all(0 <= t < engine.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be between 0 and {engine.vocab_size - 1}",
                           param="prompt", code="invalid_value")
    else:
        prompt = await asyncio.to_thread(engine.encode, body.prompt)
    check_prompt_length(prompt, settings, param="prompt")
    gen, slot = await start_generation(engine, limiter, api_key, prompt, params,
                                       session_id=body.session_id or x_session_id, pin_prefix=0)
    if body.stream:
        base = CompletionResponse(model=model, system_fingerprint=fingerprint(engine))
        shutdown = StreamShutdown(settings.timeout_graceful_shutdown)
        events = stream_completion(gen, slot, timer, base, body.include_usage, params.logprobs, shutdown)
        return shutdown.response(events, gen)
    result = await collect(gen, slot, timer, request)
    finish = result.finish
    logprobs = legacy_logprobs(result.tokens) if params.logprobs else None
    response.headers.update(session_headers(gen, finish.usage.evicted_tokens))
    return CompletionResponse(
        model=model, system_fingerprint=fingerprint(engine),
        choices=[CompletionChoice(text=result.text, logprobs=logprobs, finish_reason=finish.finish_reason)],
        usage=usage_info(finish), sinkserve=sinkserve_info(gen, finish),
    )


def stream_completion(
    gen: Generation, slot: Slot, timer: TokenTimer, base: CompletionResponse, include_usage: bool,
    want_logprobs: bool, shutdown: StreamShutdown | None = None,
) -> AsyncIterator[dict]:
    shutdown = shutdown or StreamShutdown()
    chunks = _completion_chunks(gen, timer, base, include_usage, want_logprobs, shutdown)
    return sse_events(chunks, gen, slot, shutdown)


async def _completion_chunks(
    gen: Generation, timer: TokenTimer, base: CompletionResponse, include_usage: bool, want_logprobs: bool,
    shutdown: StreamShutdown,
) -> AsyncIterator[dict]:
    exclude = {"sinkserve"} if include_usage else {"sinkserve", "usage"}

    def chunk(choices: list[CompletionChoice], usage=None) -> dict:
        data = base.model_copy(update={"choices": choices, "usage": usage})
        return {"data": json.dumps(data.model_dump(exclude=exclude))}

    offset, pending = 0, []
    async for event in gen:
        if isinstance(event, TokenEvent):
            timer.token()
            pending.append(event)
            if event.text:
                logprobs = legacy_logprobs(pending, offset) if want_logprobs else None
                yield chunk([CompletionChoice(text=event.text, logprobs=logprobs)])
                offset += sum(len(e.text) for e in pending)
                pending = []
            continue
        reason = shutdown.finish_reason(event)
        if reason not in ("stop", "length"):
            yield error_event(event)
            return
        logprobs = legacy_logprobs(pending, offset) if want_logprobs else None
        yield chunk([CompletionChoice(text=event.text, logprobs=logprobs, finish_reason=reason)])
        if include_usage:
            yield chunk([], usage=usage_info(event))
