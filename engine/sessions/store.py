"""Sessions: each conversation's token stream and cache, where it lives, and how it is found again.

A session is the stream of tokens the model has seen (prompts, generated tokens) plus its sink cache.
Its cache lives in one of three places, moved by least-recent use within memory budgets:
- ``device``: a row of the shared :class:`~engine.cache.sink.SinkCache` pool (the pool's size is the budget),
  lent to the store by the engine; which session holds which row is recorded once, in its
  :class:`~engine.sessions.rows.RowTable`;
- ``host``: an exported copy in host memory (``host_budget_bytes``);
- ``disk``: ``data_dir/<id>.safetensors`` (keys, values, tokens, metadata), written atomically
  (temporary file + rename) after every completed turn, when it leaves memory, and on shutdown.

Finding a session: an explicit id, else the idle session of the same owner from which the new prompt
can *reuse* the most tokens (not merely share the most: a prefix that ends before a session's window
cannot be kept, see :meth:`~engine.cache.sink.RowState.reusable`), the most recently used on a tie; else a
new session.

Branches: a prompt that diverges from the session it continues (an edited or regenerated turn, a second
tab) continues a *copy* of it (:meth:`SessionStore.fork`), so no branch destroys another; abandoned
branches age out through the memory budgets and the TTL. Only a request that names its session and does
not ask for a fork rolls that session back in place.

Bounds: each API key holds at most ``max_sessions_per_key`` sessions (default 128) and each session at most
``max_branches_per_session`` branches (copies of it and of its copies, default 16); past either, the key's
least recently used idle session (or branch) is dropped, logged at INFO and counted in ``counters``. A
session still generating is never dropped, so a key may pass its bound by the requests it has running.

Names: a session a client names belongs to its API key: two keys naming ``"chat"`` get two sessions, and
neither can tell that the other's exists (:meth:`SessionStore.scoped_id`). Generated ids (``sess_`` and 128
random bits) are the store's ids as they are.

A cluster replica uses :class:`~engine.sessions.cluster.ClusterSessionStore`, this store kept consistent
with the other replicas through Redis and a shared directory; the hooks it overrides are ``find``,
``source``, ``release``, ``end_turn`` and ``_store``.

All methods run on the engine's worker thread except the read-only listing helpers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.cache.sink import RowState, SinkCache
from engine.errors import InvalidRequest, SessionNotFound
from engine.sessions.rows import RowTable

log = logging.getLogger(__name__)

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
GENERATED_ID = re.compile(r"^sess_[0-9a-f]{32}$")  # new_session_id()'s form
FORMAT_VERSION = "1"
ANONYMOUS_OWNER = hashlib.sha256(b"").hexdigest()[:32]  # engine.owner_of(None): no API keys, one tenant
MAX_SESSIONS_PER_KEY = 128
MAX_BRANCHES_PER_SESSION = 16


def new_session_id() -> str:
    return "sess_" + secrets.token_hex(16)  # 128 random bits


def check_session_id(session_id: str) -> str:
    """Reject anything that is not a plain token before it can touch the file system."""
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise InvalidRequest("session id must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-'")
    return session_id


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n and a[:n] == b[:n]:
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Session:
    """A conversation's token stream and where its cache lives.

    Its row and counters (slots in use, pinned, evicted) are read from the pool's row table when it is
    resident, else from ``parked``, the counters of the copy in host memory or on disk: never kept in step
    by hand."""

    id: str
    owner: str
    rows: RowTable = field(repr=False)
    tokens: list[int] = field(default_factory=list)  # the stream the cache reflects
    parked: RowState = field(default_factory=lambda: RowState(0, 0))
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    host_state: dict[str, torch.Tensor] | None = None
    on_disk: bool = False
    busy: bool = False
    version: int = 0  # bumped whenever the stream changes
    saved_version: int = -1  # version of the last saved copy
    name: str | None = None  # the client's name for it, where the store's id is derived from it (scoped_id)
    root: str | None = None  # for a branch (fork), the id of the session its lineage began with

    @property
    def public_id(self) -> str:
        """The id its client knows it by."""
        return self.name or self.id

    @property
    def row(self) -> int | None:
        """The pool row it holds (None: not resident)."""
        return self.rows.row_of(self.id)

    @property
    def state(self) -> RowState:
        state = self.rows.state(self.id)
        return state if state is not None else self.parked

    @property
    def evicted(self) -> int:
        return self.state.evicted

    @property
    def pinned(self) -> int:
        return self.state.pinned

    @property
    def in_cache(self) -> int:
        return self.state.length

    def extend(self, tokens: Sequence[int]) -> None:
        """Record tokens the cache row was just fed."""
        self.tokens.extend(tokens)
        self.version += 1

    def truncate(self, keep: int) -> None:
        """Record that the cache row was rolled back to the stream's first ``keep`` tokens."""
        del self.tokens[keep:]
        self.version += 1

    def reusable(self, prompt: Sequence[int], pinned: int) -> int:
        """Stream tokens a prompt pinning ``pinned`` can keep (never all of it: its last token must be fed
        again to get logits)."""
        shared = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
        return self.state.reusable(shared, pinned)

    @property
    def location(self) -> str:
        if self.row is not None:
            return "device"
        return "host" if self.host_state is not None else "disk"

    def describe(self, bytes_per_token: int) -> dict:
        state = self.state
        return {
            "id": self.public_id,
            "tokens_seen": len(self.tokens),
            "tokens_in_cache": state.length,
            "tokens_evicted": state.evicted,
            "pinned_tokens": state.pinned,
            "cache_bytes": state.length * bytes_per_token,
            "location": self.location,
            "created": int(self.created),
            "last_used": int(self.last_used),
        }


