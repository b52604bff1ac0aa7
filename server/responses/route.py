"""``/v1/responses``: OpenAI's Responses API, with ``previous_response_id`` continued by the session cache.

Wire format: https://platform.openai.com/docs/api-reference/responses and, for streaming,
https://platform.openai.com/docs/api-reference/responses-streaming (``event:`` names, one
``sequence_number`` counter from 0: created, in_progress, then the output items' events
(``server/responses/output.py``), then completed or incomplete; a failure is an ``error`` event then
``response.failed``; no ``[DONE]``).

A response renders its whole conversation with the chat template: the request's ``instructions`` as
the system message (never carried over from the previous response, as OpenAI documents), the stored
conversation of ``previous_response_id``, then the new input items. With a previous response the
engine is told its session and ``fork=True``: a prompt that extends that session's stream prefills
only its new tokens; one that diverges (a fork from an older response of the chain, changed
instructions) continues a copy, so no branch destroys another. Without one (stateless clients that
resend their history) the engine's implicit prefix matching finds the session, as for chat.

``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``text.format`` go through chat's machinery
(``server/responses/chat.py`` translates the shapes; ``server/tools.py`` makes the prompt and grammar).
Everything else is the shared serving path (``server/generation.py``: parameters, admission, streaming,
collecting, shutdown, releasing); this module keeps the Responses shapes (:class:`ResponsesFormatter`)
and stores a finished response before its final event or body goes out.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request, Response

from engine.engine import Engine, owner_of
from engine.errors import InvalidRequest
from engine.events import FinishEvent, TokenEvent
from server.deps import ApiKeyDep, EngineDep
from server.errors import APIError, from_engine_error
from server.generation import (
    Collected,
    Formatter,
    Run,
    ServingDep,
    StreamShutdown,
    collect,
    fingerprint,
    session_headers,
    sse_response,
    stream_events,
)
from server.metrics import TokenTimer
from server.protocol import STREAM_RESPONSE
from server.responses.chat import (
    ToolFieldError,
    chat_messages,
    chat_response_format,
    chat_tool_choice,
    chat_tools,
    responses_param,
)
from server.responses.output import ResponseOutput
from server.responses.protocol import (
    IncompleteDetails,
    InputItemList,
    InputTokensDetails,
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseError,
    ResponseObject,
    ResponseSinkserve,
    ResponseUsage,
)
from server.responses.store import ResponseStore, StoredResponse
from server.tools import ChatPlan, plan_chat, plan_constraint

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


def field_error(exc: InvalidRequest | ToolFieldError, fallback: str) -> APIError:
    """A refusal of the tool machinery, naming the Responses field (chat's name rewritten)."""
    chat_param = getattr(exc, "param", None)
    param = responses_param(chat_param) or fallback
    message = str(exc).replace(chat_param, param) if chat_param else str(exc)
    message = re.sub(r"messages\[\d+\]", "an input item", message)  # chat's message index means nothing here
    error = from_engine_error(exc) if isinstance(exc, InvalidRequest) else APIError(400, message)
    error.message, error.param = message, param
    error.code = error.code or "invalid_value"
    return error


def plan(body: ResponseCreateRequest, messages: list[dict[str, Any]], engine: Engine) -> ChatPlan:
    """The prompt's messages and the grammar of this request's tools and text format (server/tools.py)."""
    try:
        tools = chat_tools(body)
        # OpenAI's default ``auto`` also applies to a request without tools; chat's machinery reads it as a
        # request for tools, so without tools the default is left out
        choice = None if not tools and body.tool_choice == "auto" else chat_tool_choice(body.tool_choice)
        return plan_chat(messages, tools=tools, tool_choice=choice,
                         parallel_tool_calls=body.parallel_tool_calls,
                         response_format=chat_response_format(body.text.format if body.text else None),
                         chat_template=engine.tokenizer.chat_template)
    except (InvalidRequest, ToolFieldError) as exc:
        raise field_error(exc, "tools") from exc


# ----- create ----------------------------------------------------------------------------------------
@dataclass
class Turn:
    """One response being generated: what it answers, its output, and what it will store."""

    obj: ResponseObject
    history: list[dict[str, Any]]  # the conversation before the output (chat messages)
    input_items: list[dict[str, Any]]
    owner: str
    store: ResponseStore | None  # None: ``store: false``
    output: ResponseOutput
    record: StoredResponse | None = None  # set once the generation finished normally

    def finish(self, run: Run, finish: FinishEvent) -> Iterator[tuple[str, dict]]:
        """Close the output items and fill in status and usage (a generation that ended normally)."""
        obj, usage = self.obj, finish.usage
        complete = finish.finish_reason == "stop"
        yield from self.output.close(complete)
        obj.output = list(self.output.items)
        obj.status = "completed" if complete else "incomplete"
        obj.incomplete_details = None if complete else IncompleteDetails()
        obj.completed_at = float(int(time.time())) if complete else None
        obj.usage = ResponseUsage(
            input_tokens=usage.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens,
                                                    cache_write_tokens=usage.prompt_tokens - usage.cached_tokens),
            output_tokens=usage.completion_tokens, total_tokens=usage.prompt_tokens + usage.completion_tokens,
        )
        obj.sinkserve = ResponseSinkserve(session_id=run.session_id, evicted_tokens=usage.evicted_tokens,
                                          cached_tokens=usage.cached_tokens,
                                          pinned_tokens=getattr(usage, "pinned_tokens", None))
        self.record = StoredResponse(
            id=obj.id, owner=self.owner, created_at=obj.created_at, session_id=run.session_id,
            stream_tokens=usage.prompt_tokens + usage.completion_tokens,
            messages=[*self.history, self.output.chat_message()],
            input_items=self.input_items, response=obj.model_dump(mode="json"),
        )

    async def save(self) -> None:
        """Store a finished response (before the client can see it finished, so it can chain at once)."""
        if self.store is not None and self.record is not None:
            await asyncio.to_thread(self.store.put, self.record)


