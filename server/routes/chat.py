"""``POST /v1/chat/completions``: OpenAI chat completions, plain JSON or server-sent events.

Wire format: https://platform.openai.com/docs/api-reference/chat/create and, for streaming,
https://platform.openai.com/docs/api-reference/chat-streaming (first chunk carries the role, the last
choice chunk an empty delta and the finish reason, an optional usage chunk with ``choices: []``, then
``data: [DONE]``). The route renders the messages into prompt tokens; everything else is the shared
serving path (``server/generation.py``); this module keeps only the chunk and response shapes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from fastapi import APIRouter

from engine.events import FinishEvent, TokenEvent
from server.errors import APIError
from server.generation import (
    Collected,
    Formatter,
    Run,
    ServingDep,
    chat_logprobs,
    sinkserve_info,
    usage_info,
)
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


class ChatFormatter(Formatter):
    """``chat.completion`` and ``chat.completion.chunk`` objects; every chunk shares one id and time."""

    def __init__(self) -> None:
        self.base: ChatCompletionChunk | None = None
        self.pending = []  # logprobs of tokens whose text is still held back (stop strings, partial UTF-8)

    def _chunk(self, run: Run, choices: list[ChunkChoice], usage=None) -> dict:
        data = self.base.model_copy(update={"choices": choices, "usage": usage})
        return data.sse(exclude=None if run.include_usage else {"usage"})

    def _logprobs(self, run: Run) -> ChoiceLogprobs | None:
        return ChoiceLogprobs(content=self.pending) if run.params.logprobs else None

    def start(self, run: Run) -> Iterator[dict]:
        self.base = ChatCompletionChunk(model=run.model, system_fingerprint=run.fingerprint)
        yield self._chunk(run, [ChunkChoice(delta={"role": "assistant", "content": ""})])

    def token(self, run: Run, event: TokenEvent) -> Iterator[dict]:
        if run.params.logprobs and (lp := chat_logprobs(event)):
            self.pending.append(lp)
        if event.text:
            yield self._chunk(run, [ChunkChoice(delta={"content": event.text}, logprobs=self._logprobs(run))])
            self.pending = []

    def finish(self, run: Run, finish: FinishEvent, reason: str) -> Iterator[dict]:
        if finish.text or self.pending:
            yield self._chunk(run, [ChunkChoice(delta={"content": finish.text}, logprobs=self._logprobs(run))])
        yield self._chunk(run, [ChunkChoice(delta={}, finish_reason=reason)])
        if run.include_usage:
            yield self._chunk(run, [], usage=usage_info(finish))

    def response(self, run: Run, collected: Collected) -> ChatCompletionResponse:
        logprobs = None
        if run.params.logprobs:
            logprobs = ChoiceLogprobs(content=[lp for t in collected.tokens if (lp := chat_logprobs(t))])
        finish = collected.finish
        return ChatCompletionResponse(
            model=run.model, system_fingerprint=run.fingerprint,
            choices=[ChatChoice(message=AssistantMessage(content=collected.text), logprobs=logprobs,
                                finish_reason=finish.finish_reason)],
            usage=usage_info(finish), sinkserve=sinkserve_info(run, finish),
        )


@router.post(ENDPOINT, response_model=ChatCompletionResponse, responses=STREAM_RESPONSE)
async def create_chat_completion(body: ChatCompletionRequest, serving: ServingDep):
    settings, engine = serving.settings, serving.engine
    serving.check_model(body.model)
    if len(body.messages) > settings.max_messages:
        raise APIError(400, f"at most {settings.max_messages} messages per request", param="messages",
                       code="too_many_messages")
    params = serving.parameters(body)
    messages = [{"role": m.role, "content": m.content} for m in body.messages]
    pin = settings.pin_system_prompt if body.pin_system_prompt is None else body.pin_system_prompt
    prompt, system_len = await asyncio.to_thread(engine.render_chat, messages, pin)
    return await serving.generate(body, prompt, ChatFormatter(), endpoint=ENDPOINT, params=params,
                                  pin_prefix=system_len)
