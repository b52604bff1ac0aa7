"""The Responses API in chat-completions shapes, so Responses uses the structured-output and tool
machinery of chat (``server/tools.py``, ``server/structured.py``) unchanged.

- input items -> chat messages: ``message`` items keep role and text; consecutive ``function_call`` items
  become one assistant message with ``tool_calls`` (a parallel call); a ``function_call_output`` becomes a
  ``role: "tool"`` message answering its ``call_id``.
- ``tools`` (``{"type": "function", "name", "description", "parameters", "strict"}``) -> chat's
  ``{"type": "function", "function": {...}}``; a ``namespace`` tool's functions are offered under
  ``<namespace>__<name>`` and the model's calls of them come back as ``function_call`` items with
  ``namespace`` and ``name``; hosted tools this server does not run (``HOSTED_TOOLS``: ``web_search``,
  ``file_search``, ...) are left out of the prompt and named by the route (a response header and a log
  line); any other type is refused. ``tool_choice`` ``{"type": "function", "name"}`` -> chat's
  ``{"type": "function", "function": {"name"}}``; ``text.format`` -> ``response_format``.
- a ``function_call_output`` without ``call_id`` answers the earliest unanswered call of its ``name``
  (and ``namespace``) in the conversation, or without a name the earliest unanswered call.
- the constrained reply -> output items: text becomes an assistant ``message``, each tool call a
  ``function_call`` item (``call_id``, ``name``, ``arguments`` as a JSON string), and the stored
  conversation keeps the reply as chat's assistant message so the next turn renders it as the model
  wrote it.

``strict`` is accepted either way: the grammar always enforces the parameters' schema (as for chat's
``response_format``). Errors of the shared machinery name chat's fields; :func:`responses_param` renames
them to the Responses fields (``tools[0].function.parameters`` -> ``tools.0.parameters``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from server.responses.protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ResponseCreateRequest,
    TextFormat,
)
from server.structured import FieldError

OFF_TOOL_FIELDS = {"strict": (None, True, False), "defer_loading": (None, False), "allowed_callers": (None,),
                   "output_schema": (None,), "async": (None, False)}
# tools OpenAI runs on its side; this server runs none of them, so they are left out of the prompt and named
HOSTED_TOOLS = ("web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11",
                "file_search", "code_interpreter", "image_generation", "mcp")
NAMESPACE_SEP = "__"  # a namespace tool's function ``f`` of namespace ``ns`` is offered as ``ns__f``


def offered_name(name: str, namespace: str | None) -> str:
    """The name the model sees (and calls) for a function, namespaced when it belongs to a namespace."""
    return name if not namespace else f"{namespace}{NAMESPACE_SEP}{name}"


def chat_messages(items: list[MessageItem | FunctionCallItem | FunctionCallOutputItem],
                  earlier: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Chat messages for Responses input items (see the module docstring); ``earlier``: the conversation
    before them (a previous response's), where calls answered by call-less outputs may be."""
    messages: list[dict[str, Any]] = []
    unanswered = Unanswered(earlier)
    for index, item in enumerate(items):
        if isinstance(item, MessageItem):
            messages.append(item.to_message())
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": offered_name(item.name, item.namespace), "arguments": item.arguments}}
            unanswered.add(call)
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            call_id = unanswered.answer(item, index)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": item.text()})
    return messages


