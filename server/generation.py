"""The one serving path of every generation route: check -> parameters -> start -> stream or collect.

Like vLLM's ``OpenAIServing`` (``vllm/entrypoints/openai/serving_engine.py``): a route (chat completions,
legacy completions, Responses) turns its body into prompt tokens and hands them, with a
:class:`Formatter` of its own, to :meth:`Serving.generate`. That method checks the model and the prompt,
builds ``engine.SamplingParams`` (the served model's sampling defaults fill omitted fields), takes the
key's concurrency slot, waits for the engine to admit the request, and then either streams server-sent
events (the formatter's chunks, with any ``event:`` names it chooses) or collects the whole reply for the
formatter's JSON body. The shared path owns what every route needs: the session headers, token timing,
the disconnect watch, graceful shutdown (:class:`StreamShutdown`), error events and releasing the slot
and the generation whatever happens. Protocol models serialize themselves (``server.protocol``).

Costly work comes after the cheap checks and inside the key's slot: a route renders and tokenizes its
prompt with :meth:`Serving.tokenize`, which takes the key's concurrency slot first and runs in the
tokenizer's own thread pool (``server.limits.TOKENIZER_POOL``); the slot is then handed to the
generation, or released when the request fails before one starts (:func:`get_serving`'s cleanup). A
generation that fails in the engine on a session it created itself (a stateless request's new session or
branch) deletes that session, so no failure leaves an unwritten session behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Header, Request, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from engine import (
    Engine,
    EngineError,
    FinishEvent,
    Generation,
    InvalidRequest,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from server.deps import ApiKeyDep, EngineDep, LimiterDep, MetricsDep, SettingsDep
from server.errors import APIError, from_engine_error
from server.limits import KeyLimiter, Slot, in_tokenizer_pool
from server.metrics import Metrics, TokenTimer
from server.protocol import (
    ErrorResponse,
    PromptTokensDetails,
    SinkserveInfo,
    TokenLogprobs,
    TopLogprob,
    UsageInfo,
)
from server.protocol import _SamplingRequest as SamplingRequest
from server.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

PING_SECONDS = 5  # SSE comment lines keep proxies from closing the connection during a long prefill
SHUTDOWN_MARGIN_S = 1.5  # streams still running this long before uvicorn's deadline are ended cleanly
PROMPT_ERRORS = ("prompt token ids", "the prompt")  # how Engine.generate's refusals of a prompt begin
DONE = {"data": "[DONE]"}  # the end of an OpenAI chat or legacy completion stream


def check_model(model: str | None, engine: Engine) -> str:
    if model is not None and model != engine.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {engine.model_name!r}",
                       param="model", code="model_not_found")
    return engine.model_name


def check_prompt_length(prompt: list[int], settings: Settings, param: str = "messages") -> None:
    if len(prompt) > settings.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(prompt)} tokens, this server allows {settings.max_prompt_tokens} "
                       "(max_prompt_tokens)", param=param, code="context_length_exceeded")


def fingerprint(engine: Engine) -> str:
    """Changes whenever the model or the cache geometry (which shapes outputs) changes."""
    c = engine.config
    key = f"{engine.model_name}|{c.dtype}|{c.sink_tokens}|{c.window}|{c.evict_block}"
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]


@dataclass
class Run:
    """One admitted request, as its formatter sees it."""

    model: str
    fingerprint: str
    params: SamplingParams
    gen: Generation
    include_usage: bool = False
    on_failure: Callable[[], Awaitable[None]] | None = None  # called once when the engine ends it with an error

    @property
    def session_id(self) -> str:
        return self.gen.session_id


@dataclass
class Collected:
    """A non-streamed reply: its text, its token events, its finish."""

    text: str
    tokens: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None


class Formatter:
    """A route's response shapes. The shared path calls ``start`` once, ``token`` per token event,
    ``finish`` (or ``error``) once, then ``done`` when streaming, and ``response`` when not; each hook
    returns the SSE events (dicts with ``data`` and optionally ``event``) to send. A formatter serves
    one request, so it may keep state (held-back logprobs, text offsets)."""

    def start(self, run: Run) -> Iterable[dict]:
        return ()

    def token(self, run: Run, event: TokenEvent) -> Iterable[dict]:
        raise NotImplementedError

    def finish(self, run: Run, finish: FinishEvent, reason: str) -> Iterable[dict]:
        raise NotImplementedError

    def error(self, run: Run, error: APIError) -> Iterable[dict]:
        """A failure after the stream began: OpenAI's error object as a data event."""
        yield ErrorResponse.model_validate(error.body()).sse()

    def done(self, run: Run) -> Iterable[dict]:
        yield DONE

    async def settle(self, run: Run) -> None:
        """Once a reply is complete, before its last events (``done``) or its body go out: the Responses
        route stores the response here, so a client that saw it finish can chain from it at once."""

    def response(self, run: Run, collected: Collected) -> BaseModel:
        raise NotImplementedError


