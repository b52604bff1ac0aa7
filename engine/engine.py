"""The engine's face: load a model, render prompts, start generations, manage sessions.

Callers (the HTTP server, benchmarks, tests) use only this class and the types in ``engine.events``,
``engine.scheduling.sampling`` and ``engine.errors``. It knows nothing of HTTP or OpenAI field names.

The engine builds the cache pool (:class:`~engine.cache.sink.SinkCache`, one row per resident session) and
holds it (``Engine.cache``); it lends it to the two pieces that work on it: the runner, whose passes
write it, and the session store's row table, which decides what each row holds. Nothing else keeps one:
the scheduler reads the runner's, a session reads its row through the table.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace

import torch

from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.errors import InvalidRequest, NotReady, SessionBusy
from engine.events import Generation
from engine.model.buckets import pad_decode_batches
from engine.model.device import cache_budget_bytes, default_max_batch, on_own_thread, pool_rows
from engine.model.linear import release_freed_memory
from engine.model.loader import LoadedModel, load
from engine.model.runner import serving_runner
from engine.prompts import PromptEncoder
from engine.scheduling.grammar import Constraint, Grammar, GrammarCompiler
from engine.scheduling.sampling import SamplingParams
from engine.scheduling.scheduler import Request, Scheduler
from engine.sessions.store import SessionStore, check_session_id, common_prefix

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")


def owner_of(api_key: str | None) -> str:
    """Sessions are scoped to a hash of the API key that created them (never the key itself)."""
    return hashlib.sha256((api_key or "").encode()).hexdigest()[:32]


class Engine:
    """Build with a config; ``start()`` loads the model (blocking) and starts the worker thread."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded
        self.cache: SinkCache | None = None  # the cache pool, built at start and lent (module docstring)
        self.scheduler: Scheduler | None = None
        self._encoder: PromptEncoder | None = None
        self._grammars: GrammarCompiler | None = None

    # ----- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Load the model, build the cache and the decode step, start the worker thread (blocking).

        The setup runs on a thread of its own that has ended when this returns
        (:func:`~engine.model.device.on_own_thread`), so that the worker is the only long-lived thread running
        PyTorch's OpenMP kernels: a second team, left on the calling thread, made every kernel of a decode
        step sleep and wake (on a 2-core host 240-280 voluntary context switches a step against none, and a
        single-row step of 17-27 ms against 14-16)."""
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        on_own_thread(self._start)  # a failed setup raises here, on the caller's thread
        return self

    def _start(self) -> None:
        owns_model = self.loaded is None  # a model handed in may serve others after this engine
        if owns_model:
            self.loaded = load(self.config)
        loaded = self.loaded
        # what the config left open is decided by the device, now that the weights are loaded (running
        # requests are capped by the resident rows as well as max_batch)
        max_batch = default_max_batch(loaded.device, self.config.max_batch)
        self.config = replace(
            self.config, max_batch=max_batch,
            memory_budget_bytes=cache_budget_bytes(loaded.device, self.config.memory_budget_bytes),
        )
        # decode batches padded to buckets (CUDA graphs on a GPU) write their padding rows to a scratch row;
        # torch.compile's forward (transformers') decodes unpadded
        padded = not self.config.compile and pad_decode_batches(loaded.device, self.config.decode_buckets)
        rows = self.rows_for_budget(loaded, reserved=int(padded))
        self.cache = cache = SinkCache(
            loaded.shape, rows, self.config.cache_size, self.config.sink_tokens, self.config.evict_block,
            loaded.inv_freqs, dtype=loaded.dtype, device=loaded.device, scratch_row=padded,
        )
        store = self._session_store(cache, loaded.name)
        runner = serving_runner(loaded.model, cache, loaded.quantize, max_batch, compile_decode=self.config.compile)
        if self.config.compile:
            log.info("compiling the decode step (a minute or two on a small CPU)")
            runner.warm_up()
        elif runner.buckets:  # every bucket's step (and CUDA graph) before the first request
            runner.warm_up(max_batch=max_batch)
        # the owned step runs every pass: its weight copies suffice
        released = runner.release_transformers_layers() if owns_model else 0
        if released:
            log.info("the owned step prefills and decodes: released %.0f MB of transformers' layer weights",
                     released / 1e6)
            release_freed_memory()
        self.scheduler = Scheduler(runner, store, loaded.tokenizer, loaded.eos_token_ids, self.config)
        self.scheduler.start()
        log.info(
            "engine ready: %s on %s (%s%s), cache %d + %d tokens, %d resident sessions (%.1f MB each)",
            loaded.name, loaded.device, str(loaded.dtype).removeprefix("torch."),
            f", {loaded.quantize} decode weights" if loaded.quantize else "", self.config.sink_tokens, self.config.window,
            rows, cache.bytes_per_row / 1e6,
        )

    def _session_store(self, cache: SinkCache, model_name: str) -> SessionStore:
        """The sessions of this process, or (with ``session_store``) a cluster's shared store."""
        config = self.config
        bounds = {"max_sessions_per_key": config.max_sessions_per_key,
                  "max_branches_per_session": config.max_branches_per_session}
        if not config.session_store:
            return SessionStore(cache, config.data_dir, config.host_budget_bytes, config.session_ttl_s, **bounds)
        from engine.sessions.cluster import ClusterSessionStore

        return ClusterSessionStore.connect(cache, config.data_dir, config.host_budget_bytes, config.session_ttl_s,
                                           url=config.session_store, replica=config.replica, model=model_name,
                                           **bounds)

    @property
    def replica(self) -> str | None:
        """This server's name in a cluster (None for a single server)."""
        return self.scheduler.store.replica if self.scheduler else None

    def session_store_status(self) -> str | None:
        """``up`` / ``down`` for a cluster's shared session store (Redis), None for a single server."""
        store = self.scheduler.store if self.scheduler else None
        check = getattr(store, "store_up", None)
        if check is None:
            return None
        return "up" if check() else "down"

    def rows_for_budget(self, loaded: LoadedModel, reserved: int = 0) -> int:
        """Session rows of the cache pool, beside ``reserved`` rows of the budget that no session owns."""
        per_row = self.config.cache_size * loaded.shape.bytes_per_token(loaded.dtype)
        budget = cache_budget_bytes(loaded.device, self.config.memory_budget_bytes)
        return pool_rows(budget, per_row, self.config.max_resident_sessions, reserved)

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    def drain(self) -> None:
        if self.scheduler:
            self.scheduler.drain()

    def stop(self) -> None:
        """Finish the worker and persist every session."""
        if self.scheduler:
            self.scheduler.stop()
            self.scheduler.store.close()

    def _scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise NotReady("the model is still loading")
        return self.scheduler

    # ----- prompts -----------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.loaded.name if self.loaded else self.config.model or "default"

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.loaded.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def render_chat(self, messages: Sequence[dict], pin_system: bool = False,
                    template_kwargs: dict | None = None) -> tuple[list[int], int]:
        """Prompt tokens for a chat and, with ``pin_system``, how many of them render the leading system
        message (0 otherwise: measuring it costs a second render).

        Messages are Hugging Face's chat shape: ``role`` and ``content``, an assistant's ``tool_calls``
        and a ``tool`` message's ``tool_call_id`` and ``name`` are passed on; ``template_kwargs`` go to
        ``apply_chat_template`` (``tools=[...]`` for a template that renders tools)."""
        messages = [self._message(m) for m in messages]
        kwargs = dict(template_kwargs or {})
        tokens = self._render(messages, add_generation_prompt=True, **kwargs)
        system = [m for m in messages[:1] if m["role"] in ("system", "developer")]
        pinned = 0
        if system and pin_system:
            try:
                pinned = common_prefix(self._render(system, add_generation_prompt=False, **kwargs), tokens)
            except InvalidRequest:  # a template that needs more than a system message (Llama 3.1 with tools)
                log.info("the chat template cannot render the system message alone: nothing pinned")
        return tokens, pinned

    @staticmethod
    def _message(message: dict) -> dict:
        """The fields of a chat message a template reads (others, such as a user's ``name``, are dropped)."""
        role = message["role"]
        if role not in ROLES:
            raise InvalidRequest(f"unknown role {role!r}")
        out = {"role": role, "content": message["content"]}
        if role == "assistant" and message.get("tool_calls"):
            out["tool_calls"] = message["tool_calls"]
        if role == "tool":
            out.update({k: message[k] for k in ("tool_call_id", "name") if message.get(k) is not None})
        return out

    def _render(self, messages: list[dict], add_generation_prompt: bool, **template_kwargs) -> list[int]:
        tokenizer = self.tokenizer
        if tokenizer.chat_template:
            try:
                text = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs
                )
            except Exception as exc:  # templates raise on conversations they do not accept
                raise InvalidRequest(f"the model's chat template rejected the messages: {exc}") from exc
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            text += "assistant:" if add_generation_prompt else ""
        return self._prompt_encoder().encode(text)

    def _prompt_encoder(self) -> PromptEncoder:
        if self._encoder is None:
            self._encoder = PromptEncoder(self.tokenizer)
        return self._encoder

    def check_params(self, params: SamplingParams) -> None:
        bad = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"logit_bias token ids out of the vocabulary (0..{self.vocab_size - 1}): {bad[:5]}")

    async def constraint(self, grammar: Grammar) -> Constraint:
        """A fresh matcher of ``grammar`` for one generation, compiled off the event loop (cached by
        grammar); raises InvalidRequest for a grammar that is invalid or unsupported."""
        if self._grammars is None:
            self._grammars = GrammarCompiler.for_model(self.loaded)
        return await asyncio.to_thread(self._grammars.constraint, grammar)

    def pinned_slots(self, pin_prefix: int) -> int:
        """Slots a session pins for a request pinning ``pin_prefix`` prompt tokens (0: just the sinks)."""
        sinks, capacity = self.config.sink_tokens, self.config.cache_size
        pinned = max(sinks, pin_prefix) if pin_prefix else sinks
        if pin_prefix and pinned > capacity // 2:
            raise InvalidRequest(
                f"the pinned prefix ({pinned} tokens) leaves too little room for the window "
                f"(cache of {capacity} tokens)"
            )
        return pinned

    def model_info(self) -> dict[str, str | None] | None:
        """The model's ``model_type``, its family in the registry (engine/model/families; None when it has
        none) and its decode path, ``owned`` or ``transformers``; None while loading."""
        return self.scheduler.runner.model_info() if self.scheduler is not None else None

    def health(self) -> tuple[bool, str | None]:
        """(healthy, why not): unhealthy while loading, or after several engine steps in a row failed."""
        if self.scheduler is None:
            return False, "the model is still loading"
        return self.scheduler.healthy()

    # ----- generation --------------------------------------------------------------------------------
    async def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        api_key: str | None = None,
        session_id: str | None = None,
        pin_prefix: int = 0,
        fork: bool = False,
        constraint: Constraint | None = None,
    ) -> Generation:
        """Queue a generation; returns once it is admitted (its session known), before any token.

        ``pin_prefix``: prompt tokens to keep pinned (a rendered system prompt); 0 pins only the sinks.
        A session pinned differently, or whose pinned prefix differs from the prompt's, is never reused
        beyond what the new pinning would have produced. ``fork``: when ``session_id`` names a session the
        prompt diverges from, continue a copy of it (``admission.session_id`` names the copy) instead of
        rolling it back in place; prompts without a session id always branch that way. ``constraint``:
        the grammar the reply must follow, from :meth:`constraint` (one per generation)."""
        scheduler = self._scheduler()
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequest(f"prompt token ids must be between 0 and {self.vocab_size - 1}")
        if session_id is not None:
            check_session_id(session_id)
        self.check_params(params)
        pinned = self.pinned_slots(pin_prefix)
        loop = asyncio.get_running_loop()
        request = Request(
            prompt=list(prompt), params=params, owner=owner_of(api_key), session_id=session_id,
            pinned=pinned, branch=fork, constraint=constraint, loop=loop, events=asyncio.Queue(), admitted=loop.create_future(),
        )
        scheduler.submit(request)
        try:
            admission = await request.admitted
        except asyncio.CancelledError:
            scheduler.cancel(request)
            raise
        return Generation(admission, request.events, lambda: scheduler.cancel(request))

    # ----- sessions ----------------------------------------------------------------------------------
    def _describe(self, session) -> dict:
        return session.describe(self.loaded.shape.bytes_per_token(self.loaded.dtype))

    async def list_sessions(self, api_key: str | None) -> list[dict]:
        scheduler = self._scheduler()
        owner = owner_of(api_key)
        return await asyncio.to_thread(
            scheduler.call, lambda: [self._describe(s) for s in scheduler.store.owned(owner)]
        )

    async def get_session(self, api_key: str | None, session_id: str) -> dict:
        scheduler = self._scheduler()
        owner = owner_of(api_key)
        return await asyncio.to_thread(
            scheduler.call, lambda: self._describe(scheduler.store.get(owner, session_id))
        )

    async def delete_session(self, api_key: str | None, session_id: str) -> None:
        scheduler = self._scheduler()
        owner = owner_of(api_key)

        def delete() -> None:
            session = scheduler.store.get(owner, session_id)
            if session.busy:
                raise SessionBusy("the session is generating; cancel it first")
            scheduler.store.delete(session)

        await asyncio.to_thread(scheduler.call, delete)

    # ----- numbers -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        if self.scheduler is None:
            return {}
        s = self.scheduler
        return {
            **s.counters,
            **s.store.counters,  # sessions and branches dropped over their bounds
            "running": len(s.running),
            "waiting": len(s.waiting),
            "sessions": len(s.store.sessions),
            "resident_cache_bytes": s.store.resident_bytes(),
            "host_cache_bytes": s.store.host_bytes(),
            "cache_budget_bytes": self.cache.rows * self.cache.bytes_per_row,
            **self._store_stats(),
        }

    def _store_stats(self) -> dict:
        """A cluster's shared store: whether Redis answers, and calls that found it unavailable."""
        status = self.session_store_status()
        if status is None:
            return {}
        return {"session_store_up": int(status == "up"), "session_store_errors": self.scheduler.store.store_errors}
