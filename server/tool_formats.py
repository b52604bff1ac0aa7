"""Tool calls in a model family's own format: found in its chat template, written under a grammar, parsed
back into OpenAI ``tool_calls``.

A chat template that renders tools also teaches the model how to call them; a model answers best in the
syntax it was trained on. Three formats are recognised from the template's text (:func:`detect_format`):

- ``hermes`` (Qwen2.5, Qwen3; the template contains ``<tool_call>``): each call is
  ``<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>``, several separated by a newline; text
  may come first.
- ``llama3_json`` (Llama 3.1 to 3.3; the template writes ``"parameters": `` and knows ``ipython``): one
  bare ``{"name": N, "parameters": {...}}`` (the template renders one call per assistant turn, so one
  call is written even when ``parallel_tool_calls`` allows more).
- ``mistral`` (the template contains ``[TOOL_CALLS]``): ``[TOOL_CALLS] [{"name": N, "arguments": {...}},
  ...]``; call ids are 9 letters and digits, as the template requires of the history (ids of earlier
  calls that are not are mapped to such ids, the same for the call and its result).

gpt-oss's harmony format is not among them: its markers are special tokens that the detokenizer drops.

The grammar (a Lark grammar for llguidance, https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md)
writes the family's syntax around JSON that validates against the called tool's ``parameters``
(``%json``: an ``anyOf`` over the tools). ``tool_choice: "required"`` or a named function: calls only;
``"auto"``: a call or free text. A marker that is one added token of the tokenizer (Qwen's ``<tool_call>``,
Mistral's ``[TOOL_CALLS]``) is written as that token (``<[id]>``). Where the decoded text does not show
the marker (Llama's bare JSON; a special token such as ``[TOOL_CALLS]``, which the detokenizer drops),
free text may not begin with ``{``, ``[`` or a blank: the parser tells a call from text by the reply's
first character. Where it shows the marker (``<tool_call>`` is not special in Qwen's tokenizer), free
text may be anything that does not contain it, and calls may follow it.

:class:`NativeReplyStream` parses such a reply as it streams, with the same deltas as the generic format's
:class:`~server.tool_stream.ReplyStream` (which reads each call's JSON object here too).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.tool_stream import WHITESPACE, Reply, ReplyStream, new_call_id

# llguidance's JSON options, as the engine's own JSON grammars use them (compact, no free whitespace)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
CALL_ID_CHARS = string.ascii_letters + string.digits
FREE_TEXT = r"([^\s\[{](.|\n)*)?"  # free text where the marker is not in the decoded text


@dataclass(frozen=True)
class ToolFormat:
    name: str
    marker: str  # the text that opens the calls ("" for Llama's bare JSON)
    arguments_key: str  # "arguments" or "parameters"
    parallel: bool  # the template renders several calls in one assistant turn
    short_ids: bool  # call ids of 9 letters and digits (Mistral)
    close: str = ""  # the text that closes each call (Hermes)


HERMES = ToolFormat("hermes", "<tool_call>", "arguments", parallel=True, short_ids=False, close="</tool_call>")
LLAMA3_JSON = ToolFormat("llama3_json", "", "parameters", parallel=False, short_ids=False)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "arguments", parallel=True, short_ids=True)
FORMATS = (HERMES, LLAMA3_JSON, MISTRAL)


def detect_format(chat_template: str | None) -> ToolFormat | None:
    """The native tool-call format a chat template teaches, or None (the generic format applies)."""
    if not chat_template or "tools" not in chat_template:
        return None
    if "<tool_call>" in chat_template:
        return HERMES
    if "[TOOL_CALLS]" in chat_template:
        return MISTRAL
    if '"parameters": ' in chat_template and ("<|python_tag|>" in chat_template or "ipython" in chat_template):
        return LLAMA3_JSON
    return None


@dataclass(frozen=True)
class Marker:
    """How a grammar writes a marker and whether the decoded reply shows it."""

    lark: str  # a Lark string literal, or a token as ``<[id]>``
    shown: bool  # the detokenizer keeps it (it drops special tokens)
    token: bool = False  # written as one token of the tokenizer's own


def marker(text: str, tokenizer: Any = None) -> Marker:
    """``text`` as the grammar writes it for ``tokenizer``. A marker that is one added token (Qwen's
    ``<tool_call>``, Mistral's ``[TOOL_CALLS]``) is written as that token: llguidance treats added tokens
    as special, so the same text spelled in other tokens would be another string to it. Anything else (and
    any marker without a tokenizer) is written as text."""
    if tokenizer is None or not text:
        return Marker(json.dumps(text), True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    shown = text in tokenizer.decode(ids, skip_special_tokens=True)
    if len(ids) == 1 and ids[0] in (getattr(tokenizer, "added_tokens_decoder", None) or {}):
        return Marker(f"<[{ids[0]}]>", shown, token=True)
    return Marker(json.dumps(text), shown)


def call_schema(fmt: ToolFormat, tools: Sequence[Any]) -> dict:
    """The JSON schema of one call: the name of one of ``tools`` and arguments valid for it."""
    return {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": t.name}, fmt.arguments_key: t.parameters},
        "required": ["name", fmt.arguments_key],
        "additionalProperties": False,
    } for t in tools]}


def native_grammar(fmt: ToolFormat, schema: dict, *, auto: bool, parallel: bool, tokenizer: Any = None) -> tuple[str, bool]:
    """(the Lark grammar of a reply in ``fmt`` whose calls follow ``schema``, whether its marker is shown
    in the decoded text). ``auto``: free text instead of calls is allowed."""
    several = parallel and fmt.parallel
    lines = ["%llguidance {}", f"call: %json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS}, ensure_ascii=False)}"]
    opening = marker(fmt.marker, tokenizer)
    if fmt is HERMES:
        closing = marker(fmt.close, tokenizer)
        lines.append(f'block: {opening.lark} "\\n" call "\\n" {closing.lark}')
        lines.append('calls: block ("\\n" block)*' if several else "calls: block")
        if auto and opening.shown:  # text, then maybe calls (the first marker opens them)
            escaped = re.escape(fmt.marker)
            lines.append(f"PLAIN: /(.|\\n)*/ & ~/(.|\\n)*{escaped}(.|\\n)*/")
            if opening.token:  # text cannot hold the token: it ends where the token comes
                lines.append("start: PLAIN | calls | PLAIN calls")
            else:  # the marker spelled as text ends the lead
                lines += [f"start: PLAIN | lead \"\\n\" call \"\\n\" {closing.lark}" + (' ("\\n" block)*' if several else ""),
                          f"lead[lazy]: /(.|\\n)*/ {opening.lark}"]
            return "\n".join(lines) + "\n", True
    elif fmt is MISTRAL:
        lines.append(f'calls: {opening.lark} " [" call' + (' (", " call)*' if several else "") + ' "]"')
    else:
        lines.append("calls: call")
    lines.append("start: PLAIN | calls" if auto else "start: calls")
    if auto:
        lines.append(f"PLAIN: /{FREE_TEXT}/")
    return "\n".join(lines) + "\n", opening.shown


def short_call_id() -> str:
    return "".join(secrets.choice(CALL_ID_CHARS) for _ in range(9))


def short_id(call_id: str) -> str:
    """A call id of 9 letters and digits: itself when it is one, else one derived from it."""
    if len(call_id) == 9 and call_id.isalnum() and call_id.isascii():
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def with_short_ids(messages: list[dict]) -> list[dict]:
    """Rendered history (Hugging Face's shape) whose call ids are 9 letters and digits."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [{**c, "id": short_id(c["id"])} for c in message["tool_calls"]]}
        if message.get("role") == "tool" and isinstance(message.get("tool_call_id"), str):
            message = {**message, "tool_call_id": short_id(message["tool_call_id"])}
        out.append(message)
    return out


def merge(deltas: list[dict]) -> list[dict]:
    """Adjacent content deltas, and argument fragments of one call, joined (as ReplyStream sends them)."""
    out: list[dict] = []
    for delta in deltas:
        last = out[-1] if out else {}
        if "content" in delta and "content" in last:
            last["content"] += delta["content"]
            continue
        if "tool_calls" in delta and "tool_calls" in last:
            before, new = last["tool_calls"][0], delta["tool_calls"][0]
            if before["index"] == new["index"] and "id" not in before and "id" not in new:
                before["function"]["arguments"] += new["function"]["arguments"]
                continue
        out.append(json.loads(json.dumps(delta)))
    return out


@dataclass
class NativeReplyStream:
    """Feed decoded text; get OpenAI delta dicts; ``flush()`` at the end; ``finish()`` the whole reply.

    States: ``text`` (Hermes with its marker shown: content until the marker), ``start`` (the first
    character decides: ``{`` or ``[`` opens the calls, anything else is content), ``content`` (all the rest
    is content) and ``calls`` (each ``{`` at the top opens a call's JSON object, read by a ReplyStream;
    markers, blanks and separators between calls are skipped)."""

    fmt: ToolFormat
    marker_shown: bool = True
    state: str = ""
    held: str = ""  # text not yet sent: a possible beginning of the marker, blanks
    content: list[str] = field(default_factory=list)
    inner: ReplyStream | None = None
    in_call: bool = False

    def __post_init__(self) -> None:
        if not self.state:
            self.state = "text" if self.fmt.marker and self.marker_shown and self.fmt is HERMES else "start"

    def feed(self, text: str) -> list[dict]:
        deltas: list[dict] = []
        for char in text:
            self._char(char, deltas)
        return merge(deltas)

    def flush(self) -> list[dict]:
        """At the end of the reply: the text held back (blanks, what looked like a marker's beginning)."""
        deltas: list[dict] = []
        if self.held and self.state in ("text", "content"):
            self._content(self.held, deltas)
        self.held = ""
        return deltas

    def finish(self) -> Reply:
        calls = self.inner.finish().tool_calls if self.inner is not None else []
        content = "".join(self.content) + (self.held if self.state in ("text", "content") else "")
        return Reply(content if content or not calls else None, calls)

    @property
    def complete(self) -> bool:
        """No call is left open (False for a reply cut short inside one)."""
        return not self.in_call

    # ----- states --------------------------------------------------------------------------------
    def _char(self, c: str, deltas: list[dict]) -> None:
        if self.state == "content":
            self._content(c, deltas)
        elif self.state == "text":
            self._text(c, deltas)
        elif self.state == "start":
            if c in WHITESPACE:
                self.held += c
            elif c in "{[":
                self.state, self.held = "calls", ""
                self._call_char(c, deltas)
            else:
                self.state, held, self.held = "content", self.held, ""
                self._content(held + c, deltas)
        else:
            self._call_char(c, deltas)

    def _text(self, c: str, deltas: list[dict]) -> None:
        self.held += c
        found = self.held.find(self.fmt.marker)
        if found >= 0:
            self._content(self.held[:found].rstrip(WHITESPACE), deltas)
            self.state, self.held = "calls", ""
            return
        keep = next((n for n in range(min(len(self.held), len(self.fmt.marker) - 1), 0, -1)
                     if self.fmt.marker.startswith(self.held[-n:])), 0)
        cut = len(self.held) - keep
        while cut > 0 and self.held[cut - 1] in WHITESPACE:
            cut -= 1
        if cut:
            self._content(self.held[:cut], deltas)
            self.held = self.held[cut:]

    def _call_char(self, c: str, deltas: list[dict]) -> None:
        if not self.in_call:
            if c != "{":
                return  # a marker, a blank, a separator or a bracket between calls
            if self.inner is None:
                new_id = short_call_id if self.fmt.short_ids else new_call_id
                self.inner = ReplyStream(arguments_key=self.fmt.arguments_key, new_id=new_id)
                self.inner.feed('{"tool_calls": [')
            else:
                self.inner.feed(", ")
            self.in_call = True
        deltas += self.inner.feed(c)
        if len(self.inner.stack) == 2:  # back in the synthetic array: the call's object closed
            self.in_call = False

    def _content(self, text: str, deltas: list[dict]) -> None:
        if text:
            self.content.append(text)
            deltas.append({"content": text})
