"""What a generation yields: token events, then one finish event; and the handle to consume them.

The engine's worker thread produces events; the asyncio side reads them from a queue. The server
only formats them (OpenAI field names live in ``server/``, not here).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class TokenEvent:
    """Text that became final with this token (may be empty while a stop string or a UTF-8 char is pending)."""

    text: str
    token_id: int
    logprob: TokenLogprob | None = None
    top_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the session's cache
    evicted_tokens: int  # tokens of the session's stream no longer in the cache's window
    pinned_tokens: int = 0  # slots the session never evicts (the sinks, or a pinned system prompt)


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: FinishReason
    usage: Usage
    text: str = ""  # held-back text released at the end
    error: str | None = None


Event = TokenEvent | FinishEvent


@dataclass
class Admission:
    """Known once the engine accepted the request: before any token, so headers can carry it."""

    session_id: str
    prompt_tokens: int
    cached_tokens: int
    evicted_tokens: int  # predicted for the end of the prompt
    pinned_tokens: int = 0  # slots the session never evicts (the sinks, or a pinned system prompt)
    # where the cached tokens came from: "local" (this server's copy), "shared" (loaded from the shared
    # session store of a cluster), "prefill" (none: the prompt is fed from its first token)
    source: str = "prefill"
    replica: str | None = None  # the cluster replica that admitted it (None for a single server)
    created: bool = False  # the session was made for this request (a new one, or a branch of one)


class Generation:
    """Handle on one running request: iterate it for events; ``cancel()`` (or closing it) stops it."""

    def __init__(self, admission: Admission, queue: asyncio.Queue, cancel) -> None:
        self.admission = admission
        self._queue = queue
        self._cancel = cancel
        self.finished: FinishEvent | None = None

    @property
    def session_id(self) -> str:
        return self.admission.session_id

    def cancel(self) -> None:
        if self.finished is None:
            self._cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while self.finished is None:
                event = await self._queue.get()
                if isinstance(event, FinishEvent):
                    self.finished = event
                yield event
        finally:
            self.cancel()
