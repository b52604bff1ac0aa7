"""The output of one response as it is generated: output items built from the reply's text, and the
streaming events that announce them (https://platform.openai.com/docs/api-reference/responses-streaming).

A plain reply is one assistant ``message`` item with one ``output_text`` part, opened before the first
token (as OpenAI does). A reply constrained by tools (``wrapped``, server/tools.py) is parsed as it
streams by the tool machinery's :class:`~server.tool_stream.ReplyStream`: its text opens a ``message``
item, each tool call a ``function_call`` item (``response.output_item.added`` with empty arguments, then
``response.function_call_arguments.delta`` fragments). At the end every open item is closed (``.done``
events, then ``response.output_item.done``) with status ``completed``, or ``incomplete`` when the
generation hit ``max_output_tokens``. A call of a namespace tool's function (offered as ``ns__name``)
becomes an item with ``namespace`` and ``name``. With ``include: ["message.output_text.logprobs"]`` each
text delta carries its tokens' logprobs, and the text part all of them. Events are ``(type, fields)``
pairs; the route numbers them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from server.responses.chat import offered_name
from server.responses.protocol import OutputFunctionCall, OutputMessage, OutputText
from server.tool_stream import ReplyStream

Event = tuple[str, dict[str, Any]]


class ResponseOutput:
    """Output items of one response; ``feed`` text pieces, then ``close``."""

    def __init__(self, reply: ReplyStream | None = None,
                 namespaced: dict[str, tuple[str, str]] | None = None) -> None:
        self.reply = reply  # None: a plain text reply
        self.namespaced = namespaced or {}  # offered name -> (namespace, name)
        self.items: list[OutputMessage | OutputFunctionCall] = []
        self.message: OutputMessage | None = None
        self.calls: dict[int, OutputFunctionCall] = {}  # by the reply's call index
        self.text: list[str] = []
        self.logprobs: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []  # logprobs of tokens whose text is not out yet (held back)

    def start(self) -> Iterator[Event]:
        if self.reply is None:
            yield from self._open_message()

    def feed(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> Iterator[Event]:
        """A piece of the reply; ``logprobs``: its tokens' (plain replies only)."""
        self.pending.extend(logprobs or ())
        if not text:
            return
        yield from self._apply([{"content": text}] if self.reply is None else self.reply.feed(text))

    def _apply(self, deltas: list[dict[str, Any]]) -> Iterator[Event]:
        for delta in deltas:
            if "content" in delta:
                yield from self._content(delta["content"])
            for call in delta.get("tool_calls", ()):
                yield from self._call(call)

    def close(self, complete: bool) -> Iterator[Event]:
        if self.reply is not None:  # what the parser held back at the reply's end (a partial marker's text)
            yield from self._apply(self.reply.flush())
        status = "completed" if complete else "incomplete"
        self.logprobs.extend(self.pending)
        for index, item in enumerate(self.items):
            where = {"item_id": item.id, "output_index": index}
            if isinstance(item, OutputMessage):
                text = "".join(self.text)
                item.content = [OutputText(text=text, logprobs=self.logprobs)]
                yield "response.output_text.done", {**where, "content_index": 0, "text": text,
                                                    "logprobs": self.logprobs}
                yield "response.content_part.done", {**where, "content_index": 0,
                                                     "part": item.content[0].model_dump(mode="json")}
            else:
                yield "response.function_call_arguments.done", {**where, "arguments": item.arguments}
            item.status = status
            yield "response.output_item.done", {"output_index": index, "item": item.model_dump(mode="json")}

    # ----- the reply as chat's assistant message, for the stored conversation --------------------------
    def chat_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text)}
        if self.calls:
            message["tool_calls"] = [{"id": c.call_id, "type": "function",
                                      "function": {"name": offered_name(c.name, c.namespace),
                                                   "arguments": c.arguments}}
                                     for c in self.calls.values()]
        return message

    # ----- items -------------------------------------------------------------------------------------
    def _open_message(self) -> Iterator[Event]:
        self.message = OutputMessage(status="in_progress")
        self.items.append(self.message)
        where = {"item_id": self.message.id, "output_index": len(self.items) - 1}
        yield "response.output_item.added", {"output_index": where["output_index"],
                                             "item": self.message.model_dump(mode="json")}
        part = OutputText(text="", logprobs=[]).model_dump(mode="json")
        yield "response.content_part.added", {**where, "content_index": 0, "part": part}

    def _content(self, piece: str) -> Iterator[Event]:
        if self.message is None:
            yield from self._open_message()
        self.text.append(piece)
        logprobs, self.pending = self.pending, []
        self.logprobs.extend(logprobs)
        index = self.items.index(self.message)
        yield "response.output_text.delta", {"item_id": self.message.id, "output_index": index, "content_index": 0,
                                             "delta": piece, "logprobs": logprobs}

    def _call(self, delta: dict[str, Any]) -> Iterator[Event]:
        function = delta.get("function", {})
        if "id" in delta:  # a new call: its name is known, its arguments follow
            offered = function.get("name", "")
            namespace, name = self.namespaced.get(offered, (None, offered))
            item = OutputFunctionCall(call_id=delta["id"], name=name, namespace=namespace, arguments="",
                                      status="in_progress")
            self.calls[delta["index"]] = item
            self.items.append(item)
            yield "response.output_item.added", {"output_index": len(self.items) - 1,
                                                 "item": item.model_dump(mode="json")}
        item = self.calls[delta["index"]]
        piece = function.get("arguments", "")
        if piece:
            item.arguments += piece
            yield "response.function_call_arguments.delta", {"item_id": item.id, "output_index": self.items.index(item),
                                                             "delta": piece}
