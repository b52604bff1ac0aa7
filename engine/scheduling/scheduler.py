"""The scheduler: one worker thread that turns queued requests into batched forward passes.

Each step reads as a sentence (after nano-vllm): admit waiting requests, feed the prefilling requests
their share of the step's prompt-token budget, run one batched decode step for every decoding request,
process the outputs (:class:`~engine.scheduling.output.OutputProcessor`: grammar masks, sampling,
detokenization, stops, logprobs). The budget (``chunk_size`` tokens) is shared as vLLM's chunked prefill shares it:
short prompts (at most a chunk to feed) before long ones, a long prompt at most ``long_prefill`` tokens a step, a request passed
over for ``STARVED_STEPS`` steps served first. A long prompt therefore never stalls the other
conversations: a short prompt admitted behind it is prefilled in the next step, beside one share of the
long one, and the decoding rows advance every step. All cache and session mutation happens on this thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from engine.cache.sink import SinkCache
from engine.errors import EngineError, Overloaded, SessionBusy, ShuttingDown
from engine.events import Admission, FinishEvent, Usage
from engine.model.runner import Runner
from engine.scheduling.grammar import Constraint
from engine.scheduling.output import OutputProcessor
from engine.scheduling.sampling import SamplingParams, make_generator
from engine.scheduling.stops import PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer, StopMatcher
from engine.sessions.store import Session, SessionStore

log = logging.getLogger(__name__)

MAX_FAILED_STEPS = 3  # consecutive failed forward passes after which the engine reports itself unhealthy
STARVED_STEPS = 2  # steps a prefilling request may be passed over before it is served first


@dataclass(eq=False)  # a request is itself: `in` and `remove` must not compare prompts token by token
class Request:
    """One generation, from submission to its finish event."""

    prompt: list[int]
    params: SamplingParams
    owner: str
    session_id: str | None
    pinned: int  # slots the session must pin: the sinks, or the whole rendered system prompt
    branch: bool  # a named session the prompt diverges from is continued as a copy (never rolled back)
    constraint: Constraint | None  # a grammar the reply must follow (engine/scheduling/grammar.py), or None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    admitted: asyncio.Future
    submitted: float = field(default_factory=time.monotonic)
    # set on admission
    session: Session | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to feed
    cached_tokens: int = 0
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, not yet fed
    detok: IncrementalDetokenizer | None = None
    stops: StopMatcher | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False
    done: bool = False
    long_prompt: bool = False  # more than a chunk to feed: fed in shares of ``long_prefill`` tokens
    starved: int = 0  # steps in a row this long prompt was given no tokens while short ones were fed

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """Owns the worker thread, the runner and the session store."""

    def __init__(self, runner: Runner, store: SessionStore, tokenizer, eos_ids: set[int], config) -> None:
        self.runner = runner
        self.store = store
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.config = config
        self.max_queue = config.max_queue
        self.long_prefill = max(1, config.long_prefill_tokens)
        self.recall = None  # evicted blocks recalled at a turn's start (engine/cache/recall.py): not yet served
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.counters = {"generated_tokens": 0, "prompt_tokens": 0, "cached_tokens": 0, "requests": 0, "steps": 0,
                         "failed_steps": 0, "forks": 0,
                         "source_local": 0, "source_shared": 0, "source_prefill": 0,
                         # batched decode steps, the rows they carried, and their wall time (the forward pass
                         # alone, and the whole step with sampling and hand-off): what a client's
                         # inter-token gap is made of, as the server sees it
                         "decode_steps": 0, "decode_rows": 0, "decode_forward_seconds": 0.0, "decode_seconds": 0.0}
        self.failed_in_a_row = 0
        self.output = OutputProcessor(tokenizer, eos_ids, config.max_batch, self.counters, self._finish)
        self.last_failure: str | None = None
        self._stop = threading.Event()
        self._draining = False
        self._wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sinkserve-engine", daemon=True)

    @property
    def cache(self) -> SinkCache:
        """The cache pool, as lent to the runner (engine/engine.py builds and holds it)."""
        return self.runner.cache

    # ----- called from the event loop ----------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if self._draining or self._stop.is_set():
            raise ShuttingDown("the server is shutting down")
        if len(self.waiting) + self.inbox.qsize() >= self.max_queue:
            raise Overloaded("too many requests are waiting; retry shortly", retry_after=1.0)
        self.inbox.put(("submit", request))
        self._wake.set()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self._wake.set()

    def call(self, fn, *args):
        """Run ``fn`` on the worker thread (session API calls must not race the steps)."""
        result: queue.Queue = queue.Queue(maxsize=1)
        self.inbox.put(("call", (fn, args, result)))
        self._wake.set()
        ok, value = result.get()
        if not ok:
            raise value
        return value

    def start(self) -> None:
        self.thread.start()

    def drain(self) -> None:
        """Stop admitting new requests; running ones finish."""
        self._draining = True

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    # ----- the worker loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        last_expiry = time.monotonic()
        while not self._stop.is_set():
            try:
                self._take_inbox()
                self._admit()
                worked = self.step()
            except Exception as exc:  # a bug outside a forward pass: fail what runs, keep serving
                log.exception("engine step failed")
                self._failed(list(self.running), exc)
                worked = True
            if time.monotonic() - last_expiry > 60:
                self.store.expire()
                last_expiry = time.monotonic()
            if not worked:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
        for request in self.running + list(self.waiting):
            self._finish(request, "cancelled", error="the server shut down")

    def healthy(self) -> tuple[bool, str | None]:
        """Unhealthy after MAX_FAILED_STEPS forward passes in a row failed (a broken device, say)."""
        if self.failed_in_a_row >= MAX_FAILED_STEPS:
            return False, f"{self.failed_in_a_row} engine steps in a row failed; last: {self.last_failure}"
        return True, None

    def _take_inbox(self) -> None:
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self.waiting.append(item)
            else:
                fn, args, result = item
                try:
                    result.put((True, fn(*args)))
                except Exception as exc:
                    result.put((False, exc))

    def step(self) -> bool:
        """One scheduler step: a prefill chunk and a batched decode. Returns whether it did work."""
        for request in [r for r in self.running if r.cancelled]:
            self._finish(request, "cancelled")
        prefilling = [r for r in self.running if r.pending]
        decoding = [r for r in self.running if not r.pending][: self.config.max_batch]
        if prefilling:
            self._prefill(prefilling)
        if decoding:
            self._guarded(lambda: self._decode(decoding), decoding)
        self.counters["steps"] += bool(prefilling or decoding)
        return bool(prefilling or decoding)

    def _guarded(self, work, requests: list[Request]) -> None:
        """Run one forward pass and its sampling; if it raises, only its requests fail. The runner has
        then put their cache rows back, and their streams were not extended: the sessions are exactly as
        before the pass."""
        try:
            work()
        except Exception as exc:
            log.exception("engine step failed")
            self._failed(requests, exc)
        else:
            self.failed_in_a_row = 0

    def _failed(self, requests: list[Request], exc: Exception) -> None:
        self.failed_in_a_row += 1
        self.counters["failed_steps"] += 1
        self.last_failure = f"{type(exc).__name__}: {exc}"
        for request in requests:
            self._finish(request, "error", error=str(exc))

    # ----- admission ---------------------------------------------------------------------------------
    def _admit(self) -> None:
        still_waiting: deque[Request] = deque()
        while self.waiting:
            request = self.waiting.popleft()
            if request.cancelled:
                self._reject(request, ShuttingDown("cancelled"))
                continue
            if len(self.running) >= min(self.cache.rows, self.config.max_batch):
                still_waiting.append(request)  # every running request decodes every step: no starvation
                continue
            try:
                session = self._find_session(request)
            except EngineError as exc:
                self._reject(request, exc)
                continue
            if session is None:  # its session is busy (here, or leased by another replica): wait a little
                if time.monotonic() - request.submitted > max(self.config.session_busy_wait_s, self.store.busy_wait_s):
                    self._reject(request, SessionBusy("the session is generating another reply; retry when it is done"))
                else:
                    still_waiting.append(request)
                continue
            try:
                self._start(request, session)
            except Exception as exc:  # a request that cannot start must fail alone, never hang
                for held in {id(s): s for s in (session, request.session) if s is not None}.values():
                    held.busy = False
                    self.store.release(held)
                if request in self.running:
                    self.running.remove(request)
                if not isinstance(exc, EngineError):
                    log.exception("could not start a request")
                self._reject(request, exc)
        self.waiting = still_waiting

    def _find_session(self, request: Request) -> Session | None:
        """The session this request continues (None while it is busy): the named one, else the best
        match, else a new one (SessionStore.find)."""
        return self.store.find(request.owner, request.session_id, request.prompt, request.pinned)

    def _start(self, request: Request, session: Session) -> None:
        protect = {r.session.id for r in self.running}
        branch = request.branch or not request.session_id  # implicit matches never roll a session back
        fresh = not session.tokens  # a new session (store.find made it), or one never fed
        continued, keep = self.store.prepare(session, request.prompt, request.pinned, branch=branch,
                                             protect=protect)
        continued.busy = True
        self.counters["forks"] += continued is not session
        prompt = request.prompt
        request.session = continued
        request.pending = prompt[keep:]
        request.long_prompt = len(request.pending) > self.config.chunk_size
        request.cached_tokens = keep
        if self.recall is not None:  # evicted blocks recalled at a turn's start (engine/cache/recall.py)
            request.recalled_tokens = self.recall.turn(self.runner.model, continued.row, request.pending)
        request.detok = IncrementalDetokenizer(self.tokenizer, prompt[-PROMPT_CONTEXT_TOKENS:])
        request.stops = StopMatcher(request.params.stop)
        request.generator = make_generator(request.params, self.cache.device)
        self.running.append(request)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(prompt)
        self.counters["cached_tokens"] += keep
        source = self.store.source(continued, keep)
        self.counters[f"source_{source}"] += 1
        row = continued.row
        piece = self._piece_limit(request)
        evicted = continued.evicted + self.cache.planned_evictions(row, len(request.pending), piece)
        admission = Admission(continued.public_id, len(prompt), keep, evicted, continued.pinned, source,
                              self.store.replica, created=fresh or continued is not session)
        request.loop.call_soon_threadsafe(_resolve, request.admitted, admission)

    def _chunk(self, row: int) -> int:
        return min(self.config.chunk_size, self.cache.max_chunk(row))

    def _piece_limit(self, request: Request) -> int:
        """The most prompt tokens one step feeds ``request``: a chunk, a long prompt's share of one."""
        chunk = self._chunk(request.session.row)
        return min(chunk, self.long_prefill) if request.long_prompt else chunk

    def _reject(self, request: Request, error: Exception) -> None:
        request.loop.call_soon_threadsafe(_fail, request.admitted, error)

    # ----- running -----------------------------------------------------------------------------------
    def _prefill(self, prefilling: list[Request]) -> None:
        """Feed each prefilling request its piece of this step's prompt tokens (:meth:`_plan_prefill`). Where
        the runner can feed several rows in one pass (the owned step), the pieces share one pass: 8 clients
        arriving at once are prefilled in two passes instead of eight (each pass also delays the rows already
        decoding); elsewhere one request's piece a step. If a shared pass fails, its requests are prefilled
        one by one, so only a request that fails alone fails."""
        batch, pieces = self._plan_prefill(prefilling)
        if len(batch) > 1 and getattr(self.runner, "batch_prefill", False):
            try:
                logits = self.runner.prefill_rows([r.session.row for r in batch], pieces)  # (B, V)
            except Exception:  # the rows are as they were: retry each request alone
                log.warning("a shared prefill pass failed; prefilling its requests one by one", exc_info=True)
            else:
                self.failed_in_a_row = 0
                for request, piece, row_logits in zip(batch, pieces, logits, strict=True):
                    self._guarded(lambda r=request, c=piece, x=row_logits: self._prefilled(r, c, x[None]), [request])
                return
        for request, piece in zip(batch, pieces, strict=True):
            self._guarded(lambda r=request, c=piece: self._prefill_piece(r, c), [request])

    def _plan_prefill(self, prefilling: list[Request]) -> tuple[list[Request], list[list[int]]]:
        """The requests this step feeds and their prompt pieces, within ``chunk_size`` tokens in all: long
        prompts passed over ``STARVED_STEPS`` steps first, then the short prompts (at most a chunk to feed),
        then the long ones, each group in admission order, each request at most :meth:`_piece_limit`
        tokens; without shared passes only the first. The first always gets a piece."""
        budget = self.config.chunk_size
        shared = getattr(self.runner, "batch_prefill", False)  # else one pass, one request, a step
        order = sorted(prefilling, key=lambda r: (r.starved < STARVED_STEPS, r.long_prompt))
        batch, pieces, passed_over = [], [], []
        for request in order:
            size = min(self._piece_limit(request), budget) if budget > 0 and (shared or not batch) else 0
            if size <= 0:
                passed_over.append(request)
                continue
            request.starved = 0
            batch.append(request)
            pieces.append(request.pending[:size])
            budget -= len(pieces[-1])
        if any(not r.long_prompt for r in batch):  # a long prompt starves only behind short ones
            for request in passed_over:
                request.starved += request.long_prompt
        return batch, pieces

    def _prefill_piece(self, request: Request, piece: list[int]) -> None:
        self._prefilled(request, piece, self.runner.forward([request.session.row], torch.tensor([piece])))

    def _prefilled(self, request: Request, chunk: list[int], logits: torch.Tensor) -> None:
        """``chunk`` is in the request's cache row; ``logits`` (1, V) of its last token."""
        request.session.extend(chunk)
        del request.pending[: len(chunk)]
        if not request.pending:
            self.output.after_prefill(request, logits)

    def _decode(self, requests: list[Request]) -> None:
        start = time.perf_counter()
        try:
            self._decode_step(requests)
        finally:
            self.counters["decode_seconds"] += time.perf_counter() - start

    def _decode_step(self, requests: list[Request]) -> None:
        rows = self.store.compact([r.session for r in requests])
        tokens = [r.next_token for r in requests]
        forward = time.perf_counter()
        logits = self.runner.decode(rows, tokens)  # (B, V)
        counters = self.counters
        counters["decode_forward_seconds"] += time.perf_counter() - forward
        counters["decode_steps"] += 1
        counters["decode_rows"] += len(rows)
        for request, token in zip(requests, tokens, strict=True):  # every row was fed: record it first
            request.session.extend([token])
        self.output.after_decode(requests, logits)

    def _finish(self, request: Request, reason: str, error: str | None = None, flush: bool = True) -> None:
        if request.done:
            return
        request.done = True
        if request in self.running:
            self.running.remove(request)
        tail = ""
        if flush and request.stops is not None:
            tail, _ = request.stops.push(request.detok.flush())
            tail += request.stops.flush()
        session = request.session
        evicted, saved = 0, None
        if session is not None:
            session.busy = False
            evicted = session.evicted
            saved = self.store.end_turn(session, save=bool(session.tokens) and reason != "error")
        usage = Usage(
            prompt_tokens=len(request.prompt),
            completion_tokens=len(request.generated),
            cached_tokens=request.cached_tokens,
            evicted_tokens=evicted,
            pinned_tokens=session.pinned if session is not None else 0,
        )
        finish = FinishEvent(finish_reason=reason, usage=usage, text=tail, error=error)
        if saved is None:
            request.emit(finish)
        else:  # the reply ends once the turn is on disk: a crash after it never loses the turn
            saved.add_done_callback(lambda _: request.emit(finish))


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