class SessionStore:
    """Owns the sessions and decides where each cache lives."""

    busy_wait_s = 0.0  # how long a request may wait for a busy session, beyond the engine's own setting
    replica: str | None = None  # this server's name in a cluster (engine/sessions/cluster.py)

    def __init__(self, cache: SinkCache, data_dir: Path, host_budget_bytes: int, ttl_s: float,
                 max_sessions_per_key: int = MAX_SESSIONS_PER_KEY,
                 max_branches_per_session: int = MAX_BRANCHES_PER_SESSION) -> None:
        if max_sessions_per_key < 1 or max_branches_per_session < 1:
            raise ValueError("max_sessions_per_key and max_branches_per_session must be >= 1")
        self.max_sessions_per_key = max_sessions_per_key
        self.max_branches_per_session = max_branches_per_session
        self.counters = {"sessions_dropped": 0, "branches_dropped": 0}  # idle ones dropped over the bounds
        self.rows = RowTable(cache)  # the lent pool and which session holds each of its rows
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host_budget = host_budget_bytes
        self.ttl_s = ttl_s
        self.sessions: dict[str, Session] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="session-writer")
        self._lock = threading.Lock()  # guards `sessions` for readers on other threads
        self._load_index()

    @property
    def cache(self) -> SinkCache:
        """The cache pool, lent to the store through its row table."""
        return self.rows.cache

    # ----- lookup ------------------------------------------------------------------------------------
    @staticmethod
    def scoped_id(owner: str, name: str) -> str:
        """The store's id of the session ``owner`` calls ``name``: derived from both, so equal names of two
        keys are two sessions; a generated id, and any name without API keys (one tenant), as it is."""
        check_session_id(name)
        if owner == ANONYMOUS_OWNER or GENERATED_ID.match(name):
            return name
        return "k" + hashlib.sha256(f"{owner}/{name}".encode()).hexdigest()[:40]

    def get(self, owner: str, session_id: str) -> Session:
        session = self.sessions.get(self.scoped_id(owner, session_id))
        if session is None:  # saved before names were scoped: kept under the name itself
            session = self.sessions.get(session_id)
        if session is None or session.owner != owner:
            raise SessionNotFound(f"session {session_id!r} not found")
        return session

    def create(self, owner: str, session_id: str | None = None, pinned: int | None = None,
               keep: frozenset[str] = frozenset()) -> Session:
        """A new empty session of ``owner``, named ``session_id`` (else a generated id); the key's least
        recently used idle session makes room past ``max_sessions_per_key`` (never one in ``keep``)."""
        store_id = self.scoped_id(owner, session_id) if session_id else new_session_id()
        if store_id in self.sessions:
            raise SessionNotFound(f"session {session_id!r} not found")  # someone else's: never reveal it
        self._bound_sessions(owner, keep)
        pinned = self.cache.sink_tokens if pinned is None else pinned
        session = Session(id=store_id, owner=owner, rows=self.rows, parked=RowState(0, pinned),
                          name=session_id if session_id and store_id != session_id else None)
        with self._lock:
            self.sessions[store_id] = session
        return session

    def _bound_sessions(self, owner: str, keep: frozenset[str]) -> None:
        """Drop ``owner``'s least recently used idle sessions until one more fits its bound."""
        owned = [s for s in self.sessions.values() if s.owner == owner]
        while len(owned) >= self.max_sessions_per_key:
            victim = _least_recent_idle(owned, keep)
            if victim is None:  # all generating: the key passes its bound by its running requests
                return
            owned.remove(victim)
            self._drop(victim, "sessions_dropped",
                       f"its key holds {self.max_sessions_per_key} sessions (max_sessions_per_key)")

    def _bound_branches(self, root: str, keep: frozenset[str]) -> None:
        """Drop the least recently used idle branches of ``root`` past ``max_branches_per_session``."""
        branches = [s for s in self.sessions.values() if s.root == root]
        while len(branches) > self.max_branches_per_session:
            victim = _least_recent_idle(branches, keep)
            if victim is None:
                return
            branches.remove(victim)
            self._drop(victim, "branches_dropped",
                       f"its session has {self.max_branches_per_session} branches (max_branches_per_session)")

    def _drop(self, session: Session, counter: str, why: str) -> None:
        log.info("dropping idle session %s (last used %.0f s ago): %s", session.public_id,
                 time.time() - session.last_used, why)
        self.counters[counter] += 1
        self.delete(session)

    def find(self, owner: str, session_id: str | None, prompt: Sequence[int], pinned: int) -> Session | None:
        """The session a request continues (None while it is busy): the named one (created when new),
        else the best match, else a new one. A cluster store (engine/sessions/cluster.py) also consults
        the shared index and takes the session's write lease here."""
        if session_id:
            try:
                session = self.get(owner, session_id)
            except SessionNotFound:
                if self.scoped_id(owner, session_id) in self.sessions:
                    raise
                session = self.create(owner, session_id, pinned=pinned)
        else:
            session = self.match(owner, prompt, pinned) or self.create(owner, pinned=pinned)
        return None if session.busy else session

    def source(self, session: Session, cached: int) -> str:
        """Where a request's cached tokens came from: ``local`` (this store's copy), ``prefill`` (none)."""
        return "local" if cached else "prefill"

    def release(self, session: Session) -> None:
        """The request on ``session`` ended without a turn to save (a cluster store drops its lease)."""

    def end_turn(self, session: Session, save: bool) -> Future | None:
        """A request on ``session`` finished: save it when ``save`` (returns the write's future)."""
        return self.save(session) if save else None

    def match(self, owner: str, prompt: Sequence[int], pinned: int) -> Session | None:
        """The idle session of ``owner`` from which this prompt reuses the most tokens (see the module
        docstring), the most recently used on a tie; None when none can reuse any."""
        best, best_key = None, (0, 0.0)
        for session in self.sessions.values():
            if session.owner != owner or session.busy or not session.tokens:
                continue
            key = (session.reusable(prompt, pinned), session.last_used)
            if key[0] > 0 and key > best_key:
                best, best_key = session, key
        return best

    def prepare(self, session: Session, prompt: Sequence[int], pinned: int, *, branch: bool,
                protect: set[str]) -> tuple[Session, int]:
        """Make ``session`` ready to be fed ``prompt``: returns the session to feed (itself, or a fork of it
        when the prompt diverges and ``branch`` is set) and how many prompt tokens its cache already holds."""
        keep = session.reusable(prompt, pinned)
        if branch and 0 < keep < len(session.tokens):
            child = self.fork(session, keep, pinned, protect)
            return child, len(child.tokens)
        row = self.make_resident(session, protect)
        if keep < len(session.tokens) or pinned != session.pinned:
            self.cache.rollback(row, keep, pinned)
            session.truncate(keep)
        return session, keep

    def fork(self, source: Session, keep: int, pinned: int, protect: set[str]) -> Session:
        """A new session of the same owner whose cache is ``source``'s first ``keep`` stream tokens."""
        row = self._free_row(protect)  # may move the source itself out: then its host copy is copied
        spare = frozenset(protect) | {source.id}  # what the bounds below never drop
        child = self.create(source.owner, pinned=pinned, keep=spare)
        child.root = source.root or source.id
        self.rows.assign(row, child.id)
        if source.row is not None:
            self.cache.copy_row(source.row, row)
        else:
            state = source.host_state or (self._read(source) if source.on_disk else None)
            if state is None:  # its file was unreadable: nothing to copy
                self.cache.reset(row, pinned)
                keep = 0
            else:
                self.cache.import_row(row, state)
        self.cache.rollback(row, keep, pinned)
        child.extend(source.tokens[:keep])
        source.last_used = time.time()
        self._bound_branches(child.root, spare | {child.id})
        return child

    def owned(self, owner: str) -> list[Session]:
        with self._lock:
            return [s for s in self.sessions.values() if s.owner == owner]

    # ----- residency ---------------------------------------------------------------------------------
    def make_resident(self, session: Session, protect: set[str]) -> int:
        """Give ``session`` a device row, moving the least recently used idle session out if needed."""
        session.last_used = time.time()
        if session.row is not None:
            return session.row
        row = self._free_row(protect | {session.id})
        self.rows.assign(row, session.id)
        state = session.host_state or (self._read(session) if session.on_disk else None)
        if state is None:
            self.cache.reset(row, session.parked.pinned)
        else:
            self.cache.import_row(row, state)
        session.host_state = None
        return row

    def _free_row(self, protect: set[str]) -> int:
        row = self.rows.free_row()
        if row is not None:
            return row
        candidates = [self.sessions[o] for o in self.rows.holders() if o not in protect]
        candidates = [s for s in candidates if not s.busy]
        if not candidates:
            raise RuntimeError("no cache row free: every resident session is busy")
        victim = min(candidates, key=lambda s: s.last_used)
        row = victim.row
        self.offload(victim)
        return row

    def offload(self, session: Session) -> None:
        """Move a resident session's cache to host memory (then the oldest host copies to disk)."""
        assert session.row is not None
        session.parked = session.state
        session.host_state = self.cache.export_row(session.row)
        self.rows.release(session.id)
        self._trim_host()

    def _trim_host(self) -> None:
        hosted = sorted((s for s in self.sessions.values() if s.host_state is not None), key=lambda s: s.last_used)
        used = sum(_state_bytes(s.host_state) for s in hosted)
        for session in hosted:
            if used <= self.host_budget:
                break
            used -= _state_bytes(session.host_state)
            if session.saved_version != session.version or not session.on_disk:
                self._write(session, session.host_state).result()
            session.host_state = None

    def compact(self, sessions: list[Session]) -> list[int]:
        """Move ``sessions`` (all resident) to rows 0..k-1 in the order given, so a batched step over them
        reads a view of the cache, not a gathered copy of every row (a step's rows are a view only when
        they are consecutive in the step's order: rows 0..k-1 in another order, which recycled rows
        produce once sessions outnumber them, made every step copy all the rows' slots, 3-4x slower)."""
        for target, session in enumerate(sessions):
            if session.row == target:
                continue
            self.rows.swap(target, session.row)
        return [s.row for s in sessions]

    def resident_bytes(self) -> int:
        return len(self.rows) * self.cache.bytes_per_row

    def host_bytes(self) -> int:
        return sum(_state_bytes(s.host_state) for s in self.sessions.values() if s.host_state is not None)

    # ----- persistence -------------------------------------------------------------------------------
    def path(self, session_id: str) -> Path:
        path = (self.data_dir / f"{check_session_id(session_id)}.safetensors").resolve()
        if path.parent != self.data_dir.resolve():
            raise InvalidRequest("bad session id")
        return path

    def save(self, session: Session, wait: bool = False) -> Future | None:
        """Write the session in the background (atomic); the export is a snapshot taken now.

        Returns the write's future (None when there was nothing new to write)."""
        if session.row is not None:
            state = self.cache.export_row(session.row)
        elif session.host_state is not None:
            state = session.host_state
        else:
            return None  # only on disk: already saved
        future = self._write(session, state)
        if wait:
            future.result()
        return future

    def _write(self, session: Session, state: dict[str, torch.Tensor]):
        tensors = dict(state)
        tensors["tokens"] = torch.tensor(session.tokens, dtype=torch.int64)
        meta = {
            "format": FORMAT_VERSION,
            "id": session.id,
            "owner": session.owner,
            "created": repr(session.created),
            "last_used": repr(session.last_used),
            "shape": json.dumps([self.cache.shape.num_layers, self.cache.shape.kv_heads, self.cache.shape.head_dim]),
            "dtype": str(self.cache.dtype),
        }
        meta.update({k: v for k, v in (("name", session.name), ("root", session.root)) if v})
        session.saved_version = session.version
        session.on_disk = True
        return self._store(session, tensors, meta)

    def _store(self, session: Session, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Future:
        """Write a snapshot on the writer thread: ``data_dir/<id>.safetensors``, replaced atomically."""
        return self._writer.submit(atomic_save, tensors, meta, self.path(session.id))

    def _read(self, session: Session) -> dict[str, torch.Tensor] | None:
        try:
            with safe_open(str(self.path(session.id)), "pt") as handle:
                return {name: handle.get_tensor(name) for name in ("k", "v", "meta")}
        except Exception:  # unreadable file: start the cache over rather than fail the request
            log.exception("session %s: saved cache unreadable, re-streaming", session.id)
            session.truncate(0)
            session.parked = RowState(0, session.parked.pinned)
            return None

    def _load_index(self) -> None:
        """Know every saved session after a restart (tokens and metadata only; caches load lazily)."""
        for path in sorted(self.data_dir.glob("*.safetensors")):
            session = self._open(path)
            if session is not None:
                self.sessions[session.id] = session
        for stale in self.data_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        if self.sessions:
            log.info("found %d saved sessions in %s", len(self.sessions), self.data_dir)

    def _open(self, path: Path) -> Session | None:
        """The session saved in ``path`` (tokens and metadata; its cache loads lazily), or None for a
        foreign or damaged file."""
        expected_shape = [self.cache.shape.num_layers, self.cache.shape.kv_heads, self.cache.shape.head_dim]
        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") != FORMAT_VERSION or json.loads(meta["shape"]) != expected_shape:
                    return None
                tokens = handle.get_tensor("tokens").tolist()
                n, pinned, evicted = handle.get_tensor("meta").tolist()
            return Session(
                id=check_session_id(meta["id"]),
                owner=meta["owner"],
                rows=self.rows,
                tokens=tokens,
                parked=RowState(n, pinned, evicted),
                created=float(meta["created"]),
                last_used=float(meta["last_used"]),
                on_disk=True,
                saved_version=0,
                name=meta.get("name"),
                root=meta.get("root"),
            )
        except Exception:  # a foreign or damaged file: ignore it, never crash the server
            log.warning("ignoring unreadable session file %s", path.name)
            return None

    # ----- removal -----------------------------------------------------------------------------------
    def delete(self, session: Session) -> None:
        self.rows.release(session.id)
        with self._lock:
            self.sessions.pop(session.id, None)
        self._writer.submit(lambda: self.path(session.id).unlink(missing_ok=True)).result()

    def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        stale = [s for s in self.sessions.values() if not s.busy and now - s.last_used > self.ttl_s]
        for session in stale:
            self.delete(session)
        return len(stale)

    def close(self) -> None:
        """Persist every session that changed since its last save; wait for the writes."""
        for session in list(self.sessions.values()):
            if session.saved_version != session.version and session.tokens:
                self.save(session)
        self._writer.shutdown(wait=True)


def _least_recent_idle(sessions: list[Session], keep: frozenset[str]) -> Session | None:
    idle = [s for s in sessions if not s.busy and s.id not in keep]
    return min(idle, key=lambda s: s.last_used) if idle else None


def _state_bytes(state: dict[str, torch.Tensor] | None) -> int:
    if not state:
        return 0
    return sum(t.numel() * t.element_size() for t in state.values())


def atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, str], target: Path) -> None:
    """Write ``tensors`` and ``meta`` as safetensors to ``target``: a temporary file, synced, then renamed
    (a crash never leaves half a file under the target's name)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
