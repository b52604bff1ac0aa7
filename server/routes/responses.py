"""``/v1/responses``: OpenAI's Responses API, with ``previous_response_id`` continued by the session cache.

Wire format: https://platform.openai.com/docs/api-reference/responses and, for streaming,
https://platform.openai.com/docs/api-reference/responses-streaming (``event:`` names, one
``sequence_number`` counter from 0: created, in_progress, output_item.added, content_part.added,
output_text.delta..., output_text.done, content_part.done, output_item.done, then completed or
incomplete; a failure is an ``error`` event then ``response.failed``; no ``[DONE]``).

A response renders its whole conversation with the chat template: the request's ``instructions`` as
the system message (never carried over from the previous response, as OpenAI documents), the stored
conversation of ``previous_response_id``, then the new input items. With a previous response the
engine is told its session and ``fork=True``: a prompt that extends that session's stream prefills
only its new tokens; one that diverges (a fork from an older response of the chain, changed
instructions) continues a copy, so no branch destroys another. Without one (stateless clients that
resend their history) the engine's implicit prefix matching finds the session, as for chat.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response

from engine.engine import Engine, owner_of
from engine.events import FinishEvent, Generation, TokenEvent
from server.deps import ApiKeyDep, EngineDep, LimiterDep, MetricsDep, SettingsDep
from server.errors import APIError
from server.generation import (
    StreamShutdown,
    check_model,
    check_prompt_length,
    collect,
    session_headers,
    sse_response,
)
from server.limits import Slot
from server.metrics import TokenTimer
from server.protocol import STREAM_RESPONSE
from server.response_store import ResponseStore, StoredResponse
from server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputItemList,
    InputTokensDetails,
    MessageItem,
    OutputMessage,
    OutputText,
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseError,
    ResponseObject,
    ResponseSinkserve,
    ResponseUsage,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["responses"])
ENDPOINT = "/v1/responses"


def get_store(request: Request, engine: Engine) -> ResponseStore:
    """The app's store of responses, beside the engine's session files (created on first use)."""
    root = engine.config.data_dir / "responses"
    store: ResponseStore | None = getattr(request.app.state, "response_store", None)
    if store is None or store.root != root:
        store = ResponseStore(root, engine.config.session_ttl_s)
        request.app.state.response_store = store
    return store


def check_query(request: Request, allowed: set[str]) -> None:
    """Query parameters are request fields too: unknown ones are refused, never ignored."""
    for name in request.query_params:
        if name not in allowed:
            raise APIError(400, f"unknown query parameter {name!r}", param=name, code="unknown_parameter")


def not_found(response_id: str) -> APIError:
    return APIError(404, f"no response with id {response_id!r} found", param="response_id",
                    code="response_not_found")


def check_features(body: ResponseCreateRequest) -> None:
    """What the structured-output and tool machinery will handle: refused until it is wired in."""
    if body.tools:
        raise APIError(400, "tools are not supported yet by this server", param="tools", code="unsupported_parameter")
    if body.tool_choice not in ("auto", "none"):
        raise APIError(400, "tool_choice needs tools, which are not supported yet by this server",
                       param="tool_choice", code="unsupported_parameter")
    if body.text and body.text.format and body.text.format.type != "text":
        raise APIError(400, f"text.format {body.text.format.type!r} is not supported yet by this server "
                       "(only 'text')", param="text.format", code="unsupported_parameter")
    for index, item in enumerate(body.items()):
        if isinstance(item, FunctionCallItem | FunctionCallOutputItem):
            raise APIError(400, f"{item.type} items need tools, which are not supported yet by this server",
                           param=f"input.{index}.type", code="unsupported_parameter")


# ----- create ----------------------------------------------------------------------------------------
@dataclass
class Turn:
    """One response being generated: what it answers, and what it will store."""

    obj: ResponseObject
    history: list[dict[str, Any]]  # the conversation before the output
    input_items: list[dict[str, Any]]
    owner: str
    store: ResponseStore | None  # None: ``store: false``
    gen: Generation

    def finish(self, text: str, finish: FinishEvent) -> None:
        """Fill in the output, status and usage of a generation that ended normally."""
        obj, usage = self.obj, finish.usage
        complete = finish.finish_reason == "stop"
        message = obj.output[0] if obj.output else OutputMessage()
        message.status = "completed" if complete else "incomplete"
        message.content = [OutputText(text=text, logprobs=[])]
        obj.output = [message]
        obj.status = "completed" if complete else "incomplete"
        obj.incomplete_details = None if complete else IncompleteDetails()
        obj.completed_at = float(int(time.time())) if complete else None
        obj.usage = ResponseUsage(
            input_tokens=usage.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens,
                                                    cache_write_tokens=usage.prompt_tokens - usage.cached_tokens),
            output_tokens=usage.completion_tokens, total_tokens=usage.prompt_tokens + usage.completion_tokens,
        )
        obj.sinkserve = ResponseSinkserve(session_id=self.gen.session_id, evicted_tokens=usage.evicted_tokens,
                                          cached_tokens=usage.cached_tokens)

    async def save(self, text: str, finish: FinishEvent) -> None:
        if self.store is None:
            return
        usage = finish.usage
        record = StoredResponse(
            id=self.obj.id, owner=self.owner, created_at=self.obj.created_at, session_id=self.gen.session_id,
            stream_tokens=usage.prompt_tokens + usage.completion_tokens,
            messages=[*self.history, {"role": "assistant", "content": text}],
            input_items=self.input_items, response=self.obj.model_dump(mode="json"),
        )
        await asyncio.to_thread(self.store.put, record)


@router.post(ENDPOINT, response_model=ResponseObject, responses=STREAM_RESPONSE)
async def create_response(
    body: ResponseCreateRequest,
    request: Request,
    response: Response,
    api_key: ApiKeyDep,
    engine: EngineDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    metrics: MetricsDep,
):
    timer = TokenTimer(metrics, ENDPOINT)
    model = check_model(body.model, engine)
    check_features(body)
    items = body.items()
    if len(items) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} input items per request", param="input",
                       code="too_many_messages")
    store = get_store(request, engine)
    owner = owner_of(api_key)
    previous = None
    if body.previous_response_id is not None:
        previous = await asyncio.to_thread(store.get, owner, body.previous_response_id)
        if previous is None:
            raise APIError(404, f"previous response {body.previous_response_id!r} not found",
                           param="previous_response_id", code="previous_response_not_found")
    history = [*(previous.messages if previous else []), *(item.to_message() for item in items
                                                           if isinstance(item, MessageItem))]
    system = [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
    params = body.to_sampling_params(settings.default_max_tokens, settings.max_tokens_cap)
    prompt, pinned = await asyncio.to_thread(engine.render_chat, system + history, settings.pin_system_prompt)
    check_prompt_length(prompt, settings, param="input")
    slot = limiter.acquire(api_key)
    try:
        gen = await engine.generate(prompt, params, api_key=api_key, pin_prefix=pinned, fork=True,
                                    session_id=previous.session_id if previous else None)
    except BaseException:
        slot.release()
        raise
    turn = Turn(ResponseObject.for_request(body, model), history, [item.stored() for item in items], owner,
                store if body.store else None, gen)
    if body.stream:
        shutdown = StreamShutdown(settings.timeout_graceful_shutdown)
        return sse_response(stream_events(turn, slot, timer, shutdown), gen, shutdown)
    result = await collect(gen, slot, timer, request)
    turn.finish(result.text, result.finish)
    await turn.save(result.text, result.finish)
    response.headers.update(session_headers(gen, result.finish))
    return turn.obj


# ----- streaming -------------------------------------------------------------------------------------
async def stream_events(turn: Turn, slot: Slot, timer: TokenTimer, shutdown: StreamShutdown) -> AsyncIterator[dict]:
    """The SSE events of one streamed response; the shutdown watcher, the generation and the concurrency
    slot are released whatever happens (the client leaving closes this generator)."""
    watcher = shutdown.watch(turn.gen)
    counter = itertools.count()

    def event(kind: str, **fields: Any) -> dict:
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": next(counter), **fields})}

    try:
        async for item in _lifecycle(turn, timer, event):
            yield item
    except Exception:
        log.exception("response stream failed")
        yield event("error", code="server_error", message="internal server error", param=None)
        turn.obj.status = "failed"
        turn.obj.error = ResponseError(message="internal server error")
        yield event("response.failed", response=turn.obj.model_dump(mode="json"))
    finally:
        watcher.cancel()
        turn.gen.cancel()
        slot.release()


async def _lifecycle(turn: Turn, timer: TokenTimer, event) -> AsyncIterator[dict]:
    obj = turn.obj
    yield event("response.created", response=obj.model_dump(mode="json"))
    yield event("response.in_progress", response=obj.model_dump(mode="json"))
    message = OutputMessage(status="in_progress")
    obj.output = [message]
    where = {"item_id": message.id, "output_index": 0}
    yield event("response.output_item.added", output_index=0, item=message.model_dump(mode="json"))
    part = OutputText(text="", logprobs=[])
    yield event("response.content_part.added", **where, content_index=0, part=part.model_dump(mode="json"))
    parts: list[str] = []
    finish: FinishEvent | None = None
    async for item in turn.gen:
        if isinstance(item, TokenEvent):
            timer.token()
            if item.text:
                parts.append(item.text)
                yield event("response.output_text.delta", **where, content_index=0, delta=item.text, logprobs=[])
        else:
            finish = item
    assert finish is not None
    if finish.finish_reason not in ("stop", "length"):
        if finish.finish_reason == "cancelled":
            message_text, code = "the generation was cancelled (the server is shutting down)", "cancelled"
        else:
            log.error("generation failed mid-stream: %s", finish.error)
            message_text, code = f"generation failed: {finish.error}", "server_error"
        yield event("error", code=code, message=message_text, param=None)
        obj.status = "failed"
        obj.error = ResponseError(message=message_text)
        yield event("response.failed", response=obj.model_dump(mode="json"))
        return
    if finish.text:
        parts.append(finish.text)
        yield event("response.output_text.delta", **where, content_index=0, delta=finish.text, logprobs=[])
    text = "".join(parts)
    turn.finish(text, finish)
    yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
    done_part = obj.output[0].content[0].model_dump(mode="json")
    yield event("response.content_part.done", **where, content_index=0, part=done_part)
    yield event("response.output_item.done", output_index=0, item=obj.output[0].model_dump(mode="json"))
    await turn.save(text, finish)  # stored before the client can chain from it
    kind = "response.completed" if obj.status == "completed" else "response.incomplete"
    yield event(kind, response=obj.model_dump(mode="json"))


# ----- stored responses ------------------------------------------------------------------------------
async def _stored(request: Request, engine: Engine, api_key: str | None, response_id: str) -> StoredResponse:
    record = await asyncio.to_thread(get_store(request, engine).get, owner_of(api_key), response_id)
    if record is None:
        raise not_found(response_id)
    return record


@router.get(ENDPOINT + "/{response_id}", response_model=ResponseObject)
async def get_response(response_id: str, request: Request, api_key: ApiKeyDep, engine: EngineDep) -> dict:
    check_query(request, {"include", "include_obfuscation", "starting_after", "stream"})
    if request.query_params.get("stream", "false").lower() not in ("false", "0"):
        raise APIError(400, "streaming a stored response is only for background responses, which this server "
                       "does not run", param="stream", code="unsupported_parameter")
    if request.query_params.getlist("include") or request.query_params.getlist("include[]"):
        raise APIError(400, "include is not supported by this server", param="include", code="unsupported_parameter")
    return (await _stored(request, engine, api_key, response_id)).response


@router.delete(ENDPOINT + "/{response_id}", response_model=ResponseDeleted)
async def delete_response(response_id: str, request: Request, api_key: ApiKeyDep, engine: EngineDep):
    store = get_store(request, engine)
    if not await asyncio.to_thread(store.delete, owner_of(api_key), response_id):
        raise not_found(response_id)
    return ResponseDeleted(id=response_id)


@router.post(ENDPOINT + "/{response_id}/cancel", response_model=ResponseObject)
async def cancel_response(response_id: str, request: Request, api_key: ApiKeyDep, engine: EngineDep):
    await _stored(request, engine, api_key, response_id)
    raise APIError(400, "only background responses can be cancelled, and this server does not run responses in "
                   "the background", param="response_id", code="unsupported_parameter")


@router.get(ENDPOINT + "/{response_id}/input_items", response_model=InputItemList)
async def list_input_items(response_id: str, request: Request, api_key: ApiKeyDep, engine: EngineDep,
                           after: str | None = None, limit: int = 20, order: str = "desc") -> InputItemList:
    check_query(request, {"after", "limit", "order", "include", "include[]"})
    if request.query_params.getlist("include") or request.query_params.getlist("include[]"):
        raise APIError(400, "include is not supported by this server", param="include", code="unsupported_parameter")
    if not 1 <= limit <= 100:
        raise APIError(400, "limit must be between 1 and 100", param="limit", code="invalid_value")
    if order not in ("asc", "desc"):
        raise APIError(400, "order must be 'asc' or 'desc'", param="order", code="invalid_value")
    items = (await _stored(request, engine, api_key, response_id)).input_items
    items = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(404, f"no input item with id {after!r} in this response", param="after",
                           code="item_not_found")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return InputItemList(data=page, first_id=page[0]["id"] if page else None,
                         last_id=page[-1]["id"] if page else None, has_more=len(items) > limit)