class Unanswered:
    """Tool calls of a conversation not yet answered by an output, in order (to match outputs without
    ``call_id``)."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self.calls: dict[str, str] = {}  # call id -> offered name, in order
        for message in messages:
            for call in message.get("tool_calls") or ():
                self.add(call)
            if message.get("role") == "tool":
                self.calls.pop(message.get("tool_call_id"), None)

    def add(self, call: dict[str, Any]) -> None:
        self.calls[call["id"]] = call["function"]["name"]

    def answer(self, item: FunctionCallOutputItem, index: int) -> str:
        if item.call_id is not None:
            self.calls.pop(item.call_id, None)
            return item.call_id
        name = None if item.name is None else offered_name(item.name, item.namespace)
        for call_id, called in self.calls.items():
            if name is None or called == name:
                del self.calls[call_id]
                return call_id
        wanted = f"a call of {name!r}" if name else "a call"
        raise FieldError(f"input.{index} is a function_call_output without call_id, and {wanted} it could answer "
                         "is not in the conversation", f"input.{index}.call_id")


@dataclass
class OfferedTools:
    """The request's tools as chat's machinery takes them, and what became of the others."""

    tools: list[dict[str, Any]] | None = None  # chat's tool objects (None: no tools offered)
    hosted: list[str] = field(default_factory=list)  # types of hosted tools left out of the prompt
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)  # offered name -> (namespace, name)


def chat_tools(body: ResponseCreateRequest) -> OfferedTools:
    """``tools`` as chat's tool objects; a field chat's machinery cannot honour is a FieldError naming it."""
    offered = OfferedTools()
    converted: list[dict[str, Any]] = []
    for index, tool in enumerate(body.tools):
        kind, where = tool.get("type"), f"tools.{index}"
        if kind in HOSTED_TOOLS:
            offered.hosted.append(kind)
        elif kind == "namespace":
            converted.extend(namespace_tools(tool, where, offered))
        elif kind == "function":
            converted.append(function_tool(tool, where))
        else:
            raise FieldError(f"{where}.type {kind!r} is not a tool type this server offers (function, namespace; "
                             f"hosted tools it does not run are left out: {', '.join(HOSTED_TOOLS)})", f"{where}.type")
    offered.tools = converted or None
    return offered


def function_tool(tool: dict[str, Any], where: str, namespace: str | None = None) -> dict[str, Any]:
    """One function tool as chat's tool object (offered under its namespaced name in a namespace)."""
    for name, value in tool.items():
        if name in OFF_TOOL_FIELDS and value not in OFF_TOOL_FIELDS[name]:
            raise FieldError(f"{where}.{name} is not supported by this server", f"{where}.{name}")
        if name not in ("type", "name", "description", "parameters", *OFF_TOOL_FIELDS):
            raise FieldError(f"{where}.{name} is not a field of a function tool", f"{where}.{name}")
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
    if namespace is not None and isinstance(function.get("name"), str):
        function["name"] = offered_name(function["name"], namespace)
    return {"type": "function", "function": function}


def namespace_tools(tool: dict[str, Any], where: str, offered: OfferedTools) -> list[dict[str, Any]]:
    """A ``namespace`` tool's function tools, each offered as ``<namespace>__<name>``."""
    extra = set(tool) - {"type", "name", "description", "tools"}
    if extra:
        raise FieldError(f"{where}.{sorted(extra)[0]} is not a field of a namespace tool", f"{where}.{sorted(extra)[0]}")
    namespace, inner = tool.get("name"), tool.get("tools")
    if not isinstance(namespace, str) or not namespace:
        raise FieldError(f"{where}.name must be the namespace's name", f"{where}.name")
    if not isinstance(inner, list):
        raise FieldError(f"{where}.tools must be an array of function tools", f"{where}.tools")
    converted = []
    for index, function in enumerate(inner):
        if not isinstance(function, dict) or function.get("type") != "function":
            raise FieldError(f"{where}.tools.{index}.type must be 'function' (the only tool type a namespace "
                             "offers here)", f"{where}.tools.{index}.type")
        chat = function_tool(function, f"{where}.tools.{index}", namespace)
        offered.namespaced[chat["function"]["name"]] = (namespace, function.get("name"))
        converted.append(chat)
    return converted


def chat_tool_choice(tool_choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        extra = set(tool_choice) - {"type", "name"}
        if extra:
            raise FieldError(f"tool_choice.{sorted(extra)[0]} is not a field of a function choice",
                             f"tool_choice.{sorted(extra)[0]}")
        return {"type": "function", "function": {"name": tool_choice.get("name")}}
    if isinstance(tool_choice, dict):
        raise FieldError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
                         "tool_choice")
    return tool_choice


def chat_response_format(text_format: TextFormat | None) -> dict[str, Any] | None:
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return {"type": "json_object"}
    spec = {"name": text_format.name, "schema": text_format.schema_, "strict": text_format.strict,
            "description": text_format.description}
    return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}


_RENAMES = (
    (re.compile(r"^tools\[(\d+)\]\.function\.?"), r"tools.\1."),
    (re.compile(r"^tools\[(\d+)\]"), r"tools.\1"),
    (re.compile(r"^tool_choice\.function\.name$"), "tool_choice.name"),
    (re.compile(r"^response_format\.json_schema\.?"), "text.format."),
    (re.compile(r"^response_format\.?"), "text.format."),
    (re.compile(r"^messages(\[\d+\])?.*"), "input"),
)


def responses_param(param: str | None) -> str | None:
    """Chat's field name (from the shared tool machinery) as the Responses field it came from."""
    if param is None:
        return None
    for pattern, replacement in _RENAMES:
        if pattern.match(param):
            return pattern.sub(replacement, param).rstrip(".")
    return param
