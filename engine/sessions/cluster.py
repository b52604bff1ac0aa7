"""The session store of a cluster replica: sessions shared with the other replicas through Redis and one
data directory (issue 15; docs/scale-out.md).

A :class:`ClusterSessionStore` is a :class:`~engine.sessions.store.SessionStore` whose saved copies live on a
directory every replica mounts, as immutable versions ``<id>.v<version>.safetensors``
(engine/sessions/versions.py), and whose index is a :class:`~engine.sessions.shared_index.SharedIndex` in Redis.
What changes against a single server:

- **Start**: nothing is loaded from the directory (it holds every replica's sessions, every version);
  a session is loaded when a request needs it. Only temporary files older than an hour are removed.
- **Admission** (:meth:`ClusterSessionStore.find`): a named session is looked up in the index; a local
  copy older than the indexed version is replaced by the indexed file (a replica that restarts, or that
  a conversation comes back to, never serves a stale copy). A prompt without a session id is matched
  against the local sessions *and* the index's token-prefix table (:meth:`SharedIndex.find_by_prefix`);
  the candidate that reuses the most tokens wins. The chosen session's write lease is then taken
  (``SET NX PX``, renewed in the background): while another replica holds it the request waits, as for a
  locally busy session, up to the lease's TTL plus a second (a SIGKILLed holder's lease lapses by then).
- **End of a turn** (:meth:`ClusterSessionStore.end_turn`): on the writer thread, a new version number
  from the index (``INCR``), the file written atomically, the version published (with the prefix lengths
  of the turn's prompt and the whole stream), old versions collected, the lease released. The reply's
  final event is sent only after that, so the next turn finds it on any replica.
- **Redis down** (:class:`~engine.sessions.shared_index.IndexUnavailable`): the replica serves its local sessions
  as a single server would (no lease, versions numbered from the files present, publishing skipped) and
  says so through :meth:`ClusterSessionStore.store_up` (``/health``, metrics); a background ping notices
  when Redis is back.

Requests report where their cached tokens came from (:meth:`ClusterSessionStore.source`): ``local``,
``shared`` (loaded from the shared store for this request) or ``prefill``.

All methods run on the engine's worker thread, except the writer-thread jobs and ``store_up``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import redis
import torch

from engine.cache.sink import SinkCache
from engine.errors import SessionNotFound
from engine.sessions.shared_index import (
    LEASE_TTL_MS,
    IndexUnavailable,
    Lease,
    PublishRejected,
    SessionRecord,
    SharedIndex,
)
from engine.sessions.store import Session, SessionStore, atomic_save, check_session_id
from engine.sessions.versions import collect_garbage, collect_temp_files, saved_versions, version_path

log = logging.getLogger(__name__)

PING_EVERY_S = 1.0  # how often a replica checks that Redis answers (store_up)
CONNECT_TIMEOUT_S = 0.5
READ_TIMEOUT_S = 2.0


class ClusterSessionStore(SessionStore):
    """Sessions of one replica, kept consistent with the cluster's shared index and directory."""

    busy_wait_s = LEASE_TTL_MS / 1000 + 1.0  # a crashed holder's lease lapses within its TTL

    def __init__(self, cache: SinkCache, data_dir: Path, host_budget_bytes: int, ttl_s: float,
                 index: SharedIndex, ping_every_s: float = PING_EVERY_S, **bounds: int) -> None:
        self.index = index
        self.replica = index.replica
        self.published: dict[str, tuple[int, str]] = {}  # id -> (version, file name) of the local copy
        self.leases: dict[str, Lease] = {}  # sessions whose turn runs here, with their write lease
        self.boundaries: dict[str, int] = {}  # id -> prompt length of the turn running on it
        self.fresh: set[str] = set()  # loaded from the shared store for a request not yet started
        self.store_errors = 0  # index calls that found Redis unavailable
        super().__init__(cache, data_dir, host_budget_bytes, ttl_s, **bounds)  # per-key bounds (SessionStore)
        self._stop = threading.Event()
        self._pinger = threading.Thread(target=self._ping, args=(ping_every_s,), name="store-ping", daemon=True)
        self._pinger.start()

    @classmethod
    def connect(cls, cache: SinkCache, data_dir: Path, host_budget_bytes: int, ttl_s: float, *, url: str,
                replica: str | None, model: str, **bounds: int) -> ClusterSessionStore:
        """A store on the Redis at ``url``; keys are namespaced by ``model`` (replicas serving different
        models never share sessions). Starts even while Redis is down."""
        replica = replica or socket.gethostname()
        # a dead Redis refuses at once or misses the short connect timeout; a live one on a busy host may
        # take longer than that to answer, which must not count as down
        client = redis.Redis.from_url(url, socket_timeout=READ_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                      decode_responses=True)
        index = SharedIndex(client, replica, ttl_s, namespace=f"sinkserve:{model}:")
        if index.ping():
            log.info("replica %s: shared session store at %s", replica, url)
        else:
            log.warning("replica %s: shared session store at %s unreachable; serving local sessions", replica, url)
        return cls(cache, data_dir, host_budget_bytes, ttl_s, index, **bounds)

    def store_up(self) -> bool:
        """Whether Redis answered the last call (a background ping every second keeps this fresh)."""
        return self.index.healthy

    def _ping(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.index.ping()

    def _unavailable(self, what: str, exc: IndexUnavailable) -> None:
        self.store_errors += 1
        log.debug("shared store unavailable (%s): %s", what, exc)

    # ----- finding a session -------------------------------------------------------------------------
    def find(self, owner: str, session_id: str | None, prompt: Sequence[int], pinned: int) -> Session | None:
        try:
            session = self._find_shared(owner, session_id, prompt, pinned)
        except IndexUnavailable as exc:
            self._unavailable("find", exc)
            return super().find(owner, session_id, prompt, pinned)
        if session is None or session.busy:
            return None
        return self._lease(session)

    def _find_shared(self, owner: str, session_id: str | None, prompt: Sequence[int], pinned: int) -> Session | None:
        if session_id:
            session = self._sync(self.scoped_id(owner, session_id), owner)
            if session is not None and session.owner != owner:  # another key's, never published
                raise SessionNotFound(f"session {session_id!r} not found")
            return session if session is not None else super().find(owner, session_id, prompt, pinned)
        candidates = []
        local = self.match(owner, prompt, pinned)
        if local is not None:
            local = self._sync(local.id, owner)  # None: deleted elsewhere meanwhile
            candidates += [local] if local is not None else []
        hit = self.index.find_by_prefix(owner, prompt)
        if hit is not None and (local is None or hit.session_id != local.id):
            shared = self._sync(hit.session_id, owner, hit.record)
            if shared is not None:
                candidates.append(shared)
        candidates = [s for s in candidates if not s.busy and s.reusable(prompt, pinned) > 0]
        if not candidates:
            return self.create(owner, pinned=pinned)
        return max(candidates, key=lambda s: (s.reusable(prompt, pinned), s.last_used))

    def _sync(self, session_id: str, owner: str, record: SessionRecord | None = None) -> Session | None:
        """The local copy of ``session_id``, replaced by the indexed version when that is newer (loaded
        when there is no local copy); None when neither exists. SessionNotFound for another owner's."""
        record = record or self.index.lookup(session_id)
        local = self.sessions.get(session_id)
        if record is None:
            if local is not None and session_id in self.published and not self.path(session_id).exists():
                self._forget(local)  # deleted on another replica (its files are gone), or expired
                return None
            return local  # never published yet, or Redis lost its records: the local copy stands
        if record.owner != owner or (local is not None and local.owner != owner):
            raise SessionNotFound(f"session {session_id!r} not found")
        if local is not None and (local.busy or self.published.get(session_id, (0, ""))[0] >= record.version):
            return local
        return self._load(record, replacing=local)

    def _load(self, record: SessionRecord, replacing: Session | None) -> Session | None:
        """Read ``record``'s file (tokens and metadata; the cache loads when it becomes resident)."""
        session = self._open(self.data_dir / record.file)
        if session is None or session.id != record.session_id:
            log.warning("session %s v%d: file %s unreadable; keeping the local copy",
                        record.session_id, record.version, record.file)
            return replacing
        if replacing is not None:
            log.info("session %s: local copy is stale (v%d < v%d by %s), reloading", record.session_id,
                     self.published.get(record.session_id, (0, ""))[0], record.version, record.replica)
            self._forget(replacing)
        with self._lock:
            self.sessions[session.id] = session
        self.published[session.id] = (record.version, record.file)
        self.fresh.add(session.id)
        return session

    def _lease(self, session: Session) -> Session | None:
        """Take ``session``'s write lease (None while another replica holds it); re-check its version
        once held. Without Redis the session is served without a lease."""
        try:
            lease = self.index.acquire_lease(session.id)
        except IndexUnavailable as exc:
            self._unavailable("lease", exc)
            return session
        if lease is None:
            return None  # another replica is writing it: wait, as for a locally busy session
        try:
            session = self._sync(session.id, session.owner) or session  # it may have moved on meanwhile
        except IndexUnavailable as exc:
            self._unavailable("lease", exc)
        self.leases[session.id] = lease
        self.index.keep_alive(lease)
        return session

    def get(self, owner: str, session_id: str) -> Session:
        try:
            self._sync(self.scoped_id(owner, session_id), owner)
        except IndexUnavailable as exc:
            self._unavailable("get", exc)
        return super().get(owner, session_id)

    def owned(self, owner: str) -> list[Session]:
        """The owner's sessions across the cluster: the index's (loaded here, tokens and metadata only,
        where this replica has no current copy) and the local ones."""
        try:
            for record in self.index.owned(owner):
                self._sync(record.session_id, owner, record)
        except IndexUnavailable as exc:
            self._unavailable("owned", exc)
        return super().owned(owner)

    # ----- a turn ------------------------------------------------------------------------------------
    def prepare(self, session: Session, prompt: Sequence[int], pinned: int, *, branch: bool,
                protect: set[str]) -> tuple[Session, int]:
        continued, keep = super().prepare(session, prompt, pinned, branch=branch, protect=protect)
        if continued is not session:  # a fork: a new id nobody else knows; the source is left as it was
            if session.id in self.fresh:
                self.fresh.add(continued.id)
            self._release(session.id)
        self.boundaries[continued.id] = len(prompt)
        return continued, keep

    def source(self, session: Session, cached: int) -> str:
        shared = session.id in self.fresh
        self.fresh.discard(session.id)
        if not cached:
            return "prefill"
        return "shared" if shared else "local"

    def release(self, session: Session) -> None:
        self.boundaries.pop(session.id, None)
        self._release(session.id)

    def _release(self, session_id: str) -> None:
        lease = self.leases.pop(session_id, None)
        if lease is not None:
            self._writer.submit(self._give_back, lease)  # after any write of the session already queued

    def _give_back(self, lease: Lease | None) -> None:
        if lease is None:
            return
        try:
            self.index.release_lease(lease)
        except IndexUnavailable:
            self.index.forget(lease)  # it lapses by itself

    def end_turn(self, session: Session, save: bool) -> Future | None:
        if not save:
            self.release(session)
            return None
        saved = self.save(session)  # _store publishes and releases the lease
        if saved is None:
            self.release(session)
        return saved

    def _store(self, session: Session, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Future:
        lease = self.leases.pop(session.id, None)
        boundary = self.boundaries.pop(session.id, None)
        return self._writer.submit(self._write_version, session.id, session.owner, tensors, meta, lease,
                                   [boundary] if boundary else [])

    def _write_version(self, session_id: str, owner: str, tensors: dict[str, torch.Tensor], meta: dict[str, str],
                       lease: Lease | None, boundaries: list[int]) -> None:
        """Writer thread: a new immutable version of the session, published in the index."""
        try:
            version = self._new_version(session_id)
            path = version_path(self.data_dir, session_id, version)
            atomic_save(tensors, meta, path)
            self.published[session_id] = (version, path.name)
            try:
                self.index.publish(session_id, owner, version, path.name, tensors["tokens"].tolist(), boundaries,
                                   lease=lease)
            except PublishRejected as exc:  # another replica wrote it meanwhile: reload it next time
                log.warning("%s", exc)
            except IndexUnavailable as exc:
                self._unavailable("publish", exc)
            collect_garbage(self.data_dir, session_id, version)
        finally:
            self._give_back(lease)

    def _new_version(self, session_id: str) -> int:
        """The index's next version number, above any this replica wrote (Redis may have restarted
        empty); without Redis, one above the newest file present."""
        newest = self.published.get(session_id, (0, ""))[0]
        try:
            version = self.index.allocate_version(session_id)
            for _ in range(64):  # Redis lost its counter: catch up with the files
                if version > newest:
                    break
                version = self.index.allocate_version(session_id)
            return version
        except IndexUnavailable as exc:
            self._unavailable("version", exc)
            found = saved_versions(self.data_dir, session_id)
            return max(newest, found[0][0] if found else 0) + 1

    # ----- persistence and removal -------------------------------------------------------------------
    def path(self, session_id: str) -> Path:
        """The file of the local copy's version (versions are named by the index, never rewritten)."""
        published = self.published.get(check_session_id(session_id))
        return self.data_dir / published[1] if published else super().path(session_id)

    def _load_index(self) -> None:
        """Nothing to load: sessions come from the shared index on demand. Abandoned temporary files
        (an hour old: a fresh one may be another replica's write) are removed."""
        removed = collect_temp_files(self.data_dir)
        if removed:
            log.info("removed %d abandoned temporary session files", len(removed))

    def _forget(self, session: Session) -> None:
        """Drop the local copy only (the shared files and the index stay)."""
        if self.sessions.get(session.id) is session:
            self.rows.release(session.id)
        session.host_state = None
        with self._lock:
            if self.sessions.get(session.id) is session:
                del self.sessions[session.id]
        self.published.pop(session.id, None)
        self.fresh.discard(session.id)

    def delete(self, session: Session) -> None:
        """Delete everywhere: the local copy, every version file and the index's record."""
        self._forget(session)
        self._writer.submit(_remove_versions, self.data_dir, session.id).result()
        try:
            self.index.delete(session.id, session.owner)
        except IndexUnavailable as exc:
            self._unavailable("delete", exc)

    def expire(self, now: float | None = None) -> int:
        """Forget local copies unused for the TTL; their files go too once the index has forgotten them."""
        now = time.time() if now is None else now
        stale = [s for s in self.sessions.values() if not s.busy and now - s.last_used > self.ttl_s]
        for session in stale:
            self._forget(session)
            try:
                if self.index.lookup(session.id) is None:
                    self._writer.submit(_remove_versions, self.data_dir, session.id)
            except IndexUnavailable as exc:
                self._unavailable("expire", exc)
        return len(stale)

    def close(self) -> None:
        """Save and publish what changed, release the leases, stop pinging Redis."""
        super().close()
        self._stop.set()
        self.index.close()


def _remove_versions(data_dir: Path, session_id: str) -> None:
    for _, path in saved_versions(data_dir, session_id):
        path.unlink(missing_ok=True)
