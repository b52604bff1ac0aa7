"""The OpenAI Responses API wire format as pydantic models: the create request, input items, the
response object, stored input items and the streaming events.

Shapes follow the ``openai`` SDK's types (``openai/types/responses/``: ``response_create_params``,
``response_input_param``, ``response``, ``response_output_message``, ``response_usage``,
``response_*_event``) and the API reference (https://platform.openai.com/docs/api-reference/responses).
Unknown request fields are refused (``extra="forbid"``): a 400 naming the field. Fields OpenAI defines
that sinkserve does not implement are accepted only at their "off" value (``OFF_FIELDS``: ``null``,
``false``, ``[]``), so clients that send them empty keep working; any other value is a 400 naming the
field. Fields that ask for nothing this model has are accepted and do nothing (``reasoning`` of a model
that does not reason, ``include: ["reasoning.encrypted_content"]``, ``client_metadata``, which is
stored). Echoed and stored strings are bounded (``BOUNDS``). ``tools``, ``tool_choice`` and
``text.format`` are checked by the tool machinery (``server/responses/chat.py``, ``server/tools.py``).
Every field's treatment is tabled in docs/responses.md.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from engine import SamplingParams, Usage
from server.common import SamplingFields, check_string_map, new_id, off_fields, surrogate_path
from server.errors import APIError
from server.protocol import SinkserveInfo

# OpenAI-style ids of the Responses API: ``resp_``, ``msg_``, ``fc_`` and 48 hex digits (192 random bits)
item_id = partial(new_id, sep="_", hex_digits=48)

# Bounds of the strings a response echoes and stores (characters; metadata as OpenAI documents it)
BOUNDS = {"user": 256, "prompt_cache_key": 256, "safety_identifier": 128, "instructions": 1 << 20}
METADATA_BOUNDS = (16, 64, 512)  # pairs, key characters, value characters
CLIENT_METADATA_BOUNDS = (32, 64, 4096)  # a client's own bookkeeping (Codex CLI sends ~700-character values)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


ItemStatus = Literal["in_progress", "completed", "incomplete"]


# ----- input items ---------------------------------------------------------------------------------
class InputText(_Strict):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: None = None


class OutputText(_Strict):
    """Assistant text, in the input (replayed history) and in the output."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list, max_length=0)
    logprobs: list[dict[str, Any]] | None = None


class MessageItem(_Strict):
    """``EasyInputMessage``, ``Message`` and a replayed ``ResponseOutputMessage`` in one model."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Annotated[InputText | OutputText, Field(discriminator="type")]]
    id: str | None = None
    status: ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_message(self) -> dict[str, Any]:
        """The chat message the template renders."""
        return {"role": self.role, "content": self.text()}

    def stored(self) -> dict[str, Any]:
        """The item as ``input_items`` lists it (``ResponseInputMessageItem`` / ``ResponseOutputMessage``)."""
        kind = "output_text" if self.role == "assistant" else "input_text"
        if isinstance(self.content, str):
            parts = [{"type": kind, "text": self.content}]
        else:
            parts = [part.model_dump(exclude_none=True) for part in self.content]
        if self.role == "assistant":
            for part in parts:
                part.setdefault("annotations", [])
        return {"id": self.id or item_id("msg"), "type": "message", "role": self.role, "status": "completed",
                "content": parts}


class FunctionCallItem(_Strict):
    """A tool call the model made (``ResponseFunctionToolCall``), replayed in the input."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None
    namespace: str | None = None  # the namespace tool the function belongs to
    caller: dict[str, Any] | None = None
    async_: Literal[False] | None = Field(None, alias="async")

    @field_validator("caller")
    @classmethod
    def _direct(cls, caller: dict[str, Any] | None) -> dict[str, Any] | None:
        if caller not in (None, {"type": "direct"}):
            raise ValueError("only direct calls ({'type': 'direct'}) are supported")
        return caller

    def stored(self) -> dict[str, Any]:
        item = self.model_dump(exclude_none=True, include={"type", "call_id", "name", "namespace", "arguments"})
        return {**item, "id": self.id or item_id("fc"), "status": "completed"}


