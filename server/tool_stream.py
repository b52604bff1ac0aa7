"""Parsing the wrapped tool reply (server/tools.py) as it streams, into OpenAI message deltas.

The grammar guarantees the shape ``{"tool_calls": [{"name": N, "arguments": {...}}, ...]}`` or
``{"response": V}``, so a one-pass JSON scanner (a stack of containers, each character attributed to
the path of the value it belongs to) is enough: characters of ``tool_calls[i].name`` make the name,
characters of ``tool_calls[i].arguments`` are passed on as argument fragments, characters of
``response`` become content (decoded when it is a string, verbatim JSON otherwise). Deltas follow
OpenAI's streaming shape (https://platform.openai.com/docs/api-reference/chat-streaming): the first
delta of a call carries ``index``, ``id``, ``type`` and ``function.name`` with ``arguments: ""``; later
ones only ``index`` and ``function.arguments``. The non-streaming reply is the same parser run once, so
both agree, also on a reply cut short by ``max_tokens`` (calls then carry the arguments written so far).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

WHITESPACE = " \t\n\r"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class Frame:
    """One open JSON container: its current key (object) or index (array), and where it is in it."""

    is_object: bool
    key: str | int | None = None
    state: str = "start"  # start | key | colon | value | scalar | after


@dataclass
class Reply:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI message.tool_calls


class ReplyStream:
    """Feed decoded text as it comes; get OpenAI delta dicts back; ``finish()`` gives the whole reply."""

    def __init__(self, response_is_text: bool = True, arguments_key: str = "arguments",
                 new_id: Callable[[], str] = new_call_id) -> None:
        """``arguments_key``: the key of a call's arguments (``parameters`` in Llama 3.1's format);
        ``new_id``: makes each call's id."""
        self.response_is_text = response_is_text
        self.arguments_key, self.new_id = arguments_key, new_id
        self.stack: list[Frame] = []
        self.in_string = False
        self.escape = ""  # an escape sequence being read (starts with a backslash)
        self.high_surrogate = ""
        self.key_chars: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict] = []  # {"id", "name", "arguments"}
        self.name_chars: list[str] = []
        self.out: list[tuple[str, object, str]] = []
        self.done = False

    # ----- public --------------------------------------------------------------------------------
    def feed(self, text: str) -> list[dict]:
        """OpenAI ``delta`` objects for ``text`` (possibly none), in order, fragments of one kind merged."""
        for char in text:
            self._char(char)
        deltas: list[dict] = []
        for kind, index, piece in self.out:
            if kind == "content":
                if deltas and "content" in deltas[-1]:
                    deltas[-1]["content"] += piece
                else:
                    deltas.append({"content": piece})
            elif kind == "call":
                call = self.calls[index]
                deltas.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                               "function": {"name": call["name"], "arguments": ""}}]})
            else:
                last = deltas[-1]["tool_calls"][0] if deltas and "tool_calls" in deltas[-1] else None
                if last is not None and last["index"] == index and "id" not in last:
                    last["function"]["arguments"] += piece
                else:
                    deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        self.out = []
        return deltas

    def flush(self) -> list[dict]:
        """At the end of the reply: nothing is held back in this format."""
        return []

    def finish(self) -> Reply:
        calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for c in self.calls]
        content = "".join(self.content)
        return Reply(content if content or not calls else None, calls)

    @property
    def complete(self) -> bool:
        """The whole JSON object has been read (False for a reply cut short)."""
        return self.done

    # ----- the scanner ---------------------------------------------------------------------------
    def _path(self, with_top_key: bool) -> tuple:
        frames = self.stack if with_top_key else self.stack[:-1]
        return tuple(f.key for f in frames)

    def _char(self, c: str) -> None:
        top = self.stack[-1] if self.stack else None
        if self.in_string:
            self._string_char(c, top)
            return
        if top is not None and top.state == "scalar" and (c in WHITESPACE or c in ",}]"):
            top.state = "after"
        if c in WHITESPACE:
            self._emit(self._path(False), c)
        elif c == '"':
            self.in_string = True
            if top is not None and top.is_object and top.state in ("start", "key"):
                top.state, self.key_chars = "key", []
                self._emit(self._path(False), c)
            else:
                self._value_starts(top)
                self._emit(self._path(True), c)
        elif c == ":":
            top.state = "value"
            self._emit(self._path(False), c)
        elif c == ",":
            self._emit(self._path(False), c)
            if top.is_object:
                top.state = "key"
            else:
                top.key, top.state = top.key + 1, "value"
        elif c in "{[":
            self._value_starts(top)
            self._emit(self._path(True), c)
            self.stack.append(Frame(is_object=c == "{", key=None if c == "{" else 0, state="start"))
        elif c in "}]":
            self._emit(self._path(False), c)
            self.stack.pop()
            if self.stack:
                self.stack[-1].state = "after"
            else:
                self.done = True
        else:  # a character of a number, true, false or null
            if top is not None and top.state != "scalar":
                self._value_starts(top)
                top.state = "scalar"
            self._emit(self._path(True), c)

    def _value_starts(self, top: Frame | None) -> None:
        if top is not None:
            top.state = "value"

    def _string_char(self, c: str, top: Frame | None) -> None:
        is_key = top is not None and top.is_object and top.state == "key"
        path = self._path(False) if is_key else self._path(True)
        if self.escape:
            self.escape += c
            if self.escape[1] != "u" or len(self.escape) == 6:
                self._emit(path, self.escape, decoded=json.loads(f'"{self.escape}"') if not is_key else None)
                if is_key:
                    self.key_chars.append(json.loads(f'"{self.escape}"'))
                self.escape = ""
            return
        if c == "\\":
            self.escape = c
            return
        if c == '"':
            self.in_string = False
            self._emit(path, c)
            if is_key:
                top.key, top.state = "".join(self.key_chars), "colon"
            elif top is not None:
                top.state = "after"
                self._string_closed(path)
            return
        if is_key:
            self.key_chars.append(c)
        self._emit(path, c, decoded=c)

    def _string_closed(self, path: tuple) -> None:
        if len(path) == 3 and path[0] == "tool_calls" and path[2] == "name":
            self.calls.append({"id": self.new_id(), "name": "".join(self.name_chars), "arguments": ""})
            self.name_chars = []
            self.out.append(("call", len(self.calls) - 1, ""))

    def _emit(self, path: tuple, raw: str, decoded: str | None = None) -> None:
        """Route one character (or escape sequence) of the reply by the path of the value it belongs to."""
        if not path:
            return
        if path[0] == "response":
            if not self.response_is_text:
                self.content.append(raw)
                self.out.append(("content", None, raw))
            elif len(path) == 1 and self.in_string and decoded is not None:
                self._text(decoded)
        elif path[0] == "tool_calls" and len(path) >= 3:
            if path[2] == "name" and self.in_string and decoded is not None:
                self.name_chars.append(decoded)
            elif path[2] == self.arguments_key and self.calls and len(self.calls) == path[1] + 1:
                self.calls[-1]["arguments"] += raw
                self.out.append(("arguments", path[1], raw))

    def _text(self, piece: str) -> None:
        """Content characters; a UTF-16 surrogate pair written as two escapes becomes one character."""
        if self.high_surrogate:
            piece = (self.high_surrogate + piece).encode("utf-16", "surrogatepass").decode("utf-16")
            self.high_surrogate = ""
        elif len(piece) == 1 and 0xD800 <= ord(piece) <= 0xDBFF:
            self.high_surrogate = piece
            return
        self.content.append(piece)
        self.out.append(("content", None, piece))
