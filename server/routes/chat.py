"""``POST /v1/chat/completions``: OpenAI chat completions, plain JSON or server-sent events.

Wire format: https://platform.openai.com/docs/api-reference/chat/create and, for streaming,
https://platform.openai.com/docs/api-reference/chat-streaming (first chunk carries the role, the last
choice chunk an empty delta and the finish reason, an optional usage chunk with ``choices: []``, then
``data: [DONE]``). The route renders the messages into prompt tokens; everything else is the shared
serving path (``server/generation.py``); this module keeps only the chunk and response shapes.

``response_format``, ``tools``, ``tool_choice`` and ``parallel_tool_calls`` become a prompt and a grammar
(``server/tools.py``: ``plan_chat``), compiled before anything is queued (a bad schema is a 400 naming
its field; the grammar's strings are bounded to leave room to close the JSON within ``max_tokens``). A
tool reply is parsed as it streams (``server/tool_stream.py``) into OpenAI's
``tool_calls`` deltas (https://platform.openai.com/docs/guides/function-calling#streaming) and ends with
``finish_reason: "tool_calls"``; ``message.content`` is then null.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter

from engine import FinishEvent, TokenEvent
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
from server.pinning import render_pinned
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
from server.tool_stream import ReplyStream
from server.tools import plan_chat, plan_constraint

router = APIRouter(tags=["chat"])
ENDPOINT = "/v1/chat/completions"


def finish_reason(reason: str, reply: ReplyStream | None) -> str:
    """``tool_calls`` for a tool reply that ended on its own; otherwise the engine's reason."""
    if reason == "stop" and reply is not None and reply.finish().tool_calls:
        return "tool_calls"
    return reason


class ChatFormatter(Formatter):
    """``chat.completion`` and ``chat.completion.chunk`` objects; every chunk shares one id and time.

    ``reply``: the parser of a tool reply (the model writes the wrapped JSON of ``server/tools.py``);
    None: the generated text is the content."""

    def __init__(self, reply: ReplyStream | None = None) -> None:
        self.base: ChatCompletionChunk | None = None
        self.pending = []  # logprobs of tokens whose text is still held back (stop strings, partial UTF-8)
        self.reply = reply

    def _chunk(self, run: Run, choices: list[ChunkChoice], usage=None) -> dict:
        data = self.base.model_copy(update={"choices": choices, "usage": usage})
        return data.sse(exclude=None if run.include_usage else {"usage"})

    def _logprobs(self, run: Run) -> ChoiceLogprobs | None:
        return ChoiceLogprobs(content=self.pending) if run.params.logprobs else None

    def start(self, run: Run) -> Iterator[dict]:
        self.base = ChatCompletionChunk(model=run.model, system_fingerprint=run.fingerprint)
        content = None if self.reply is not None else ""  # OpenAI's first delta of a tool reply: null
        yield self._chunk(run, [ChunkChoice(delta={"role": "assistant", "content": content})])

    def _deltas(self, run: Run, text: str, last: bool = False) -> Iterator[dict]:
        """Chunks for newly decoded text (``last``: the reply's end, where a parser gives up what it
        held back); held-back logprobs ride on the first."""
        deltas = self.reply.feed(text) if self.reply is not None else [{"content": text}] if text else []
        if last and self.reply is not None:
            deltas += self.reply.flush()
        for delta in deltas:
            yield self._chunk(run, [ChunkChoice(delta=delta, logprobs=self._logprobs(run))])
            self.pending = []

    def token(self, run: Run, event: TokenEvent) -> Iterator[dict]:
        if run.params.logprobs and (lp := chat_logprobs(event)):
            self.pending.append(lp)
        yield from self._deltas(run, event.text)

    def finish(self, run: Run, finish: FinishEvent, reason: str) -> Iterator[dict]:
        yield from self._deltas(run, finish.text, last=True)
        if self.pending:  # logprobs of tokens that added no text (the tool reply's closing brackets)
            yield self._chunk(run, [ChunkChoice(delta={}, logprobs=self._logprobs(run))])
        yield self._chunk(run, [ChunkChoice(delta={}, finish_reason=finish_reason(reason, self.reply))])
        if run.include_usage:
            yield self._chunk(run, [], usage=usage_info(finish))

    def response(self, run: Run, collected: Collected) -> ChatCompletionResponse:
        logprobs = None
        if run.params.logprobs:
            logprobs = ChoiceLogprobs(content=[lp for t in collected.tokens if (lp := chat_logprobs(t))])
        finish = collected.finish
        message = AssistantMessage(content=collected.text)
        if self.reply is not None:  # the same parser a stream runs, over the whole reply
            self.reply.feed(collected.text)
            reply = self.reply.finish()
            message = AssistantMessage(content=reply.content, tool_calls=reply.tool_calls or None)
        return ChatCompletionResponse(
            model=run.model, system_fingerprint=run.fingerprint,
            choices=[ChatChoice(message=message, logprobs=logprobs,
                                finish_reason=finish_reason(finish.finish_reason, self.reply))],
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
    # tools and response_format: checked here (a FieldError is a 400 naming the field), before anything is queued
    plan = plan_chat([m.to_chat() for m in body.messages], tools=body.tools, tool_choice=body.tool_choice,
                     parallel_tool_calls=body.parallel_tool_calls, response_format=body.response_format,
                     chat_template=engine.tokenizer.chat_template, max_tokens=params.max_tokens,
                     tokenizer=engine.tokenizer)
    serving.hold_slot()  # compiling a grammar and tokenizing are the costly steps: inside the key's slot
    constraint = await plan_constraint(engine, plan)  # a schema that cannot start: 400 before any tokenizing
    rendered = await render_pinned(engine, plan.messages, plan.template_kwargs, requested=body.pin_system_prompt,
                                   default=settings.pin_system_prompt, has_tools=plan.wrapped,
                                   render=serving.tokenize)  # tools stay pinned
    serving.check_prompt_length(rendered.prompt, "messages")
    formatter = ChatFormatter(plan.reply_stream() if plan.wrapped else None)
    response = await serving.generate(body, rendered.prompt, formatter, endpoint=ENDPOINT, params=params,
                                      pin_prefix=rendered.pin_prefix, constraint=constraint)
    response.headers.update(rendered.headers())
    return response
