"""Pieces every OpenAI request model shares: object ids, fields accepted only when they ask for nothing,
bounded string maps, and the one translation of request fields into ``engine.SamplingParams``.

Chat and legacy completions (``server/protocol.py``) and the Responses API (``server/responses/protocol.py``)
spell their fields differently (``max_tokens`` / ``max_output_tokens``) but build the engine's
parameters here, with the same rule: the served model's sampling defaults fill only what the request
left out, and an explicit value wins.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import field_validator

from engine import SAMPLING_DEFAULT_FIELDS, SamplingParams
from server.errors import APIError

SURROGATE = re.compile("[\ud800-\udfff]")  # what JSON escapes such as \\ud800 decode to: not text


def surrogate_path(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string in a request body (a key or a value) holding a lone UTF-16
    surrogate, which no tokenizer or UTF-8 reply can carry; None when there is none."""
    if isinstance(value, str):
        return (path or "body") if SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(key, str) and SURROGATE.search(key):
            return where
        found = surrogate_path(item, where)
        if found:
            return found
    return None


def new_id(prefix: str, sep: str = "-", hex_digits: int = 24) -> str:
    """An OpenAI-style object id: ``chatcmpl-`` and 24 hex digits, or (Responses) ``resp_`` and 48."""
    return f"{prefix}{sep}{secrets.token_hex(hex_digits // 2)}"


def refuse_unless(name: str, value: Any, allowed: tuple) -> Any:
    """``value`` when it asks for nothing this server cannot do (one of ``allowed``); else a ValueError
    (a 400 naming the field)."""
    if value not in allowed:
        shown = ", ".join("null" if a is None else repr(a) for a in allowed)
        raise ValueError(f"{name} is not supported by this server (accepted: {shown})")
    return value


def off_fields(fields: Mapping[str, tuple]) -> Any:
    """The pydantic validator of a request's ``OFF_FIELDS``: each accepted only at one of its values."""

    def check(cls, value: Any, info) -> Any:
        return refuse_unless(info.field_name, value, fields[info.field_name])

    return field_validator(*fields)(check)


def check_string_map(value: Mapping[str, str] | None, pairs: int, key_chars: int,
                     value_chars: int) -> Mapping[str, str] | None:
    """A client's bookkeeping map (``metadata``) within its documented bounds, else a ValueError."""
    if value is None:
        return None
    if len(value) > pairs:
        raise ValueError(f"at most {pairs} key-value pairs")
    for key, item in value.items():
        if len(key) > key_chars or len(item) > value_chars:
            raise ValueError(f"keys are at most {key_chars} characters, values at most {value_chars}")
    return value


class SamplingFields:
    """``to_sampling_params`` for a request model. Subclasses name their length field
    (``max_tokens_param``) and may override the ``requested_*`` hooks; fields of SamplingParams the
    request model does not declare keep the engine's defaults."""

    max_tokens_param: ClassVar[str] = "max_tokens"

    def requested_max_tokens(self) -> int | None:
        return getattr(self, self.max_tokens_param, None)

    def requested_logprobs(self) -> tuple[bool, int]:
        return False, 0

    def requested_options(self) -> dict[str, Any]:
        """Further SamplingParams fields the request sets (penalties, bias, seed, stop)."""
        return {}

    def requested_sampling(self, defaults: Mapping[str, float] | None) -> dict[str, Any]:
        """The SAMPLING_DEFAULT_FIELDS: the request's value when it sent one, else the served model's."""
        sent = self.model_fields_set  # type: ignore[attr-defined]
        sampling = {name: getattr(self, name) for name in SAMPLING_DEFAULT_FIELDS
                    if getattr(self, name, None) is not None}
        for name, value in (defaults or {}).items():
            if name not in sent or name not in sampling:
                sampling[name] = int(value) if name == "top_k" else value
        return sampling

    def to_sampling_params(self, default_max_tokens: int, max_tokens_cap: int,
                           defaults: Mapping[str, float] | None = None) -> SamplingParams:
        """The engine's parameters; ``defaults`` (the served model's or the operator's sampling defaults)
        fill only the fields this request did not send."""
        max_tokens = self.requested_max_tokens()
        if max_tokens is not None and max_tokens > max_tokens_cap:
            raise APIError(400, f"{self.max_tokens_param} is {max_tokens}, this server allows at most "
                           f"{max_tokens_cap}", param=self.max_tokens_param, code="invalid_value")
        logprobs, top_logprobs = self.requested_logprobs()
        try:
            return SamplingParams(max_tokens=min(max_tokens or default_max_tokens, max_tokens_cap),
                                  **self.requested_sampling(defaults), **self.requested_options(),
                                  logprobs=logprobs, top_logprobs=top_logprobs)
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from exc