class ResponsesFormatter(Formatter):
    """The Responses API's shapes on the shared serving path: one ``sequence_number`` across events."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.counter = itertools.count()

    def _event(self, kind: str, **fields: Any) -> dict:
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": next(self.counter), **fields})}

    def _events(self, events: Iterator[tuple[str, dict]]) -> Iterator[dict]:
        for kind, fields in events:
            yield self._event(kind, **fields)

    def _response(self) -> dict:
        return self.turn.obj.model_dump(mode="json")

    def start(self, run: Run) -> Iterator[dict]:
        yield self._event("response.created", response=self._response())
        yield self._event("response.in_progress", response=self._response())
        yield from self._events(self.turn.output.start())

    def token(self, run: Run, event: TokenEvent) -> Iterator[dict]:
        yield from self._events(self.turn.output.feed(event.text))

    def finish(self, run: Run, finish: FinishEvent, reason: str) -> Iterator[dict]:
        yield from self._events(self.turn.output.feed(finish.text))
        if reason != finish.finish_reason:  # cut short by a graceful shutdown: incomplete
            finish = replace(finish, finish_reason=reason)
        yield from self._events(self.turn.finish(run, finish))
        kind = "response.completed" if self.turn.obj.status == "completed" else "response.incomplete"
        yield self._event(kind, response=self._response())  # sent once saved: see ``saved_first``

    def error(self, run: Run, error: APIError) -> Iterator[dict]:
        yield self._event("error", code=error.code or error.type, message=error.message, param=error.param)
        self.turn.obj.status = "failed"
        self.turn.obj.error = ResponseError(message=error.message)
        yield self._event("response.failed", response=self._response())

    def done(self, run: Run) -> Iterator[dict]:
        return iter(())  # the Responses API sends no ``[DONE]``

    def response(self, run: Run, collected: Collected) -> ResponseObject:
        output = self.turn.output
        for _ in (*output.start(), *output.feed(collected.text), *self.turn.finish(run, collected.finish)):
            pass  # the same items as a stream would build; the events are not sent
        return self.turn.obj


FINAL_EVENTS = ("response.completed", "response.incomplete")


async def saved_first(events: AsyncIterator[dict], turn: Turn) -> AsyncIterator[dict]:
    """Pass the stream's events on, storing the response before its final event goes out."""
    try:
        async for out in events:
            if out.get("event") in FINAL_EVENTS:
                await turn.save()
            yield out
    finally:
        await events.aclose()  # the shared path releases the slot and the generation there


@router.post(ENDPOINT, response_model=ResponseObject, responses=STREAM_RESPONSE)
async def create_response(body: ResponseCreateRequest, request: Request, serving: ServingDep):
    engine, settings = serving.engine, serving.settings
    model = serving.check_model(body.model)
    items = body.items()
    if len(items) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} input items per request", param="input",
                       code="too_many_messages")
    store = get_store(request, engine)
    owner = owner_of(serving.api_key)
    previous = None
    if body.previous_response_id is not None:
        previous = await asyncio.to_thread(store.get, owner, body.previous_response_id)
        if previous is None:
            raise APIError(404, f"previous response {body.previous_response_id!r} not found",
                           param="previous_response_id", code="previous_response_not_found")
    history = [*(previous.messages if previous else []), *chat_messages(items)]
    system = [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
    chat = plan(body, system + history, engine)
    params = serving.parameters(body)
    prompt, pinned = await asyncio.to_thread(engine.render_chat, chat.messages, settings.pin_system_prompt,
                                             chat.template_kwargs)
    serving.check_prompt_length(prompt, "input")
    try:
        constraint = await plan_constraint(engine, chat)
    except InvalidRequest as exc:
        raise field_error(exc, "tools") from exc
    gen, slot = await serving.start(prompt, params, previous.session_id if previous else None, pinned, "input",
                                    fork=True, constraint=constraint)
    output = ResponseOutput(chat.reply_stream() if chat.wrapped else None)
    turn = Turn(ResponseObject.for_request(body, model, params), history, [item.stored() for item in items],
                owner, store if body.store else None, output)
    run = Run(model, fingerprint(engine), params, gen)
    formatter = ResponsesFormatter(turn)
    timer = TokenTimer(serving.metrics, ENDPOINT)
    if body.stream:
        shutdown = StreamShutdown(settings.timeout_graceful_shutdown)
        events = stream_events(run, slot, formatter, timer, shutdown)
        return sse_response(saved_first(events, turn), gen, shutdown)
    collected = await collect(gen, slot, timer, request)
    obj = formatter.response(run, collected)
    await turn.save()
    return Response(obj.model_dump_json(), media_type="application/json",
                    headers=session_headers(gen, collected.finish))


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
