"""``/v1/responses``: OpenAI's Responses API, with ``previous_response_id`` continued by the session cache.

Wire format: https://platform.openai.com/docs/api-reference/responses and, for streaming,
https://platform.openai.com/docs/api-reference/responses-streaming (``event:`` names, one
``sequence_number`` counter from 0: created, in_progress, then the output items' events
(``server/responses/output.py``), then completed or incomplete; a failure is an ``error`` event then
``response.failed``; no ``[DONE]``). Every field's treatment is tabled in docs/responses.md.

A response renders its whole conversation with the chat template: the request's ``instructions`` as
the system message (never carried over from the previous response, as OpenAI documents), the stored
conversation of ``previous_response_id``, then the new input items. With a previous response the
engine is told its session and ``fork=True``: a prompt that extends that session's stream prefills
only its new tokens; one that diverges (a fork from an older response of the chain, changed
instructions) continues a copy, so no branch destroys another. A second continuation of the same
response while the first still generates is served too: once the engine reports the session busy it
is started without naming it, so the key's idle sessions are matched by prefix or a new one prefills.
Without a previous response (stateless clients that resend their history, as Codex CLI does with
``store: false``) the engine's implicit prefix matching finds the session, as for chat.

``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``text.format`` go through chat's machinery
(``server/responses/chat.py`` translates the shapes; ``server/tools.py`` makes the prompt and grammar);
hosted tools this server does not run are left out and named in ``x-sinkserve-ignored-tools`` and a log
line. Generation is the shared serving path (:meth:`server.generation.Serving.generate`: parameters,
admission, streaming, collecting, shutdown, releasing); this module keeps the Responses shapes
(:class:`ResponsesFormatter`) and stores a finished response in the formatter's ``settle``, before its
final event or body goes out. Stored responses are bounded per key (``server/responses/store.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Request, Response

from engine import Engine, FinishEvent, InvalidRequest, SessionBusy, TokenEvent, owner_of
from server.deps import ApiKeyDep, EngineDep
from server.errors import APIError, from_engine_error
from server.generation import Collected, Formatter, Run, Serving, ServingDep, chat_logprobs
from server.pinning import render_pinned
from server.protocol import STREAM_RESPONSE, SinkserveInfo
from server.responses.chat import (
    OfferedTools,
    chat_messages,
    chat_response_format,
    chat_tool_choice,
    chat_tools,
    responses_param,
)
from server.responses.output import ResponseOutput
from server.responses.protocol import (
    INCLUDE_HONOURED,
    INCLUDE_NOTHING,
    IncompleteDetails,
    InputItemList,
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseError,
    ResponseObject,
    ResponseUsage,
)
from server.responses.store import ResponseStore, StoredResponse
from server.tools import ChatPlan, plan_chat, plan_constraint

log = logging.getLogger(__name__)
router = APIRouter(tags=["responses"])
ENDPOINT = "/v1/responses"
IGNORED_TOOLS_HEADER = "x-sinkserve-ignored-tools"


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


def check_include(request: Request) -> None:
    """``include`` of a stored response: values that add nothing to what was stored are accepted (the
    stored output text has its logprobs when the create request asked for them), others refused."""
    for value in [*request.query_params.getlist("include"), *request.query_params.getlist("include[]")]:
        if value not in INCLUDE_HONOURED + INCLUDE_NOTHING:
            raise APIError(400, f"include value {value!r} is not available from this server", param="include",
                           code="unsupported_parameter")


def not_found(response_id: str) -> APIError:
    return APIError(404, f"no response with id {response_id!r} found", param="response_id",
                    code="response_not_found")


def field_error(exc: InvalidRequest, fallback: str) -> APIError:
    """A refusal of the tool machinery, naming the Responses field (chat's name rewritten)."""
    chat_param = getattr(exc, "param", None)
    param = responses_param(chat_param) or fallback
    message = str(exc).replace(chat_param, param) if chat_param else str(exc)
    message = re.sub(r"messages\[\d+\]", "an input item", message)  # chat's message index means nothing here
    error = from_engine_error(exc)
    error.message, error.param = message, param
    error.code = error.code or "invalid_value"
    return error


def plan(body: ResponseCreateRequest, messages: list[dict[str, Any]], offered: OfferedTools,
         engine: Engine, max_tokens: int | None = None) -> ChatPlan:
    """The prompt's messages and the grammar of this request's tools and text format (server/tools.py)."""
    try:
        # OpenAI's default ``auto`` also applies to a request without tools; chat's machinery reads it as a
        # request for tools, so without tools the default is left out
        choice = None if not offered.tools and body.tool_choice == "auto" else chat_tool_choice(body.tool_choice)
        chat = plan_chat(messages, tools=offered.tools, tool_choice=choice,
                         parallel_tool_calls=body.parallel_tool_calls,
                         response_format=chat_response_format(body.text.format if body.text else None),
                         chat_template=engine.tokenizer.chat_template, max_tokens=max_tokens,
                         tokenizer=engine.tokenizer)
    except InvalidRequest as exc:
        raise field_error(exc, "tools") from exc
    if chat.wrapped and body.wants_logprobs():
        raise APIError(400, "include 'message.output_text.logprobs' is not available with tools in play (the "
                       "reply's text is parsed out of its constrained output)", param="include", code="invalid_value")
    return chat


def logprob_entries(event: TokenEvent, wanted: bool) -> list[dict[str, Any]] | None:
    """A token's logprob as ``output_text.logprobs`` lists it (chat's token logprob shape)."""
    entry = chat_logprobs(event) if wanted else None
    return None if entry is None else [entry.model_dump(mode="json")]


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
    client_metadata: dict[str, str] | None = None
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
        obj.usage = ResponseUsage.of(usage)
        obj.sinkserve = SinkserveInfo(session_id=run.session_id, evicted_tokens=usage.evicted_tokens,
                                      cached_tokens=usage.cached_tokens, pinned_tokens=usage.pinned_tokens)
        self.record = StoredResponse(
            id=obj.id, owner=self.owner, created_at=obj.created_at, session_id=run.session_id,
            stream_tokens=usage.prompt_tokens + usage.completion_tokens,
            messages=[*self.history, self.output.chat_message()],
            input_items=self.input_items, response=obj.model_dump(mode="json"),
            extra={"client_metadata": self.client_metadata} if self.client_metadata else {},
        )

    async def save(self) -> None:
        """Store a finished response (before the client can see it finished, so it can chain at once)."""
        if self.store is not None and self.record is not None:
            try:
                await asyncio.to_thread(self.store.put, self.record)
            except OSError as exc:
                log.error("storing response %s failed: %s", self.record.id, exc)
                raise APIError(507, f"the response could not be stored ({exc.strerror or exc}); retry with "
                               "store: false or later", type="server_error", code="storage_failed") from exc


class ResponsesFormatter(Formatter):
    """The Responses API's shapes on the shared serving path: one ``sequence_number`` across events; the
    final event (``response.completed`` or ``.incomplete``) goes out in ``done``, once ``settle`` stored
    the response."""

    def __init__(self, turn: Turn, logprobs: bool = False) -> None:
        self.turn = turn
        self.logprobs = logprobs
        self.counter = itertools.count()
        self.final: str | None = None  # the last event's type, once the generation finished normally

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
        yield from self._events(self.turn.output.feed(event.text, logprob_entries(event, self.logprobs)))

    def finish(self, run: Run, finish: FinishEvent, reason: str) -> Iterator[dict]:
        yield from self._events(self.turn.output.feed(finish.text))
        if reason != finish.finish_reason:  # cut short by a graceful shutdown: incomplete
            finish = replace(finish, finish_reason=reason)
        yield from self._events(self.turn.finish(run, finish))
        self.final = "response.completed" if self.turn.obj.status == "completed" else "response.incomplete"

    def error(self, run: Run, error: APIError) -> Iterator[dict]:
        self.final = None
        yield self._event("error", code=error.code or error.type, message=error.message, param=error.param)
        self.turn.obj.status = "failed"
        self.turn.obj.error = ResponseError(message=error.message)
        yield self._event("response.failed", response=self._response())

    async def settle(self, run: Run) -> None:
        await self.turn.save()

    def done(self, run: Run) -> Iterator[dict]:
        if self.final is not None:  # the Responses API sends no ``[DONE]``
            yield self._event(self.final, response=self._response())

    def response(self, run: Run, collected: Collected) -> ResponseObject:
        output = self.turn.output
        events = [*output.start()]
        for token in collected.tokens:
            events.extend(output.feed(token.text, logprob_entries(token, self.logprobs)))
        events.extend((*output.feed(collected.finish.text), *self.turn.finish(run, collected.finish)))
        return self.turn.obj  # the same items as a stream would build; the events are not sent


async def previous_of(body: ResponseCreateRequest, store: ResponseStore, owner: str) -> StoredResponse | None:
    if body.previous_response_id is None:
        return None
    previous = await asyncio.to_thread(store.get, owner, body.previous_response_id)
    if previous is None:
        raise APIError(404, f"previous response {body.previous_response_id!r} not found",
                       param="previous_response_id", code="previous_response_not_found")
    return previous


async def check_room(body: ResponseCreateRequest, store: ResponseStore, owner: str) -> None:
    """A response to be stored needs room in the key's share of the store (before any generation)."""
    if body.store and await asyncio.to_thread(store.full, owner):
        raise APIError(429, f"this API key has {store.max_per_owner} stored responses, the most this server keeps "
                       f"per key; delete some (DELETE /v1/responses/{{id}}), wait for them to expire "
                       f"({store.ttl_s:.0f} s after creation), or send store: false",
                       type="insufficient_quota", param="store", code="stored_responses_limit")


def history_of(items: list, previous: StoredResponse | None) -> list[dict[str, Any]]:
    earlier = previous.messages if previous else []
    try:
        return [*earlier, *chat_messages(items, earlier)]
    except InvalidRequest as exc:
        raise field_error(exc, "input") from exc


async def generate(serving: Serving, body: ResponseCreateRequest, prompt: list[int], formatter: Formatter,
                   session_id: str | None, **options) -> Response:
    """The shared serving path; a continued session that is busy (another continuation of the same
    response is generating) is left unnamed, so this one forks from the key's idle sessions instead."""
    try:
        return await serving.generate(body, prompt, formatter, endpoint=ENDPOINT, prompt_param="input",
                                      session_id=session_id, fork=True, **options)
    except SessionBusy:
        if session_id is None:
            raise
    log.info("session %s is busy with another continuation of %s; serving this one on a fork",
             session_id, body.previous_response_id)
    return await serving.generate(body, prompt, formatter, endpoint=ENDPOINT, prompt_param="input",
                                  fork=True, **options)


@router.post(ENDPOINT, response_model=ResponseObject, responses=STREAM_RESPONSE)
async def create_response(body: ResponseCreateRequest, request: Request, serving: ServingDep):
    engine, settings = serving.engine, serving.settings
    model = serving.check_model(body.model)
    items = body.items()
    if len(items) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} input items per request", param="input",
                       code="too_many_messages")
    store, owner = get_store(request, engine), owner_of(serving.api_key)
    previous = await previous_of(body, store, owner)
    await check_room(body, store, owner)
    history = history_of(items, previous)
    system = [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
    try:
        offered = chat_tools(body)
    except InvalidRequest as exc:
        raise field_error(exc, "tools") from exc
    params = serving.parameters(body)
    chat = plan(body, system + history, offered, engine, params.max_tokens)
    rendered = await render_pinned(engine, chat.messages, chat.template_kwargs, requested=None,
                                   default=settings.pin_system_prompt, has_tools=chat.wrapped,
                                   render=serving.tokenize)  # tools stay pinned (server/pinning.py)
    prompt, pinned = rendered.prompt, rendered.pin_prefix
    serving.check_prompt_length(prompt, "input")
    try:
        constraint = await plan_constraint(engine, chat)
    except InvalidRequest as exc:
        raise field_error(exc, "tools") from exc
    output = ResponseOutput(chat.reply_stream() if chat.wrapped else None, offered.namespaced)
    turn = Turn(ResponseObject.for_request(body, model, params), history, [item.stored() for item in items],
                owner, store if body.store else None, output, body.client_metadata)
    formatter = ResponsesFormatter(turn, logprobs=body.wants_logprobs())
    response = await generate(serving, body, prompt, formatter, previous.session_id if previous else None,
                              params=params, pin_prefix=pinned, constraint=constraint)
    response.headers.update(rendered.headers())
    if offered.hosted:
        log.info("response %s: hosted tools this server does not run were left out of the prompt: %s",
                 turn.obj.id, ", ".join(offered.hosted))
        response.headers[IGNORED_TOOLS_HEADER] = ",".join(offered.hosted)
    return response


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
    check_include(request)
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
    check_include(request)
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