class StreamShutdown:
    """Graceful shutdown for one SSE stream.

    On SIGTERM sse-starlette sets ``event`` (its watcher polls every 0.5 s) and, by default, cancels the
    stream at once: a cut connection. Instead the stream may keep generating for the grace period
    (``timeout_graceful_shutdown`` less a margin); a generation still running then is cancelled in the
    engine, and its ``cancelled`` finish is sent as a normal ``length`` finish followed by the stream's
    end, before uvicorn's own deadline would cut the connection.
    """

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.event = anyio.Event()
        self.timeout = timeout_s
        self.grace = max(0.0, self.timeout - SHUTDOWN_MARGIN_S)

    async def _cancel_after_grace(self, gen: Generation) -> None:
        await self.event.wait()
        await asyncio.sleep(self.grace)
        log.info("shutdown grace period over; ending the stream of session %s", gen.session_id)
        gen.cancel()

    def watch(self, gen: Generation) -> asyncio.Task:
        return asyncio.create_task(self._cancel_after_grace(gen))

    def finish_reason(self, finish: FinishEvent) -> str:
        """``length`` for a generation cut short by the shutdown; otherwise the engine's reason."""
        if finish.finish_reason == "cancelled" and self.event.is_set():
            return "length"
        return finish.finish_reason


def finish_error(finish: FinishEvent) -> APIError:
    """What a cancelled or failed generation reports."""
    if finish.finish_reason == "cancelled":
        return APIError(503, "the generation was cancelled (the server is shutting down)", code="cancelled")
    log.error("generation failed: %s", finish.error)
    return APIError(500, f"generation failed: {finish.error}", type="server_error", code="generation_failed")


async def stream_events(run: Run, slot: Slot, formatter: Formatter, timer: TokenTimer,
                        shutdown: StreamShutdown | None = None) -> AsyncIterator[dict]:
    """A streamed reply's SSE events: the formatter's, then its ``done``; an unexpected failure becomes an
    error event. The shutdown watcher, the generation and the concurrency slot are released whatever
    happens (the client leaving closes this generator)."""
    shutdown = shutdown or StreamShutdown()
    watcher = shutdown.watch(run.gen)
    try:
        for out in formatter.start(run):
            yield out
        async for event in run.gen:
            if isinstance(event, TokenEvent):
                timer.token()
                for out in formatter.token(run, event):
                    yield out
                continue
            reason = shutdown.finish_reason(event)
            if reason == "error" and run.on_failure is not None:
                await run.on_failure()
            chunks = formatter.error(run, finish_error(event)) if reason in ("cancelled", "error") \
                else formatter.finish(run, event, reason)
            for out in chunks:
                yield out
        await formatter.settle(run)
        for out in formatter.done(run):
            yield out
    except Exception:
        log.exception("stream failed")
        for out in formatter.error(run, APIError(500, "internal server error", type="server_error")):
            yield out
        for out in formatter.done(run):
            yield out
    finally:
        watcher.cancel()
        run.gen.cancel()
        slot.release()


def sse_response(events: AsyncIterator[dict], gen: Generation, shutdown: StreamShutdown) -> EventSourceResponse:
    """The streaming HTTP response (sse-starlette): session headers, keep-alive pings, and the shutdown
    event and grace period that let ``shutdown`` end the stream cleanly."""
    return EventSourceResponse(events, ping=PING_SECONDS, sep="\n", headers=session_headers(gen),
                               shutdown_event=shutdown.event, shutdown_grace_period=shutdown.timeout)


