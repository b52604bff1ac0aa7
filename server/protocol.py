"""The OpenAI wire format as pydantic models: requests, responses, stream chunks, errors, sessions.

Fields follow the order of the OpenAI API reference (https://platform.openai.com/docs/api-reference/chat,
/completions, /models); the layout copies vLLM's ``entrypoints/openai/protocol.py``: ``Literal`` object
types, ids and timestamps from ``default_factory``, and one method, ``to_sampling_params()`` (shared with
the Responses API in ``server/common.py``), where request fields become ``engine.SamplingParams``.
sinkserve extensions: ``top_k``, ``min_p``,
``repetition_penalty``, ``session_id``, ``pin_system_prompt`` in requests and a ``sinkserve`` object in
responses.

No request field is silently ignored: chat and legacy completion requests (and their messages) refuse
unknown fields (``extra="forbid"``), and every field of OpenAI's ``CompletionCreateParams`` that this
server cannot honour is declared and accepted only unset or with a value that asks for nothing more
(``OFF_FIELDS``: ``modalities: ["text"]``, ``store: false``, ...); anything else is a 400 naming it.
``response_format``, ``tools``, ``tool_choice`` and ``parallel_tool_calls`` are checked and turned into
a prompt and a grammar by ``server/tools.py`` (the route does that, so errors name the field).

Choices made where OpenAI leaves room: message ``content`` may be an empty string for any role
(OpenAI accepts it too), ``null`` only for ``assistant``; content parts must be text; ``n`` must be 1.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from engine import check_session_id
from server.common import SamplingFields, new_id, off_fields, refuse_unless
from server.errors import APIError


def _now() -> int:
    return int(time.time())


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def sse(self, event: str | None = None, **dump) -> dict:
        """This object as one server-sent event: its JSON (``model_dump_json(**dump)``) is the ``data``,
        ``event`` names it (the Responses API does, chat and legacy completions do not)."""
        out = {"data": self.model_dump_json(**dump)}
        if event is not None:
            out["event"] = event
        return out


# ----- requests ------------------------------------------------------------------------------------
class _Request(_Model):
    """A request object: a field this server does not know is a 400 naming it, never ignored."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # no obfuscation padding is sent: only false is accepted

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, value):
        return refuse_unless("stream_options.include_obfuscation", value, (None, False))


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant: the calls it made (checked by server/tools.py)
    tool_call_id: str | None = Field(None, validate_default=True)  # tool: the call this message answers
    refusal: None = None  # an assistant's refusal text is not rendered: only null is accepted
    audio: None = None
    function_call: None = None  # the deprecated function-calling shape: use tool_calls

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any):
        """``[{"type": "text", "text": ...}, ...]`` is joined into one string; other parts are refused."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None:
            if self.role != "assistant":
                raise ValueError(f"a {self.role} message needs content")
            self.content = ""
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, tool_call_id: str | None, info):
        if (tool_call_id is None) == (info.data.get("role") == "tool"):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return tool_call_id

    def to_chat(self) -> dict[str, Any]:
        """The message as ``server/tools.py`` and the chat template read it."""
        return self.model_dump(include={"role", "content", "name", "tool_calls", "tool_call_id"}, exclude_none=True)


class _SamplingRequest(SamplingFields, _Request):
    """Fields shared by chat and legacy completions, and their translation to the engine."""

    model: str | None = None  # None: the served model
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    n: StrictInt = 1
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's range: a 64-bit signed integer
    stop: str | list[str] | None = Field(None, max_length=4)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    # sinkserve extensions
    top_k: StrictInt = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)  # below ~1e-2 logits overflow to inf
    session_id: str | None = None
    pin_system_prompt: StrictBool | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: each request continues one session with one choice")
        return n

    @field_validator("session_id")
    @classmethod
    def _session_id(cls, session_id: str | None) -> str | None:
        return None if session_id is None else check_session_id(session_id)  # InvalidRequest is a ValueError

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None):
        for key, value in (bias or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"keys must be token ids as strings, got {key!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"values must be between -100 and 100, got {value}")
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def requested_options(self) -> dict[str, Any]:
        return {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "logit_bias": {int(k): v for k, v in (self.logit_bias or {}).items()}, "seed": self.seed,
                "stop": (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())}


# OpenAI chat fields this server cannot honour, accepted only with these values (unset, or asking for
# nothing more than what it does); any other value is a 400 naming the field
OFF_FIELDS: dict[str, tuple] = {
    "audio": (None,),
    "function_call": (None,),  # deprecated: tool_choice
    "functions": (None,),  # deprecated: tools
    "metadata": (None, {}),  # chat completions are not stored
    "modalities": (None, ["text"]),
    "moderation": (None,),
    "prediction": (None,),
    "prompt_cache_options": (None,),
    "prompt_cache_retention": (None,),  # sessions live for the server's session TTL
    "reasoning_effort": (None, "none"),  # the served models do not reason
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "verbosity": (None,),
    "web_search_options": (None,),
}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    # checked and honoured by server/tools.py (prompt and grammar), in the route
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    # identifiers that ask for nothing: sessions are found by token prefix among the key's own anyway
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # OFF_FIELDS
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    metadata: Any = None
    modalities: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    store: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    @field_validator("parallel_tool_calls")
    @classmethod
    def _needs_tools(cls, value: bool | None, info):
        if value is not None and not info.data.get("tools"):
            raise ValueError("parallel_tool_calls is only allowed when tools are given (as OpenAI's)")
        return value

    _off = off_fields(OFF_FIELDS)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> tuple[bool, int]:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs",
                           code="invalid_value")
        return self.logprobs, self.top_logprobs or 0


LEGACY_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions when max_tokens is omitted


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[StrictInt]
    best_of: StrictInt | None = Field(None, ge=1, le=1)
    echo: Literal[False] = False
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    suffix: None = None
    # not an OpenAI completions field: declared only to say where it belongs
    response_format: Any = None

    @field_validator("response_format")
    @classmethod
    def _chat_only(cls, value: Any):
        if value is not None:
            raise ValueError("the legacy completions API has no response_format (OpenAI's neither): "
                             "use /v1/chat/completions")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("exactly one prompt per request is supported")
            return prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    def requested_logprobs(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0

    def requested_max_tokens(self) -> int:
        return LEGACY_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens


# ----- responses -----------------------------------------------------------------------------------
class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobs(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Model):
    content: list[TokenLogprobs] | None = None


class PromptTokensDetails(_Model):
    cached_tokens: int = 0


class UsageInfo(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class SinkserveInfo(_Model):
    session_id: str
    evicted_tokens: int
    cached_tokens: int
    pinned_tokens: int  # slots the session never evicts (the sinks, or a pinned system prompt)


class FunctionCall(_Model):
    name: str
    arguments: str  # JSON text


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null when the reply is only tool calls
    refusal: None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Model):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(_Model):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: UsageInfo
    sinkserve: SinkserveInfo


class ChunkChoice(_Model):
    index: int = 0
    delta: dict[str, Any] = Field(default_factory=dict)  # role, content, tool_calls (server/tool_stream.py)
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(_Model):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None


class CompletionLogprobs(_Model):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_Model):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(_Model):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice] = Field(default_factory=list)
    usage: UsageInfo | None = None
    sinkserve: SinkserveInfo | None = None


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "sinkserve"


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionInfo(_Model):
    id: str
    object: Literal["session"] = "session"
    tokens_seen: int
    tokens_in_cache: int
    tokens_evicted: int
    pinned_tokens: int
    cache_bytes: int
    location: str
    created: int
    last_used: int


class SessionList(_Model):
    object: Literal["list"] = "list"
    data: list[SessionInfo]


class SessionDeleted(_Model):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class ErrorDetail(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    error: ErrorDetail


ERROR_STATUSES = (400, 401, 404, 409, 413, 429, 503)
ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": "an OpenAI error object"} for status in ERROR_STATUSES
}
STREAM_RESPONSE: dict[int | str, dict] = {
    200: {"content": {"text/event-stream": {"schema": {  # one server-sent event: a JSON chunk or [DONE]
              "type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}},
          "description": "JSON, or server-sent events when ``stream`` is true"},
}
