"""Structured outputs: OpenAI's ``response_format`` as an engine ``Grammar``, and the field error both it
and the tools (server/tools.py) raise.

``response_format`` (https://platform.openai.com/docs/api-reference/chat/create#chat-create-response_format):
``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any JSON object) and
``{"type": "json_schema", "json_schema": {"name", "description", "schema", "strict"}}``. The schema is
always enforced by the grammar, ``strict`` or not (``strict: false`` cannot loosen decoding; it only
tells OpenAI to skip its own subset checks); a schema the grammar engine cannot implement is refused,
never ignored. A ``json_schema`` without ``schema`` means any JSON object, as with ``json_object``.

Room to finish: a reply cut by ``max_tokens`` inside a string is invalid JSON, so when the route knows the
request's ``max_tokens``, :func:`bound_strings` gives every string schema without its own bound
(``maxLength``, ``enum``, ``const``, ``pattern``, ``format``) a ``maxLength`` that leaves room to close the
object: the tokens left after the property names, shared among the strings one reply can contain (the
largest ``anyOf``/``oneOf`` branch counts), at about one token per character at worst, and never below
``MIN_STRING_BOUND``. Arrays without ``maxItems``, values of any type (``{}``) and ``json_object`` are not
bounded: a reply can still run out of tokens there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from engine import Grammar, InvalidRequest

MAX_SCHEMA_CHARS = 32_768  # one response_format schema or one tool's parameters, as compact JSON
# An integer without bounds is held to 16 digits (JavaScript's safe integers are 2**53, ~9.007e15): the
# embedded 135M model, greedy, otherwise writes "population": 1111... until max_tokens. A schema's own
# minimum / maximum (exclusive or not) always wins.
INTEGER_BOUND = 10**16 - 1
NOT_SCHEMAS = ("enum", "const", "default", "examples", "description", "title")  # values, not subschemas
MIN_STRING_BOUND = 16  # the shortest maxLength bound_strings gives; below it strings are too short to use
STRING_BOUNDS = ("maxLength", "enum", "const", "pattern", "format")  # a string schema with one is left alone
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for schema and function names


class FieldError(InvalidRequest):
    """A bad request field; ``param`` names it (``response_format.json_schema.schema``, ``tools[0]...``)."""

    code = "invalid_value"

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def as_dict(value: Any) -> Any:
    """Pydantic models (the server's request models) as plain JSON-like values; dicts stay as they are."""
    dump = getattr(value, "model_dump", None)
    return dump(exclude_none=True) if callable(dump) else value


def check_schema(schema: Any, param: str) -> dict:
    """A JSON Schema object of bounded size, or FieldError naming ``param``."""
    if not isinstance(schema, Mapping):
        raise FieldError(f"{param} must be a JSON Schema object, not {type(schema).__name__}", param)
    try:
        size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise FieldError(f"{param} is not valid JSON: {exc}", param) from exc
    if size > MAX_SCHEMA_CHARS:
        raise FieldError(f"{param} is {size} characters as compact JSON; the limit is {MAX_SCHEMA_CHARS}", param)
    return bound_integers(schema)


def bound_integers(node: Any) -> Any:
    """A copy of a JSON Schema in which every ``integer`` type without a lower (upper) bound gets
    ``minimum: -INTEGER_BOUND`` (``maximum: INTEGER_BOUND``); values (``enum``, ``const``...) are kept as
    they are."""
    if isinstance(node, list):
        return [bound_integers(item) for item in node]
    if not isinstance(node, Mapping):
        return node
    out = {key: value if key in NOT_SCHEMAS else bound_integers(value) for key, value in node.items()}
    kinds = out.get("type")
    if kinds == "integer" or isinstance(kinds, list) and "integer" in kinds:
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -INTEGER_BOUND
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = INTEGER_BOUND
    return out


def _unbounded_string(node: Mapping) -> bool:
    kinds = node.get("type")
    is_string = kinds == "string" or isinstance(kinds, list) and "string" in kinds
    return is_string and not any(key in node for key in STRING_BOUNDS)


def string_load(node: Any) -> tuple[int, int]:
    """(unbounded strings one value of ``node`` may hold, characters of its property names and punctuation)."""
    if isinstance(node, list):
        return max((string_load(item) for item in node), default=(0, 0))
    if not isinstance(node, Mapping):
        return 0, 0
    strings = 1 if _unbounded_string(node) else 0
    chars = 2 * strings  # the string's quotes
    for key, value in node.items():
        if key in NOT_SCHEMAS or key in ("$defs", "definitions"):
            continue
        if key == "properties" and isinstance(value, Mapping):
            for name, sub in value.items():
                n, c = string_load(sub)
                strings, chars = strings + n, chars + c + len(name) + 6  # '"name": ' and ', '
        elif key in ("anyOf", "oneOf"):  # one branch is written
            n, c = string_load(value)
            strings, chars = strings + n, chars + c
        elif isinstance(value, Mapping | list):
            for sub in (value if isinstance(value, list) else [value]):
                n, c = string_load(sub)
                strings, chars = strings + n, chars + c
    return strings, chars + 2


def bound_strings(schema: Any, max_tokens: int | None) -> Any:
    """A copy of ``schema`` whose unbounded strings get a ``maxLength`` leaving room to close the reply
    within ``max_tokens`` (the module docstring); ``schema`` itself when there is nothing to bound."""
    if not max_tokens:
        return schema
    strings, chars = string_load(schema)
    if not strings:
        return schema
    limit = max(MIN_STRING_BOUND, (max_tokens - min(max_tokens // 2, chars)) // strings)
    return _with_max_length(schema, limit)


def _with_max_length(node: Any, limit: int) -> Any:
    if isinstance(node, list):
        return [_with_max_length(item, limit) for item in node]
    if not isinstance(node, Mapping):
        return node
    out = {key: value if key in NOT_SCHEMAS else _with_max_length(value, limit) for key, value in node.items()}
    if _unbounded_string(out):
        minimum = out.get("minLength")
        out["maxLength"] = max(limit, minimum) if isinstance(minimum, int) and not isinstance(minimum, bool) else limit
    return out


def response_format_grammar(response_format: Any, max_tokens: int | None = None) -> Grammar | None:
    """The grammar ``response_format`` asks for; None for plain text (or no response_format).
    ``max_tokens``: the reply's budget, which bounds its strings (:func:`bound_strings`)."""
    response_format = as_dict(response_format)
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise FieldError("response_format must be an object", "response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind != "json_schema":
        raise FieldError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}", "response_format.type"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise FieldError("response_format.json_schema must be an object with name and schema",
                         "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise FieldError("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'",
                         "response_format.json_schema.name")
    if spec.get("strict") is not None and not isinstance(spec.get("strict"), bool):
        raise FieldError("response_format.json_schema.strict must be a boolean", "response_format.json_schema.strict")
    if spec.get("schema") is None:
        return Grammar.json_object()
    schema = check_schema(spec["schema"], "response_format.json_schema.schema")
    return Grammar.json_schema(bound_strings(schema, max_tokens))


def response_format_schema(response_format: Any) -> dict | None:
    """The JSON schema a reply must follow (``{"type": "object"}`` for json_object); None for text."""
    grammar = response_format_grammar(response_format)
    if grammar is None:
        return None
    return {"type": "object"} if grammar.kind == "json_object" else json.loads(grammar.source)