async def cancel_on_disconnect(request: Request, gen: Generation) -> None:
    """Non-streaming requests: the body is read, so the next ASGI message is the client leaving."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    log.info("client left; cancelling session %s", gen.session_id)
    gen.cancel()


async def collect(gen: Generation, slot: Slot, timer: TokenTimer, request: Request,
                  on_failure: Callable[[], Awaitable[None]] | None = None) -> Collected:
    """Run a generation to its end (non-streaming); cancelled and failed ones become HTTP errors
    (``on_failure`` is awaited first for a failed one).

    The request's concurrency slot and the generation are released whatever happens.
    """
    parts: list[str] = []
    tokens: list[TokenEvent] = []
    finish = None
    watcher = asyncio.create_task(cancel_on_disconnect(request, gen))
    try:
        async for event in gen:
            if isinstance(event, TokenEvent):
                timer.token()
                tokens.append(event)
                parts.append(event.text)
            else:
                finish = event
    finally:
        watcher.cancel()
        slot.release()
        gen.cancel()
    assert finish is not None
    if finish.finish_reason == "error" and on_failure is not None:
        await on_failure()
    if finish.finish_reason in ("cancelled", "error"):
        raise finish_error(finish)
    parts.append(finish.text)
    return Collected("".join(parts), tokens, finish)


def session_headers(gen: Generation, finish: FinishEvent | None = None) -> dict[str, str]:
    """The session's id, its evicted and its pinned tokens (at admission, or at the finish when known); on a
    cluster replica also its name and where the session's cache came from (local, shared or prefill)."""
    counts = finish.usage if finish is not None else gen.admission
    headers = {"x-session-id": gen.session_id, "x-sinkserve-evicted-tokens": str(counts.evicted_tokens),
               "x-sinkserve-pinned-tokens": str(counts.pinned_tokens)}
    if gen.admission.replica is not None:
        headers["x-sinkserve-replica"] = gen.admission.replica
        headers["x-sinkserve-session-source"] = gen.admission.source
    return headers


