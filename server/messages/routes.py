"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API; ``HEAD /``.

The request is converted to the chat shape (``server/messages/convert.py``) and planned, rendered,
pinned and generated exactly as a chat completion is (``server/tools.py``, ``server/pinning.py``,
``server/generation.py``): the same grammar for tools, the same session cache, found again by token
prefix when a client resends its history (``cache_read_input_tokens`` counts what was reused). Only the
reply shapes are this API's (``server/messages/formatter.py``), and its errors
(``server/messages/errors.py``).

``max_tokens`` above the server's ``max_tokens_cap`` is clamped to it (Claude Code asks for 32000 by
default), and the response says so in ``x-sinkserve-warning``; ``stop_reason`` is then ``max_tokens``
where the cap ended the reply. ``anthropic-version`` and ``anthropic-beta`` headers and the ``beta``
query parameter (Claude Code's ``?beta=true``) are accepted: the fields this route honours do not
depend on them. Claude Code probes ``HEAD /`` before its first request: ``/`` answers 200.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from sse_starlette import ServerSentEvent

from engine import SamplingParams
from server.deps import ApiKeyDep, EngineDep
from server.errors import APIError
from server.generation import ServingDep, check_model
from server.messages.convert import Conversation, convert, renamed
from server.messages.errors import MessagesRoute
from server.messages.formatter import MessagesFormatter
from server.messages.protocol import CountTokensRequest, Message, MessagesRequest, TokenCount
from server.pinning import WARNING_HEADER, render_pinned
from server.structured import FieldError
from server.tools import ChatPlan, plan_chat, plan_constraint

log = logging.getLogger(__name__)

router = APIRouter(tags=["messages"], route_class=MessagesRoute)
ENDPOINT = "/v1/messages"
LEFT_OUT_HEADER = "x-sinkserve-tools-left-out"
Beta = Annotated[str | None, Query(description="accepted (Claude Code sends beta=true)")]
VersionHeader = Annotated[str | None, Header(description="accepted")]


def plan(body: CountTokensRequest, tokenizer, max_tokens: int | None = None) -> tuple[Conversation, ChatPlan, list[int]]:
    """The request's chat plan (tools, grammar, messages) with the served model's tokenizer; ``max_tokens``
    bounds the grammar's unbounded strings (server/structured.py); field errors in this API's names."""
    conversation, where = convert(body)
    try:
        chat_plan = plan_chat(conversation.messages, tools=conversation.tools, tool_choice=conversation.tool_choice,
                              parallel_tool_calls=conversation.parallel_tool_calls,
                              response_format=conversation.response_format, chat_template=tokenizer.chat_template,
                              max_tokens=max_tokens, tokenizer=tokenizer)
    except FieldError as exc:
        raise renamed(exc, where) from exc
    if conversation.left_out:
        log.info("tools left out of the prompt (defined by Anthropic, not run here): %s", conversation.left_out)
    return conversation, chat_plan, where


def sampling(body: MessagesRequest, max_tokens_cap: int, defaults) -> SamplingParams:
    """The engine's parameters: the request's ``temperature``, ``top_p``, ``top_k``, else the served
    model's sampling defaults, else the engine's; ``max_tokens`` at most the server's cap."""
    base = SamplingParams()
    values = {name: getattr(base, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    for name, value in (defaults or {}).items():
        values[name] = int(value) if name == "top_k" else value
    for name in ("temperature", "top_p", "top_k"):
        if getattr(body, name) is not None:
            values[name] = getattr(body, name)
    try:
        return SamplingParams(max_tokens=min(body.max_tokens, max_tokens_cap), stop=tuple(body.stop_sequences or ()),
                              **values)
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from exc


def notices(body: MessagesRequest, max_tokens_cap: int, pin_warning: str | None, left_out: list[str]) -> dict:
    """Response headers saying where the request got less than it asked: tools not pinned, ``max_tokens``
    clamped, Anthropic-defined tools not offered."""
    warnings = [pin_warning] if pin_warning else []
    if body.max_tokens > max_tokens_cap:
        warnings.append(f"max_tokens {body.max_tokens} clamped to this server's cap of {max_tokens_cap}")
    headers = {WARNING_HEADER: "; ".join(warnings)} if warnings else {}
    if left_out:
        headers[LEFT_OUT_HEADER] = ", ".join(left_out)
    return headers


@router.post(ENDPOINT, response_model=Message)
async def create_message(body: MessagesRequest, serving: ServingDep, beta: Beta = None,
                         anthropic_version: VersionHeader = None, anthropic_beta: VersionHeader = None):
    settings, engine = serving.settings, serving.engine
    serving.check_model(body.model)
    if len(body.messages) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} messages per request", param="messages")
    params = sampling(body, settings.max_tokens_cap, engine.loaded.sampling_defaults)
    conversation, chat_plan, where = plan(body, engine.tokenizer, params.max_tokens)
    rendered = await render_pinned(engine, chat_plan.messages, chat_plan.template_kwargs, requested=None,
                                   default=settings.pin_system_prompt, has_tools=chat_plan.wrapped,
                                   render=serving.tokenize)
    prompt = rendered.prompt
    if conversation.prefill:
        prompt = prompt + engine.tokenizer.encode(conversation.prefill, add_special_tokens=False)
    serving.check_prompt_length(prompt, "messages")
    try:
        constraint = await plan_constraint(engine, chat_plan)
    except FieldError as exc:
        raise renamed(exc, where) from exc
    formatter = MessagesFormatter(chat_plan.reply_stream() if chat_plan.wrapped else None, params.stop,
                                  lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))
    response = await serving.generate(body, prompt, formatter, endpoint=ENDPOINT, params=params,
                                      pin_prefix=rendered.pin_prefix, constraint=constraint)
    response.headers.update(notices(body, settings.max_tokens_cap, rendered.warning, conversation.left_out))
    if body.stream:
        response.ping_message_factory = lambda: ServerSentEvent(**formatter.keepalive())  # not an SSE comment
    return response


@router.post(f"{ENDPOINT}/count_tokens", response_model=TokenCount)
async def count_tokens(body: CountTokensRequest, engine: EngineDep, api_key: ApiKeyDep, beta: Beta = None,
                       anthropic_version: VersionHeader = None, anthropic_beta: VersionHeader = None):
    check_model(body.model, engine)
    conversation, chat_plan, _ = plan(body, engine.tokenizer)
    prompt, _ = await asyncio.to_thread(engine.render_chat, chat_plan.messages, False, chat_plan.template_kwargs)
    if conversation.prefill:
        prompt = prompt + engine.tokenizer.encode(conversation.prefill, add_special_tokens=False)
    return TokenCount(input_tokens=len(prompt))


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> JSONResponse:
    """Claude Code's reachability probe (``HEAD /``): the server answers."""
    return JSONResponse({"name": "sinkserve"})