class FunctionCallOutputItem(_Strict):
    """A tool's result, answering the ``function_call`` with the same ``call_id``; without one (the SDK
    allows it), the earliest unanswered call of the same ``name`` and ``namespace``, or in order."""

    type: Literal["function_call_output"]
    call_id: str | None = None
    output: str | list[InputText]
    id: str | None = None
    status: ItemStatus | None = None
    name: str | None = None
    namespace: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)

    def stored(self) -> dict[str, Any]:
        item = {"type": "function_call_output", "call_id": self.call_id, "output": self.text(),
                "id": self.id or item_id("fco"), "status": "completed", "name": self.name,
                "namespace": self.namespace}
        return {k: v for k, v in item.items() if v is not None}


def _item_type(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type", "message")  # EasyInputMessage may omit its type
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type, custom_error_type="invalid_item",
                  custom_error_message="item type must be message, function_call or function_call_output"),
]
_ITEMS = TypeAdapter(list[InputItem])
_ITEM_TAGS = {"message", "function_call", "function_call_output"}


# ----- the create request --------------------------------------------------------------------------
class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: None = None  # OpenAI's verbosity hint has no meaning for a plain model: refused if set


# Fields of OpenAI's request that sinkserve accepts only when off (see the module docstring).
OFF_FIELDS: dict[str, tuple] = {
    "background": (None, False),
    "conversation": (None,),
    "context_management": (None, []),
    "max_tool_calls": (None,),
    "prompt": (None,),
    "prompt_cache_options": (None,),
    "prompt_cache_retention": (None,),
    "service_tier": (None, "auto", "default"),
    "stream_options": (None,),
    "moderation": (None,),
    "image": (None,),
    "access_programs": (None,),
    "background_options": (None,),
}


# ``include`` values: honoured, or asking for what this model never produces (accepted, yield nothing);
# any other value (outputs of tools this server does not run) is a 400 naming it
INCLUDE_HONOURED = ("message.output_text.logprobs",)
INCLUDE_NOTHING = ("reasoning.encrypted_content",)  # the served model does not reason


