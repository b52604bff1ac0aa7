"""The Responses API in chat-completions shapes, so Responses uses the structured-output and tool
machinery of chat (``server/tools.py``, ``server/structured.py``) unchanged.

- input items -> chat messages: ``message`` items keep role and text; consecutive ``function_call`` items
  become one assistant message with ``tool_calls`` (a parallel call); a ``function_call_output`` becomes a
  ``role: "tool"`` message answering its ``call_id``.
- ``tools`` (``{"type": "function", "name", "description", "parameters", "strict"}``) -> chat's
  ``{"type": "function", "function": {...}}``; ``tool_choice`` ``{"type": "function", "name"}`` -> chat's
  ``{"type": "function", "function": {"name"}}``; ``text.format`` -> ``response_format``.
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
from typing import Any

from server.responses.protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    MessageItem,
    ResponseCreateRequest,
    TextFormat,
)

OFF_TOOL_FIELDS = {"strict": (None, True, False), "defer_loading": (None, False), "allowed_callers": (None,),
                   "output_schema": (None,), "async": (None, False)}


def chat_messages(items: list[MessageItem | FunctionCallItem | FunctionCallOutputItem]) -> list[dict[str, Any]]:
    """Chat messages for Responses input items (see the module docstring)."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            messages.append(item.to_message())
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return messages


def chat_tools(body: ResponseCreateRequest) -> list[dict[str, Any]] | None:
    """``tools`` as chat's tool objects; a field chat's machinery cannot honour is a ValueError naming it."""
    if not body.tools:
        return None
    converted = []
    for index, tool in enumerate(body.tools):
        if tool.get("type") != "function":
            raise ToolFieldError(f"tools.{index}.type must be 'function' (the only tool type this server runs)",
                                 f"tools.{index}.type")
        for name, value in tool.items():
            if name in OFF_TOOL_FIELDS and value not in OFF_TOOL_FIELDS[name]:
                raise ToolFieldError(f"tools.{index}.{name} is not supported by this server", f"tools.{index}.{name}")
            if name not in ("type", "name", "description", "parameters", *OFF_TOOL_FIELDS):
                raise ToolFieldError(f"tools.{index}.{name} is not a field of a function tool", f"tools.{index}.{name}")
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(tool_choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        extra = set(tool_choice) - {"type", "name"}
        if extra:
            raise ToolFieldError(f"tool_choice.{sorted(extra)[0]} is not a field of a function choice",
                                 f"tool_choice.{sorted(extra)[0]}")
        return {"type": "function", "function": {"name": tool_choice.get("name")}}
    if isinstance(tool_choice, dict):
        raise ToolFieldError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
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


class ToolFieldError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


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
