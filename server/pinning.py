"""Which prompt tokens a chat request pins in its session's cache: the system prompt, and the tools in it.

A StreamingLLM cache keeps the sinks and a rolling window; everything else scrolls out as a conversation
grows. A system prompt pinned in the cache's pinned region never does (``Engine.render_chat`` measures
it, ``Engine.generate(pin_prefix=...)`` pins it). Without pinning, the tool definitions of an agent (which
``server/tools.py`` renders into the system prompt, or the chat template renders in its header) scroll
away after a few turns, and the model can no longer see the tools it is asked to call.

Policy, for every route that renders a chat (chat completions, the Messages API):

- ``pin_system_prompt`` (the request's, else the server's setting) true: the system prompt is pinned, as
  before; one too large for the cache is refused by the engine (a 400).
- explicitly false: nothing is pinned.
- unset and the request has tools in play: the system prompt carrying them is pinned by default when it
  fits in ``TOOL_PIN_SHARE`` of the cache (sinks plus window); otherwise nothing is pinned and the
  response says so: ``x-sinkserve-pinned-tokens`` (the sinks only) and a ``x-sinkserve-warning`` header
  naming the size of the tool prompt and the limit.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

TOOL_PIN_SHARE = 0.5  # the engine's own ceiling on a pinned prefix: half the cache stays a rolling window
WARNING_HEADER = "x-sinkserve-warning"


@dataclass(frozen=True)
class Rendered:
    """A rendered chat: its prompt tokens, how many of them to pin, and a warning when tools went unpinned."""

    prompt: list[int]
    pin_prefix: int
    warning: str | None = None

    def headers(self) -> dict[str, str]:
        return {WARNING_HEADER: self.warning} if self.warning else {}


def tool_pin_limit(engine) -> int:
    """The most prompt tokens a request's tools may pin by default."""
    return int(engine.config.cache_size * TOOL_PIN_SHARE)


async def render_pinned(engine, messages: list[dict], template_kwargs: dict, *, requested: bool | None,
                        default: bool, has_tools: bool, render=asyncio.to_thread) -> Rendered:
    """Render ``messages`` (``ChatPlan.messages``) off the event loop and decide what to pin (module doc).

    ``requested``: the request's ``pin_system_prompt`` (None when unset); ``default``: the server's;
    ``render``: how the rendering runs (``Serving.tokenize``: in the key's slot and the tokenizer's pool)."""
    explicit = requested if requested is not None else (True if default else None)
    measure = explicit is True or (explicit is None and has_tools)
    prompt, system_len = await render(engine.render_chat, messages, measure, template_kwargs)
    if explicit is not None or not has_tools:
        return Rendered(prompt, system_len if explicit else 0)
    limit = tool_pin_limit(engine)
    if system_len <= limit:
        return Rendered(prompt, system_len)
    warning = (f"tool definitions not pinned: the system prompt carrying them is {system_len} tokens, more than "
               f"{limit} ({TOOL_PIN_SHARE:.0%} of the {engine.config.cache_size}-token cache); they scroll out "
               "of the window as the conversation grows")
    log.info("%s", warning)
    return Rendered(prompt, 0, warning)