class Serving:
    """One request's path through the server, shared by every generation route (a FastAPI dependency)."""

    def __init__(self, request: Request, engine: Engine, settings: Settings, limiter: KeyLimiter,
                 metrics: Metrics, api_key: str | None, header_session_id: str | None = None) -> None:
        self.request, self.engine, self.settings = request, engine, settings
        self.limiter, self.metrics, self.api_key = limiter, metrics, api_key
        self.header_session_id = header_session_id
        self._slot: Slot | None = None  # taken by tokenize(), handed to the generation by start()

    # ----- the key's slot and the costly work done in it ---------------------------------------------
    def hold_slot(self) -> Slot:
        """The key's concurrency slot for this request, taken now unless already held (429 when full)."""
        if self._slot is None or self._slot.released:
            self._slot = self.limiter.acquire(self.api_key)
        return self._slot

    async def tokenize(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (rendering or tokenizing a prompt) in the tokenizer's pool, inside the key's slot."""
        self.hold_slot()
        return await in_tokenizer_pool(fn, *args)

    def release_unused(self) -> None:
        """Give back a slot no generation took (the request failed before one started)."""
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def _forget_on_failure(self, gen: Generation, named: bool) -> Callable[[], Awaitable[None]] | None:
        """For a stateless request: deleting its session on failure when this request created it (a new
        session, or a branch of one: ``Admission.created``); a session the client names is left alone."""
        if named or not gen.admission.created:
            return None

        async def forget() -> None:
            try:
                await self.engine.delete_session(self.api_key, gen.session_id)
                log.info("deleted session %s: the request that created it failed", gen.session_id)
            except EngineError as exc:
                log.info("could not delete the failed session %s: %s", gen.session_id, exc)
        return forget

    # ----- check and parameters -----------------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        return check_model(model, self.engine)

    def parameters(self, body: SamplingRequest) -> SamplingParams:
        """The request's sampling parameters; the served model's defaults fill the fields it omitted."""
        return body.to_sampling_params(self.settings.default_max_tokens, self.settings.max_tokens_cap,
                                       self.engine.loaded.sampling_defaults)

    def check_prompt_length(self, prompt: list[int], param: str) -> None:
        check_prompt_length(prompt, self.settings, param)

    # ----- start, then stream or collect ----------------------------------------------------------------
    async def start(self, prompt: list[int], params: SamplingParams, session_id: str | None, pin_prefix: int,
                    prompt_param: str = "messages", **options) -> tuple[Generation, Slot]:
        """Take a concurrency slot for the key, then wait for the engine to admit the request.
        ``options``: further ``Engine.generate`` keywords (``fork``, ``constraint``), passed when given.
        The engine range-checks the prompt; its refusal names ``prompt_param``. A slot taken by
        :meth:`tokenize` is the one used."""
        slot = self.hold_slot()
        self._slot = None  # the generation's from here: released by whoever ends it
        try:
            gen = await self.engine.generate(prompt, params, api_key=self.api_key, session_id=session_id,
                                             pin_prefix=pin_prefix, **options)
        except InvalidRequest as exc:
            slot.release()
            error = from_engine_error(exc)
            if str(exc).startswith(PROMPT_ERRORS):
                error.param = prompt_param
            raise error from exc
        except BaseException:
            slot.release()
            raise
        return gen, slot

    async def generate(self, body: SamplingRequest, prompt: list[int], formatter: Formatter, *,
                       endpoint: str, params: SamplingParams | None = None, pin_prefix: int = 0,
                       prompt_param: str = "messages", session_id: str | None = None, **options) -> Response:
        """Check, start and answer one generation request with ``formatter``'s shapes.

        ``body`` needs ``model`` and ``stream`` (and ``to_sampling_params`` unless ``params`` is given);
        ``session_id`` and ``include_usage`` are read when it has them. ``params``: already built with
        :meth:`parameters` (a route that needed them to build the prompt); ``session_id``: the session the
        request names, else the body's or the ``X-Session-Id`` header's.
        """
        model = self.check_model(body.model)
        params = params or self.parameters(body)
        self.check_prompt_length(prompt, prompt_param)
        session_id = session_id or getattr(body, "session_id", None) or self.header_session_id
        options = {name: value for name, value in options.items() if value is not None}
        gen, slot = await self.start(prompt, params, session_id, pin_prefix, prompt_param, **options)
        on_failure = self._forget_on_failure(gen, session_id is not None)
        run = Run(model, fingerprint(self.engine), params, gen, include_usage=getattr(body, "include_usage", False),
                  on_failure=on_failure)
        timer = TokenTimer(self.metrics, endpoint)
        if body.stream:
            shutdown = StreamShutdown(self.settings.timeout_graceful_shutdown)
            return sse_response(stream_events(run, slot, formatter, timer, shutdown), gen, shutdown)
        collected = await collect(gen, slot, timer, self.request, on_failure)
        reply = formatter.response(run, collected)
        await formatter.settle(run)
        return Response(reply.model_dump_json(), media_type="application/json",
                        headers=session_headers(gen, collected.finish))


async def get_serving(request: Request, engine: EngineDep, settings: SettingsDep, limiter: LimiterDep,
                      metrics: MetricsDep, api_key: ApiKeyDep,
                      x_session_id: Annotated[str | None, Header()] = None) -> AsyncIterator[Serving]:
    """The request's :class:`Serving`; afterwards a slot no generation took is given back."""
    serving = Serving(request, engine, settings, limiter, metrics, api_key, x_session_id)
    try:
        yield serving
    finally:
        serving.release_unused()


ServingDep = Annotated[Serving, Depends(get_serving)]


# ----- OpenAI objects the routes share -----------------------------------------------------------------
def usage_info(finish: FinishEvent) -> UsageInfo:
    u = finish.usage
    return UsageInfo(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
    )


def sinkserve_info(run: Run, finish: FinishEvent) -> SinkserveInfo:
    return SinkserveInfo(session_id=run.session_id, evicted_tokens=finish.usage.evicted_tokens,
                         cached_tokens=finish.usage.cached_tokens, pinned_tokens=finish.usage.pinned_tokens)


def _top(lp: TokenLogprob) -> TopLogprob:
    return TopLogprob(token=lp.token, logprob=lp.logprob, bytes=lp.bytes)


def chat_logprobs(event: TokenEvent) -> TokenLogprobs | None:
    if event.logprob is None:
        return None
    lp = event.logprob
    return TokenLogprobs(token=lp.token, logprob=lp.logprob, bytes=lp.bytes,
                         top_logprobs=[_top(t) for t in event.top_logprobs])
