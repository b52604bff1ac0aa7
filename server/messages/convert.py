"""A Messages API request in the chat shape the chat route plans with (``server/tools.py``: ``plan_chat``).

Anthropic's content blocks become OpenAI-style chat messages, so tools, ``tool_choice``, the reply
grammar, the chat template and the session cache are exactly the chat route's:

- ``system`` (a string or text blocks) is the leading system message; text blocks are joined by a blank line.
  A ``system`` turn inside ``messages`` (Claude Code's mid-conversation system beta) is a system message
  in its place.
- A user turn's text blocks become one user message; each ``tool_result`` block a ``tool`` message
  answering its ``tool_use_id`` (its content a string or text blocks; ``is_error: true`` prefixes the
  result with ``[error] ``), in block order.
- An assistant turn's text blocks are its content and its ``tool_use`` blocks its ``tool_calls`` (the
  ``input`` object as the arguments); ``thinking`` and ``redacted_thinking`` blocks are dropped (the
  served models write none, so none is shown to them).
- A final assistant turn of text only is a prefill: the reply continues it (not with tools in play).
- ``tools``: custom tools (``type`` absent or ``"custom"``: ``name``, ``description``, ``input_schema``)
  are offered; Anthropic's own tool types (``web_search_*``, ``bash_*``, ``text_editor_*``, ...) name
  tools whose definition and execution live on Anthropic's side, so they are left out of the prompt and
  named in the ``x-sinkserve-tools-left-out`` header (never called). A ``propertyNames`` every key
  satisfies (``{"type": "string"}``, as zod writes records) is dropped: the grammar engine has no
  ``propertyNames``, and the schema means the same without it.
- ``tool_choice``: ``auto``, ``any`` (= ``required``), ``tool`` (a named one), ``none``;
  ``disable_parallel_tool_use`` = ``parallel_tool_calls: false``.
- ``output_config.format`` (or the beta's ``output_format``: ``{"type": "json_schema", "schema": ...}``)
  = ``response_format``.

Every other block type (images, documents, search results, server tool results) is a 400 naming it.
Errors of the shared tool machinery name chat fields (``tools[0].function.parameters``);
:func:`anthropic_param` renames them to this API's (``tools[0].input_schema``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.messages.protocol import CountTokensRequest
from server.structured import NOT_SCHEMAS, FieldError

TEXT_KEYS = {"type", "text", "cache_control", "citations"}
TOOL_USE_KEYS = {"type", "id", "name", "input", "cache_control", "caller"}
TOOL_RESULT_KEYS = {"type", "tool_use_id", "content", "is_error", "cache_control"}
THINKING_TYPES = {"thinking": {"type", "thinking", "signature"}, "redacted_thinking": {"type", "data"}}
TOOL_KEYS = {"type", "name", "description", "input_schema", "cache_control", "strict", "eager_input_streaming"}
TOOL_CHOICE_KEYS = {"auto": {"type", "disable_parallel_tool_use"}, "any": {"type", "disable_parallel_tool_use"},
                    "tool": {"type", "name", "disable_parallel_tool_use"}, "none": {"type"}}
CHOICE_MODES = {"auto": "auto", "any": "required", "none": "none"}
CONTEXT_EDITS = ("clear_tool_uses_", "clear_thinking_")  # edit types accepted (docs/messages.md says why)
ERROR_PREFIX = "[error] "
NAMED_SCHEMAS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
TRIVIAL_PROPERTY_NAMES = ({}, {"type": "string"}, True)  # every JSON object key satisfies these


@dataclass
class Conversation:
    """The request in chat terms, for ``plan_chat``."""

    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None
    prefill: str = ""  # the text of a final assistant turn, continued by the reply
    left_out: list[str] = field(default_factory=list)  # Anthropic-defined tools not offered


def check_keys(block: Mapping, allowed: set[str], where: str) -> None:
    for key in block:
        if key not in allowed:
            raise FieldError(f"{where}.{key}: Extra inputs are not permitted", f"{where}.{key}")


def text_of(block: Any, where: str) -> str:
    """The text of a text block, checked (``citations`` only null or empty: none are produced)."""
    if not isinstance(block, Mapping) or block.get("type") != "text":
        raise FieldError(f"{where} must be a text block", f"{where}.type")
    check_keys(block, TEXT_KEYS, where)
    if not isinstance(block.get("text"), str):
        raise FieldError(f"{where}.text must be a string", f"{where}.text")
    if block.get("citations"):
        raise FieldError(f"{where}.citations: citations are not supported by this server", f"{where}.citations")
    return block["text"]


def system_text(system: str | list | None, where: str = "system") -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "\n\n".join(text_of(block, f"{where}[{j}]") for j, block in enumerate(system))


def blocks_of(content: str | list) -> list:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def tool_result_text(block: Mapping, where: str) -> str:
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        text = "\n\n".join(text_of(part, f"{where}.content[{k}]") for k, part in enumerate(content))
    else:
        raise FieldError(f"{where}.content must be a string or text blocks", f"{where}.content")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise FieldError(f"{where}.is_error must be a boolean", f"{where}.is_error")
    return ERROR_PREFIX + text if is_error else text


def user_turn(blocks: list, i: int, calls: set[str]) -> list[dict]:
    out, texts = [], []
    for j, block in enumerate(blocks):
        where = f"messages[{i}].content[{j}]"
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "tool_result":
            check_keys(block, TOOL_RESULT_KEYS, where)
            call_id = block.get("tool_use_id")
            if call_id not in calls:
                raise FieldError(f"{where}.tool_use_id {call_id!r} answers no earlier tool_use block",
                                 f"{where}.tool_use_id")
            if texts:
                out.append({"role": "user", "content": "\n\n".join(texts)})
                texts = []
            out.append({"role": "tool", "tool_call_id": call_id, "content": tool_result_text(block, where)})
        elif kind == "text":
            texts.append(text_of(block, where))
        else:
            raise FieldError(f"{where}.type {kind!r} is not supported in a user turn by this server "
                             "(text and tool_result blocks are)", f"{where}.type")
    if texts or not out:
        out.append({"role": "user", "content": "\n\n".join(texts)})
    return out


def assistant_turn(blocks: list, i: int, calls: set[str]) -> dict:
    texts, tool_calls = [], []
    for j, block in enumerate(blocks):
        where = f"messages[{i}].content[{j}]"
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            texts.append(text_of(block, where))
        elif kind == "tool_use":
            check_keys(block, TOOL_USE_KEYS, where)
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise FieldError(f"{where} needs a string id and name", where)
            if not isinstance(block.get("input"), Mapping):
                raise FieldError(f"{where}.input must be an object", f"{where}.input")
            calls.add(block["id"])
            tool_calls.append({"id": block["id"], "type": "function",
                               "function": {"name": block["name"], "arguments": json.dumps(block["input"])}})
        elif kind in THINKING_TYPES:
            check_keys(block, THINKING_TYPES[kind], where)
        else:
            raise FieldError(f"{where}.type {kind!r} is not supported in an assistant turn by this server "
                             "(text, tool_use and thinking blocks are)", f"{where}.type")
    message = {"role": "assistant", "content": "".join(texts)}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_messages(body: CountTokensRequest) -> tuple[list[dict], str]:
    """The chat messages of ``system`` and ``messages``, and the prefill (a final assistant turn's text)."""
    system = system_text(body.system)
    out = [{"role": "system", "content": system}] if system else []
    calls: set[str] = set()
    prefill = ""
    for i, message in enumerate(body.messages):
        if message.role == "system":
            out.append({"role": "system", "content": system_text(message.content, f"messages[{i}].content")})
            continue
        blocks = blocks_of(message.content)
        if message.role == "user":
            out.extend(user_turn(blocks, i, calls))
            continue
        turn = assistant_turn(blocks, i, calls)
        if i == len(body.messages) - 1 and "tool_calls" not in turn:
            prefill = turn["content"]
        else:
            out.append(turn)
    return out, prefill


def without_trivial_keywords(node: Any, named: bool = False) -> Any:
    """A copy of a JSON Schema without ``propertyNames`` that every key satisfies (zod's records write
    ``{"type": "string"}``; the grammar engine implements no ``propertyNames``): the same schema.
    ``named``: ``node`` maps names to subschemas (``properties``), so its keys are names, not keywords."""
    if isinstance(node, list):
        return [without_trivial_keywords(item) for item in node]
    if not isinstance(node, Mapping):
        return node
    out = {}
    for key, value in node.items():
        if named:
            out[key] = without_trivial_keywords(value)
        elif key == "propertyNames" and value in TRIVIAL_PROPERTY_NAMES:
            continue
        else:
            out[key] = value if key in NOT_SCHEMAS else without_trivial_keywords(value, key in NAMED_SCHEMAS)
    return out


def chat_tools(tools: list | None) -> tuple[list[dict] | None, list[str], list[int]]:
    """OpenAI function tools of the custom tools, the Anthropic-defined tools left out, and the original
    index of each offered tool (for error names)."""
    if tools is None:
        return None, [], []
    offered, left_out, where = [], [], []
    for k, tool in enumerate(tools):
        kind = tool.get("type")
        if kind not in (None, "custom"):
            left_out.append(str(tool.get("name") or kind))
            continue
        check_keys(tool, TOOL_KEYS, f"tools[{k}]")
        if "input_schema" not in tool:
            raise FieldError(f"tools[{k}].input_schema: Field required", f"tools[{k}].input_schema")
        function = {"name": tool.get("name"), "description": tool.get("description") or "",
                    "parameters": without_trivial_keywords(tool["input_schema"])}
        offered.append({"type": "function", "function": function})
        where.append(k)
    return offered, left_out, where


def chat_tool_choice(choice: dict | None) -> tuple[Any, bool | None]:
    """(``tool_choice``, ``parallel_tool_calls``) in chat terms."""
    if choice is None:
        return None, None
    kind = choice.get("type")
    if kind not in TOOL_CHOICE_KEYS:
        raise FieldError("tool_choice.type must be 'auto', 'any', 'tool' or 'none'", "tool_choice.type")
    check_keys(choice, TOOL_CHOICE_KEYS[kind], "tool_choice")
    disable = choice.get("disable_parallel_tool_use")
    if disable is not None and not isinstance(disable, bool):
        raise FieldError("tool_choice.disable_parallel_tool_use must be a boolean",
                         "tool_choice.disable_parallel_tool_use")
    parallel = None if disable is None else not disable
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}, parallel
    return CHOICE_MODES[kind], parallel


