"""The Messages API's reply shapes on the shared serving path: a ``message`` object, or its event stream.

Streaming follows https://docs.anthropic.com/en/docs/build-with-claude/streaming: ``message_start`` (the
message with empty content and the prompt's usage), a ``ping``, then per content block
``content_block_start``, ``content_block_delta`` (``text_delta`` for text, ``input_json_delta`` with
``partial_json`` for a tool's input) and ``content_block_stop``, then ``message_delta`` (``stop_reason``,
``stop_sequence`` and the usage) and ``message_stop``; a ``ping`` every few seconds, or, during a long
prefill, an empty text delta (:meth:`MessagesFormatter.keepalive`). A failure after the stream began is an ``error``
event in Anthropic's error shape. Every event carries its type as the SSE ``event:`` name too.

With tools in play the model writes the wrapped JSON of ``server/tools.py``; the chat route's parser
(``server/tool_stream.py``) turns it into OpenAI deltas, which :class:`Blocks` regroups as text and
``tool_use`` blocks. ``stop_reason``: ``max_tokens`` when the generation ran to ``max_tokens``,
``tool_use`` when it ended with complete tool calls, ``stop_sequence`` when one of ``stop_sequences``
ended it (named in ``stop_sequence``), else ``end_turn``.

Usage: ``cache_read_input_tokens`` are the prompt tokens reused from the session cache,
``input_tokens`` the rest; ``cache_creation_input_tokens`` is 0 (every prompt token joins the session's
cache, with no separate, billed write).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

from pydantic_core import from_json

from engine import FinishEvent, TokenEvent
from server.errors import APIError
from server.generation import Collected, Formatter, Run
from server.messages.errors import error_body
from server.messages.protocol import Message, Usage
from server.tool_stream import ReplyStream

PING = {"event": "ping", "data": json.dumps({"type": "ping"})}
KEEPALIVE_S = 30.0  # before the first token, this long without an event: an empty text delta instead of a ping


def event(kind: str, **data) -> dict:
    return {"event": kind, "data": json.dumps({"type": kind, **data}, ensure_ascii=False)}


def tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def parse_input(arguments: str) -> dict:
    """A tool's input from its JSON text; the arguments of a call cut short by ``max_tokens`` as far as
    they go (partial JSON, as the SDK's stream accumulator reads them)."""
    if not arguments.strip():
        return {}
    try:
        value = from_json(arguments, allow_partial="trailing-strings")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class Blocks:
    """OpenAI message deltas regrouped as Anthropic content blocks: the events, and the blocks so far."""

    def __init__(self) -> None:
        self.content: list[dict] = []
        self.arguments: list[str] = []  # the JSON text of each tool_use block, by block index
        self.open = False

    def _close(self) -> Iterator[dict]:
        if self.open:
            self.open = False
            yield event("content_block_stop", index=len(self.content) - 1)

    def _start(self, block: dict) -> Iterator[dict]:
        yield from self._close()
        self.content.append(block)
        self.arguments.append("")
        self.open = True
        shown = {**block, "text": ""} if block["type"] == "text" else {**block, "input": {}}
        yield event("content_block_start", index=len(self.content) - 1, content_block=shown)

    def text(self, piece: str) -> Iterator[dict]:
        if not piece:
            return
        if not self.open or self.content[-1]["type"] != "text":
            yield from self._start({"type": "text", "text": ""})
        self.content[-1]["text"] += piece
        yield event("content_block_delta", index=len(self.content) - 1, delta={"type": "text_delta", "text": piece})

    def delta(self, delta: dict) -> Iterator[dict]:
        """One delta of ``ReplyStream.feed`` (content, a call's start, or a piece of its arguments)."""
        if "content" in delta:
            yield from self.text(delta["content"])
            return
        for call in delta.get("tool_calls", ()):
            function = call["function"]
            if "id" in call:
                yield from self._start({"type": "tool_use", "id": tool_use_id(call["id"]),
                                        "name": function["name"], "input": {}})
            piece = function.get("arguments") or ""
            if piece and self.open and self.content[-1]["type"] == "tool_use":
                self.arguments[-1] += piece
                yield event("content_block_delta", index=len(self.content) - 1,
                            delta={"type": "input_json_delta", "partial_json": piece})

    def close(self) -> Iterator[dict]:
        yield from self._close()

    def blocks(self) -> list[dict]:
        """The content as the message object carries it (tool inputs parsed)."""
        out = []
        for block, arguments in zip(self.content, self.arguments, strict=True):
            out.append({**block, "input": parse_input(arguments)} if block["type"] == "tool_use" else dict(block))
        return out

    @property
    def has_tool_use(self) -> bool:
        return any(b["type"] == "tool_use" for b in self.content)


def matched_stop(full: str, emitted: str, stops: tuple[str, ...]) -> str | None:
    """The stop sequence that ended a generation: the first of ``stops`` in the decoded text past what
    was emitted (the emitted text never holds it), or None (the model's end of turn)."""
    start = max(0, len(emitted) - max((len(s) for s in stops), default=0))
    found = [(full.find(s, start), s) for s in stops]
    found = [(at, s) for at, s in found if at >= 0]
    return min(found)[1] if found else None


class MessagesFormatter(Formatter):
    """``message`` objects and Anthropic's stream events; ``reply``: the tool reply's parser (None: text).

    ``decode``: token ids to text (the tokenizer's), to tell which stop sequence ended the reply;
    ``prefill_tokens``: tokens of a final assistant turn the reply continues (not part of the reply)."""

    def __init__(self, reply: ReplyStream | None, stops: tuple[str, ...], decode: Callable[[list[int]], str]) -> None:
        self.reply = reply
        self.stops = stops
        self.decode = decode
        self.blocks = Blocks()
        self.token_ids: list[int] = []
        self.emitted: list[str] = []
        self.message: Message | None = None
        self.last_event = time.monotonic()

    # ----- shared ---------------------------------------------------------------------------------
    def _feed(self, text: str) -> Iterator[dict]:
        self.emitted.append(text)
        if self.reply is None:
            yield from self.blocks.text(text)
            return
        for delta in self.reply.feed(text):
            yield from self.blocks.delta(delta)

    def _stop(self, reason: str) -> tuple[str, str | None]:
        if reason == "length":
            return "max_tokens", None
        if self.blocks.has_tool_use and (self.reply is None or self.reply.complete):
            return "tool_use", None
        if self.stops:
            stop = matched_stop(self.decode(self.token_ids), "".join(self.emitted), self.stops)
            if stop is not None:
                return "stop_sequence", stop
        return "end_turn", None

    @staticmethod
    def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> Usage:
        return Usage(input_tokens=prompt_tokens - cached_tokens, cache_read_input_tokens=cached_tokens,
                     output_tokens=output_tokens)

    # ----- streaming ------------------------------------------------------------------------------
    def start(self, run: Run) -> Iterator[dict]:
        admission = run.gen.admission
        self.message = Message(model=run.model, usage=self.usage(admission.prompt_tokens, admission.cached_tokens, 0))
        yield event("message_start", message=self.message.model_dump(mode="json"))
        yield PING

    def token(self, run: Run, token: TokenEvent) -> Iterator[dict]:
        self.token_ids.append(token.token_id)
        self.last_event = time.monotonic()
        yield from self._feed(token.text)

    def keepalive(self) -> dict:
        """The periodic keep-alive event: a ``ping``, except while the prompt is still being read (no token
        yet) and nothing was sent for ``KEEPALIVE_S``: then an empty ``text_delta`` (its text block opened
        first). Anthropic's SDKs drop ``ping`` events before the caller sees them, so a client's idle timer
        on events (Claude Code aborts and retries after 300 s) sees only real events; the empty text adds
        nothing to the reply."""
        now = time.monotonic()
        if self.message is None or self.token_ids or now - self.last_event < KEEPALIVE_S:
            return PING
        self.last_event = now
        if not self.blocks.open:
            return next(iter(self.blocks._start({"type": "text", "text": ""})))
        return event("content_block_delta", index=len(self.blocks.content) - 1, delta={"type": "text_delta", "text": ""})

    def finish(self, run: Run, finish: FinishEvent, reason: str) -> Iterator[dict]:
        yield from self._feed(finish.text)
        yield from self.blocks.close()
        stop_reason, stop_sequence = self._stop(reason)
        u = finish.usage
        usage = self.usage(u.prompt_tokens, u.cached_tokens, u.completion_tokens)
        yield event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    usage=usage.model_dump(mode="json", exclude={"service_tier"}))
        yield event("message_stop")

    def error(self, run: Run, error: APIError) -> Iterator[dict]:
        body = error_body(error)
        yield event("error", error=body["error"])

    def done(self, run: Run) -> Iterator[dict]:
        return iter(())

    # ----- not streaming --------------------------------------------------------------------------
    def response(self, run: Run, collected: Collected) -> Message:
        self.token_ids = [t.token_id for t in collected.tokens]
        for _ in self._feed(collected.text):
            pass
        stop_reason, stop_sequence = self._stop(collected.finish.finish_reason)
        u = collected.finish.usage
        return Message(model=run.model, content=self.blocks.blocks(), stop_reason=stop_reason,
                       stop_sequence=stop_sequence, usage=self.usage(u.prompt_tokens, u.cached_tokens,
                                                                     u.completion_tokens))
