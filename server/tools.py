"""Tool calling: OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` as a prompt, a grammar
and a parser of the constrained reply back into ``tool_calls``.

Two reply formats. The family's own, where the chat template teaches one (server/tool_formats.py:
Hermes-style ``<tool_call>`` for Qwen2.5/Qwen3, Llama 3.1's JSON, Mistral's ``[TOOL_CALLS]``): the
template gets the tools as ``apply_chat_template(..., tools=...)`` (``ChatPlan.template_kwargs``) and the
history in Hugging Face's shape (assistant ``tool_calls`` with ``arguments`` as objects, ``role: "tool"``
messages), nothing is added to the prompt, and a Lark grammar writes the family's syntax around each
call's JSON. ``tool_choice: "auto"`` together with a ``response_format`` keeps the generic format (a
JSON answer could not be told from a call in the bare formats).

Otherwise the generic format, after llama.cpp's server's generic tool-call fallback
(https://github.com/ggml-org/llama.cpp/blob/master/docs/function-calling.md): the model writes one JSON
object, either ``{"tool_calls": [{"name": "<tool>", "arguments": {...}}, ...]}`` or, where it may answer
(``tool_choice: "auto"``), ``{"response": "<text>"}`` (the ``response_format`` schema's value instead of
text when one is given). A template that mentions ``tools`` without a known format still gets them as
``tools=...`` and the history in Hugging Face's shape; any other (the embedded SmolLM2's) gets the tool
list and the reply format in the system message (after the client's own, if any), an assistant turn
that called tools as the JSON the model wrote, and a tool result as a user message ``{"tool_result":
{...}}``. Both add the reply-format instruction, since the grammar, not the template, decides what the
model writes.

In both, the grammar holds ``name`` to one of the tools (the named one for a named ``tool_choice``) and
``arguments`` to that tool's ``parameters`` (an ``anyOf`` over the tools); ``"required"`` or a named
function leave out the free answer; ``parallel_tool_calls: false`` allows one call.

For a route: ``plan = plan_chat(...)``, then ``engine.render_chat(plan.messages, pin, plan.template_kwargs)``,
``constraint = await plan_constraint(engine, plan)`` (before anything is queued), ``engine.generate(...,
constraint=constraint)``, and, when ``plan.wrapped``, ``plan.reply_stream()`` to turn the text into content
and tool calls (server/routes/chat.py, server/responses/route.py).

Decisions: a tool without ``parameters`` takes no arguments (an empty-object schema, as OpenAI
documents); ``parameters`` that is not an object schema, an unknown name in ``tool_choice``, a tool
message whose ``tool_call_id`` no earlier assistant call has, more than ``MAX_TOOLS`` tools or a schema
past ``MAX_SCHEMA_CHARS`` are a ``FieldError`` naming the field (a 400).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine import MAX_GRAMMAR_CHARS, Constraint, Grammar, InvalidRequest
from server.structured import NAME, FieldError, as_dict, bound_strings, check_schema, response_format_grammar
from server.tool_formats import (
    NativeReplyStream,
    ToolFormat,
    call_schema,
    detect_format,
    native_grammar,
    with_short_ids,
)
from server.tool_stream import ReplyStream

MAX_TOOLS = 128  # OpenAI's own limit
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON Schema for an object


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none" | "auto" | "required" | "function"
    name: str | None = None  # the forced function when mode == "function"


@dataclass
class ChatPlan:
    """What a chat request with tools and/or response_format becomes, for the engine and for the reply."""

    messages: list[dict]  # for apply_chat_template
    template_kwargs: dict = field(default_factory=dict)  # {"tools": [...]} for templates that know tools
    grammar: Grammar | None = None
    grammar_param: str | None = None  # the field a grammar compile error names
    tools: tuple[Tool, ...] = ()
    wrapped: bool = False  # True: the reply is the tools JSON object; parse it with reply_stream()
    response_is_text: bool = True  # in the wrapper: "response" is a string (else response_format JSON)
    tool_format: ToolFormat | None = None  # the family's own call syntax (server/tool_formats.py); None: generic
    marker_shown: bool = True  # the native format's marker is in the decoded text

    def reply_stream(self) -> ReplyStream | NativeReplyStream:
        """An incremental parser of this request's reply (only when ``wrapped``)."""
        if self.tool_format is not None:
            return NativeReplyStream(self.tool_format, self.marker_shown)
        return ReplyStream(response_is_text=self.response_is_text)