def output_format(body: CountTokensRequest) -> dict | None:
    fmt = body.output_config.format if body.output_config is not None else None
    name = "output_config.format"
    if fmt is None and body.output_format is not None:
        fmt, name = body.output_format, "output_format"
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), Mapping):
        raise FieldError(f"{name} must be {{'type': 'json_schema', 'schema': {{...}}}}", name)
    check_keys(fmt, {"type", "schema"}, name)
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def check_context_management(value: dict | None) -> None:
    """``context_management``: clearing old tool results or thinking is accepted (docs/messages.md)."""
    if value is None:
        return
    check_keys(value, {"edits"}, "context_management")
    edits = value.get("edits") or []
    if not isinstance(edits, list):
        raise FieldError("context_management.edits must be an array", "context_management.edits")
    for k, edit in enumerate(edits):
        kind = edit.get("type") if isinstance(edit, Mapping) else None
        if not isinstance(kind, str) or not kind.startswith(CONTEXT_EDITS):
            raise FieldError(f"context_management.edits[{k}].type {kind!r} is not supported by this server",
                             f"context_management.edits[{k}].type")


def convert(body: CountTokensRequest) -> tuple[Conversation, list[int]]:
    """The request in chat terms, and the original index of each offered tool."""
    messages, prefill = chat_messages(body)
    tools, left_out, where = chat_tools(body.tools)
    tool_choice, parallel = chat_tool_choice(body.tool_choice)
    check_context_management(body.context_management)
    conversation = Conversation(messages, tools, tool_choice, parallel, output_format(body), prefill, left_out)
    if prefill and tool_choice != "none" and tools:
        last = len(body.messages) - 1
        raise FieldError(f"messages[{last}]: a final assistant turn (prefill) cannot be continued with tools "
                         "in play (tool_choice 'none' allows it)", f"messages[{last}].role")
    return conversation, where


