"""Anthropic's Messages API wire format as pydantic models: the request bodies and the reply objects.

Fields follow https://docs.anthropic.com/en/api/messages and the ``anthropic`` SDK's
``MessageCreateParams``. A top-level field this server does not know is a 400 naming it; content blocks,
tools and ``tool_choice`` are checked by ``server/messages/convert.py`` (errors name
``messages[i].content[j]...``). Which fields are honoured, which accepted because they ask for nothing
this server has, and which refused: docs/messages.md.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator


def message_id() -> str:
    return "msg_" + secrets.token_hex(12)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Metadata(_Request):
    user_id: str | None = None  # the client's own bookkeeping: accepted, not used


class Thinking(_Request):
    """Extended thinking: the served models do not reason, so every type is honoured as ``disabled``."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = Field(None, ge=0)
    display: str | None = None


class OutputConfig(_Request):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # no reasoning to spend effort on
    format: dict[str, Any] | None = None  # {"type": "json_schema", "schema": ...}: enforced by a grammar


class CacheControl(_Request):
    type: Literal["ephemeral"]
    ttl: str | None = None


class Diagnostics(_Request):
    previous_message_id: str | None = None


class MessageParam(_Request):
    role: Literal["user", "assistant", "system"]  # system: a mid-conversation system turn (Claude Code's beta)
    content: str | list[dict[str, Any]]


class CountTokensRequest(_Request):
    """``POST /v1/messages/count_tokens``: the prompt half of a Messages request."""

    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    output_format: dict[str, Any] | None = None  # the structured-outputs beta's name of output_config.format
    cache_control: CacheControl | None = None  # every prompt is cached per session anyway
    speed: Literal["standard", "fast"] | None = None  # one speed here
    context_management: dict[str, Any] | None = None  # server-side history edits: see convert.context_edits
    mcp_servers: None = None  # this server connects to no MCP servers: only null is accepted


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``."""

    max_tokens: StrictInt = Field(ge=1)
    metadata: Metadata | None = None
    stop_sequences: list[str] | None = None
    stream: StrictBool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=0)
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here
    container: None = None  # no code-execution containers: only null is accepted
    inference_geo: str | None = None  # one place of inference: this server
    diagnostics: Diagnostics | None = None  # no diagnostics object is returned (docs/messages.md)

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty(cls, stops: list[str] | None) -> list[str] | None:
        if stops and any(not s for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return stops


# ----- replies -------------------------------------------------------------------------------------
class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Usage(_Reply):
    input_tokens: int  # prompt tokens fed to the model (not read from the session cache)
    output_tokens: int
    cache_read_input_tokens: int = 0  # prompt tokens reused from the session cache
    cache_creation_input_tokens: int = 0  # no separate cache write: every prompt token joins the session
    service_tier: Literal["standard"] = "standard"


class Message(_Reply):
    id: str = Field(default_factory=message_id)
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]] = Field(default_factory=list)
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None = None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(_Reply):
    input_tokens: int