def parse_tools(tools: Any) -> tuple[Tool, ...]:
    tools = as_dict(tools)
    if tools is None:
        return ()
    if not isinstance(tools, list):
        raise FieldError("tools must be an array", "tools")
    if len(tools) > MAX_TOOLS:
        raise FieldError(f"tools has {len(tools)} entries; the limit is {MAX_TOOLS}", "tools")
    parsed, names = [], set()
    for i, tool in enumerate(tools):
        tool = as_dict(tool)
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise FieldError(f"{where}.type must be 'function'", f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise FieldError(f"{where}.function must be an object", f"{where}.function")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise FieldError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'", f"{where}.function.name")
        if name in names:
            raise FieldError(f"{where}.function.name {name!r} is given twice", f"{where}.function.name")
        names.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise FieldError(f"{where}.function.description must be a string", f"{where}.function.description")
        parsed.append(Tool(name, description, tool_parameters(function.get("parameters"), f"{where}.function.parameters")))
    return tuple(parsed)


def tool_parameters(parameters: Any, param: str) -> dict:
    """An object schema for a tool's arguments; none given: no arguments."""
    if parameters is None:
        return dict(EMPTY_PARAMETERS)
    schema = check_schema(parameters, param)
    if schema.get("type", "object") != "object":
        raise FieldError(f"{param} must describe an object (type 'object'), not {schema.get('type')!r}", param)
    return {"type": "object", **schema}


def parse_tool_choice(tool_choice: Any, tools: Sequence[Tool]) -> ToolChoice:
    tool_choice = as_dict(tool_choice)
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none")
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not tools:
            raise FieldError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
        return ToolChoice(tool_choice)
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in {t.name for t in tools}:
            raise FieldError(f"tool_choice names {name!r}, which is not one of the tools", "tool_choice.function.name")
        return ToolChoice("function", name)
    raise FieldError("tool_choice must be 'none', 'auto', 'required' or "
                     "{'type': 'function', 'function': {'name': ...}}", "tool_choice")


def template_knows_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def reply_schema(tools: Sequence[Tool], choice: ToolChoice, parallel: bool, response: dict | None) -> dict:
    """The JSON schema of the wrapped reply: tool calls, or (``auto``) a response."""
    callable_tools = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    call = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": t.name}, "arguments": t.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for t in callable_tools]}
    calls = {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    branches = [{"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                 "additionalProperties": False}]
    if choice.mode == "auto":
        branches.append({"type": "object", "properties": {"response": response or {"type": "string"}},
                         "required": ["response"], "additionalProperties": False})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def reply_instructions(tools: Sequence[Tool], choice: ToolChoice, parallel: bool, list_tools: bool) -> str:
    lines = []
    if list_tools:
        listing = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools]
        lines += ["You can call these tools (name, description, JSON Schema of the arguments):",
                  json.dumps(listing, ensure_ascii=False)]
    example = tools[0].name if choice.mode != "function" else choice.name
    lines.append(f'Reply with one JSON object only. To call a tool: {{"tool_calls": [{{"name": "{example}", '
                 '"arguments": {...}}]}, with the name of the tool and its arguments.')
    if choice.mode == "auto":
        lines.append('To answer without a tool: {"response": "..."}, with your answer to the user in place of the dots.')
    elif choice.mode == "required":
        lines.append("You must call at least one tool.")
    else:
        lines.append(f"You must call the tool {choice.name}.")
    if not parallel:
        lines.append("Call one tool at a time.")
    return "\n".join(lines)


def plan_chat(
    messages: Sequence[Any],
    *,
    tools: Any = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    response_format: Any = None,
    chat_template: str | None = None,
    max_tokens: int | None = None,
    tokenizer: Any = None,
) -> ChatPlan:
    """Validate the tool and format fields of a chat request and turn them into prompt and grammar.
    ``max_tokens``: the reply's budget; given, the grammar's unbounded strings get a ``maxLength`` that
    leaves room to close the JSON (``server.structured.bound_strings``). ``tokenizer``: the model's, which
    tells whether a native format's marker is a special token (without it: text)."""
    parsed = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, parsed)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise FieldError("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    parallel = parallel_tool_calls is not False
    fmt = response_format_grammar(response_format, max_tokens)
    native = template_knows_tools(chat_template)
    active = choice.mode != "none"
    rendered = render_history(messages, native=native, wrap_text=active and not native)
    if not active:  # no tools in play: a plain chat, maybe with a response_format grammar
        param = None if fmt is None else "response_format" if fmt.kind == "json_object" else "response_format.json_schema.schema"
        return ChatPlan(rendered, grammar=fmt, grammar_param=param, tools=parsed)
    kwargs = {"tools": [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                            "parameters": t.parameters}} for t in parsed]}
    family = detect_format(chat_template) if native else None
    if family is not None and not (choice.mode == "auto" and fmt is not None):
        return native_plan(rendered, family, parsed, choice, parallel, kwargs, max_tokens, tokenizer)
    response = None
    if fmt is not None:
        response = {"type": "object"} if fmt.kind == "json_object" else json.loads(fmt.source)
    schema = bound_strings(reply_schema(parsed, choice, parallel, response), max_tokens)
    grammar = Grammar.json_schema(schema) if len(json.dumps(schema)) <= MAX_GRAMMAR_CHARS else None
    if grammar is None:
        raise FieldError(f"the tools' schemas together exceed {MAX_GRAMMAR_CHARS} characters", "tools")
    instructions = reply_instructions(parsed, choice, parallel, list_tools=not native)
    return ChatPlan(
        with_system(rendered, instructions), template_kwargs=kwargs if native else {}, grammar=grammar,
        grammar_param="tools", tools=parsed, wrapped=True, response_is_text=response is None,
    )


def native_plan(rendered: list[dict], family: ToolFormat, tools: Sequence[Tool], choice: ToolChoice, parallel: bool,
                kwargs: dict, max_tokens: int | None, tokenizer: Any) -> ChatPlan:
    """A plan in the family's own call syntax: the template gets the tools and says how to call them (no
    instructions are added), the grammar writes that syntax (server/tool_formats.py)."""
    callable_tools = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    schema = bound_strings(call_schema(family, callable_tools), max_tokens)
    text, shown = native_grammar(family, schema, auto=choice.mode == "auto", parallel=parallel, tokenizer=tokenizer)
    if len(text) > MAX_GRAMMAR_CHARS:
        raise FieldError(f"the tools' schemas together exceed {MAX_GRAMMAR_CHARS} characters", "tools")
    messages = with_short_ids(rendered) if family.short_ids else rendered
    return ChatPlan(messages, template_kwargs=kwargs, grammar=Grammar.lark(text), grammar_param="tools",
                    tools=tuple(tools), wrapped=True, tool_format=family, marker_shown=shown)


async def plan_constraint(engine: Any, plan: ChatPlan) -> Constraint | None:
    """The compiled constraint of ``plan`` for one generation (``engine.constraint``: off the event loop,
    cached by grammar), or None for free text. A grammar the engine refuses (a schema keyword llguidance
    does not implement, a malformed schema, one that cannot start) is a FieldError naming
    ``plan.grammar_param``, or ``tools[i].function.parameters`` for the tool whose schema alone is refused
    (each is compiled on its own first: the wrapper's first tokens may never reach it): call this before
    queueing anything. For every route that uses ``plan_chat`` (chat completions, the Responses API)."""
    if plan.grammar is None:
        return None
    if plan.wrapped:
        for i, tool in enumerate(plan.tools):
            param = f"tools[{i}].function.parameters"
            try:
                await engine.constraint(Grammar.json_schema(tool.parameters))
            except InvalidRequest as exc:
                raise FieldError(f"{param} cannot be enforced: {exc}", param) from exc
    try:
        return await engine.constraint(plan.grammar)
    except FieldError:
        raise
    except InvalidRequest as exc:
        param = plan.grammar_param or "response_format"
        raise FieldError(f"{param} cannot be enforced: {exc}", param) from exc


def with_system(messages: list[dict], text: str) -> list[dict]:
    """``text`` appended to the leading system (or developer) message, or a new system message first."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{text}" if first["content"] else text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def content_text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise FieldError(f"{param} must be a string or text parts", param)


def history_calls(message: Mapping, index: int) -> list[tuple[str, str, dict | str]]:
    """(id, name, arguments) of an assistant message's ``tool_calls``, checked. Arguments that are not
    valid JSON (a call this server cut at ``max_tokens``) stay the text they were: history the server
    produced is always accepted back, and rendered as it was written."""
    calls = []
    for j, call in enumerate(message.get("tool_calls") or []):
        where = f"messages[{index}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(call.get("id"), str):
            raise FieldError(f"{where} needs an id and a function", where)
        if not isinstance(function.get("name"), str):
            raise FieldError(f"{where}.function.name must be a string", f"{where}.function.name")
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                calls.append((call["id"], function["name"], function["arguments"]))
                continue
        if not isinstance(arguments, Mapping):
            raise FieldError(f"{where}.function.arguments must be a JSON object", f"{where}.function.arguments")
        calls.append((call["id"], function["name"], dict(arguments)))
    return calls


def calls_json(made: Sequence[tuple[str, str, dict | str]]) -> str:
    """The wrapped reply that made ``made``, as the model writes it; arguments kept as text go in verbatim."""
    def one(name: str, arguments: dict | str) -> str:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {text}}}'
    return '{"tool_calls": [' + ", ".join(one(n, a) for _, n, a in made) + "]}"


def render_history(messages: Sequence[Any], *, native: bool, wrap_text: bool) -> list[dict]:
    """Chat history, tool calls and results included, as messages the chat template accepts.

    ``native``: Hugging Face's tool message shape; otherwise the generic format (plain role/content),
    with assistant text as ``{"response": ...}`` when ``wrap_text`` (what the model writes with tools).
    """
    rendered, calls = [], {}
    for i, message in enumerate(messages):
        message = as_dict(message)
        role = message.get("role")
        content = content_text(message.get("content"), f"messages[{i}].content")
        if role == "assistant" and message.get("tool_calls"):
            made = history_calls(message, i)
            calls.update({call_id: name for call_id, name, _ in made})
            if native:
                shaped = [{"id": c, "type": "function", "function": {"name": n, "arguments": a}} for c, n, a in made]
                rendered.append({"role": "assistant", "content": content, "tool_calls": shaped})
            else:
                reply = calls_json(made)
                rendered.append({"role": "assistant", "content": f"{content}\n{reply}" if content else reply})
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in calls:
                raise FieldError(f"messages[{i}] answers tool call {call_id!r}, which no earlier assistant message made",
                                 f"messages[{i}].tool_call_id")
            if native:
                rendered.append({"role": "tool", "content": content, "tool_call_id": call_id, "name": calls[call_id]})
            else:
                result = {"tool_result": {"tool_call_id": call_id, "name": calls[call_id], "content": content}}
                rendered.append({"role": "user", "content": json.dumps(result, ensure_ascii=False)})
        elif role == "assistant" and wrap_text:
            rendered.append({"role": "assistant", "content": json.dumps({"response": content}, ensure_ascii=False)})
        else:
            rendered.append({"role": role, "content": content})
    return rendered