class ReasoningConfig(_Strict):
    """OpenAI's ``reasoning``: accepted, and means no reasoning, for a model that does not reason."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None
    context: Literal["auto", "current_turn", "all_turns"] | None = None
    mode: str | None = None


class ResponseCreateRequest(SamplingFields, _Strict):
    model: str | None = None  # None: the served model
    input: str | list[InputItem]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: StrictBool = True
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: StrictBool = False
    text: TextConfig | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] = "auto"
    parallel_tool_calls: StrictBool = True
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    user: str | None = None
    safety_identifier: str | None = None
    # Codex CLI sends one per conversation; sessions are already found by token prefix within the API
    # key's scope, so the key is echoed but needs no other effect (docs/responses.md).
    prompt_cache_key: str | None = None
    include: list[str] | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    reasoning: ReasoningConfig | None = None  # accepted as no reasoning: the served model does not reason
    client_metadata: dict[str, str] | None = None  # the client's bookkeeping: stored with the response
    # accepted only when off: OFF_FIELDS
    background: Any = None
    conversation: Any = None
    context_management: Any = None
    max_tool_calls: Any = None
    prompt: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    service_tier: Any = None
    stream_options: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    background_options: Any = None

    _off = off_fields(OFF_FIELDS)

    @field_validator(*BOUNDS)
    @classmethod
    def _bounded(cls, value: str | None, info) -> str | None:
        if value is not None and len(value) > BOUNDS[info.field_name]:
            raise ValueError(f"{info.field_name} is {len(value)} characters; the limit is {BOUNDS[info.field_name]}")
        return value

    @field_validator("include")
    @classmethod
    def _include(cls, include: list[str] | None) -> list[str] | None:
        for value in include or ():
            if value not in INCLUDE_HONOURED + INCLUDE_NOTHING:
                raise ValueError(f"include value {value!r} is not available from this server (it asks for the "
                                 "output of a tool this server does not run); accepted: "
                                 + ", ".join(INCLUDE_HONOURED + INCLUDE_NOTHING))
        return include

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        """Lone surrogates (``"\\ud800"``) are refused before anything tokenizes, stores or echoes them."""
        where = surrogate_path(data)
        if where:
            raise APIError(400, f"invalid value for {where}: a lone UTF-16 surrogate is not text", param=where,
                           code="invalid_value")
        return data

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        """Item errors name the item's field (``input.2.role``), not pydantic's union branches."""
        if isinstance(value, str) or not isinstance(value, list):
            return value
        if not value:
            raise ValueError("input must not be empty")
        try:
            return _ITEMS.validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"] if p not in _ITEM_TAGS and "[" not in str(p))
            raise ValueError(f"input.{loc}: {first['msg']}") from None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        return check_string_map(metadata, *METADATA_BOUNDS)

    @field_validator("client_metadata")
    @classmethod
    def _client_metadata(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        return check_string_map(metadata, *CLIENT_METADATA_BOUNDS)

    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)

    # what the shared serving path (server/generation.py) reads of every request
    session_id: ClassVar[None] = None  # a chain names its session through previous_response_id
    include_usage: ClassVar[bool] = False

    max_tokens_param: ClassVar[str] = "max_output_tokens"

    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ())

    def requested_logprobs(self) -> tuple[bool, int]:
        """Logprobs of the output text, when ``include`` asks for them (``top_logprobs`` alternatives)."""
        if self.top_logprobs and not self.wants_logprobs():
            raise APIError(400, "top_logprobs requires include to have 'message.output_text.logprobs'",
                           param="top_logprobs", code="invalid_value")
        return self.wants_logprobs(), self.top_logprobs or 0


# ----- the response object -------------------------------------------------------------------------
class OutputMessage(_Out):
    id: str = Field(default_factory=lambda: item_id("msg"))
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "completed"
    content: list[OutputText] = Field(default_factory=list)


class OutputFunctionCall(_Out):
    id: str = Field(default_factory=lambda: item_id("fc"))
    type: Literal["function_call"] = "function_call"
    status: ItemStatus = "completed"
    call_id: str
    name: str
    namespace: str | None = None  # set when the function belongs to a namespace tool
    arguments: str


class InputTokensDetails(_Out):
    cached_tokens: int  # served from the session's cache
    cache_write_tokens: int  # prefilled into the session's cache by this response


class OutputTokensDetails(_Out):
    reasoning_tokens: int = 0


class ResponseUsage(_Out):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> ResponseUsage:
        """The engine's count of one generation, in the Responses API's shape."""
        return cls(input_tokens=usage.prompt_tokens,
                   input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens,
                                                           cache_write_tokens=usage.prompt_tokens - usage.cached_tokens),
                   output_tokens=usage.completion_tokens, total_tokens=usage.prompt_tokens + usage.completion_tokens)


class IncompleteDetails(_Out):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(_Out):
    code: Literal["server_error", "rate_limit_exceeded", "invalid_prompt"] = "server_error"
    message: str


class ResponseObject(_Out):
    id: str = Field(default_factory=lambda: item_id("resp"))
    object: Literal["response"] = "response"
    created_at: float = Field(default_factory=lambda: float(int(time.time())))
    status: Literal["completed", "failed", "in_progress", "cancelled", "incomplete"] = "in_progress"
    background: bool = False
    completed_at: float | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage | OutputFunctionCall] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    prompt_cache_key: str | None = None
    reasoning: dict[str, Any] | None = None
    safety_identifier: str | None = None
    service_tier: Literal["default"] = "default"
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    sinkserve: SinkserveInfo | None = None  # sinkserve's extension, as in chat completions

    @classmethod
    def for_request(cls, body: ResponseCreateRequest, model: str, params: SamplingParams) -> ResponseObject:
        """The response as created: its echo of the request's settings, no output yet."""
        text = body.text.model_dump(by_alias=True, exclude_none=True) if body.text else {}
        return cls(
            model=model, instructions=body.instructions, max_output_tokens=body.max_output_tokens,
            parallel_tool_calls=body.parallel_tool_calls, previous_response_id=body.previous_response_id,
            prompt_cache_key=body.prompt_cache_key, safety_identifier=body.safety_identifier, store=body.store,
            temperature=params.temperature, top_p=params.top_p,
            text={"format": {"type": "text"}, **text}, tool_choice=body.tool_choice, tools=body.tools,
            truncation=body.truncation, user=body.user, metadata=body.metadata or {},
        )


class ResponseDeleted(_Out):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class InputItemList(_Out):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