RENAMES = (
    (re.compile(r"^tools\[(\d+)\]\.function\.parameters"), "input_schema"),
    (re.compile(r"^tools\[(\d+)\]\.function\.(name|description)"), None),
    (re.compile(r"^tools\[(\d+)\]\.function$"), ""),
)


def anthropic_param(param: str | None, where: Sequence[int]) -> str | None:
    """A chat field name of the tool machinery as the Messages API's (tool indexes as the client sent them)."""
    if param is None:
        return None
    if param.startswith("tool_choice.function.name"):
        return "tool_choice.name"
    if param.startswith("response_format.json_schema.schema"):
        return "output_config.format.schema" + param.removeprefix("response_format.json_schema.schema")
    if param.startswith("response_format"):
        return "output_config.format"
    for pattern, field_name in RENAMES:
        match = pattern.match(param)
        if match:
            k = int(match.group(1))
            index = where[k] if k < len(where) else k
            name = field_name if field_name is not None else match.group(2)
            rest = param[match.end():]
            return f"tools[{index}]" + (f".{name}" if name else "") + rest
    return param


def renamed(exc: FieldError, where: Sequence[int]) -> FieldError:
    """``exc`` with its field (and the field's mention in the message) in this API's names."""
    param = anthropic_param(exc.param, where)
    message = str(exc).replace(exc.param, param) if exc.param and param else str(exc)
    return FieldError(message, param)
