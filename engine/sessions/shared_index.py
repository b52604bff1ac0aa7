"""The shared session index of a cluster: which replica may write a session, its current saved version,
and which session a stateless prompt continues, kept in Redis (or Valkey) for every replica to read.

Replicas share one data directory (a named volume, an RWX volume) holding the session files, written as
immutable versions ``<id>.v<version>.safetensors``; Redis holds only small records pointing at them:

``{ns}session:{id}``        hash: owner, version, file (name inside the data directory), tokens (stream
                            length), replica (the last writer), updated (unix seconds)
``{ns}version:{id}``        counter: the last version number handed out (``allocate_version``), so two
                            writers never pick the same file name even when one of them lost its lease
``{ns}lease:{id}``          ``SET NX PX`` lease: ``<replica>/<random token>`` of the one replica allowed to
                            write the session; released and renewed only by its holder (compare-and-delete
                            / compare-and-pexpire Lua scripts, https://redis.io/docs/latest/develop/use/patterns/distributed-locks/)
``{ns}prefix:{owner}:{h}``  ``<id>@<version>``: the session whose stream began with the tokens hashed to h
``{ns}bounds:{owner}``      sorted set: every prefix length indexed for this owner, scored by its last write
``{ns}owned:{owner}``       sorted set: the owner's session ids, scored by their last publish

Every key expires after the session TTL (refreshed by each publish), like the session files themselves.

**Prefix index.** At each turn boundary the replica publishes the stream's prefix lengths where a later
prompt is expected to agree with the stream exactly: the end of each prompt, and the end of the stream.
A key is the BLAKE2b-128 digest of the first L tokens (little-endian uint32). Lookup for a new prompt
reads the owner's indexed lengths (one ZRANGEBYSCORE), hashes the prompt once front to back, copying the
hash state at each length L <= len(prompt) (O(len(prompt) + B) for B lengths), fetches all B keys in one
MGET and takes the longest hit whose session still exists. Hashing at turn boundaries rather than at a
fixed token granularity keeps the index small (a few keys per turn, not one per 64 tokens of a 50k
stream) and exact: a hit is a whole-turn prefix, no partial block to verify. Lengths whose keys have all
expired leave the sorted set at the next publish (they are scored by write time).

**Failure.** Every call that reaches Redis raises :class:`IndexUnavailable` when Redis cannot be reached
(connection refused, timeout: short socket timeouts), and ``healthy`` turns False; after a failure the
index answers ``IndexUnavailable`` at once for ``retry_after_s`` instead of waiting on the network
again, so a replica whose Redis is down keeps serving its local sessions at full speed. ``ping()`` always
tries. The caller logs, counts and carries on as a single server would.

The version files themselves are named and collected by engine/sessions/versions.py.

This module knows nothing of HTTP; it is driven by the session store (engine/sessions/store.py).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "sinkserve:"
LEASE_TTL_MS = 5_000  # a crashed replica's sessions are free again after this (renewed every third)

# KEYS[1] lease key; ARGV[1] holder token. Delete only if we still hold it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS[1] lease key; ARGV[1] holder token, ARGV[2] ttl ms. Extend only if we still hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS[1] session hash, KEYS[2] lease key, KEYS[3] owner's session set;
# ARGV: version, owner, file, tokens, replica, updated, ttl ms, lease token ('' = no lease check), id.
# Publishes only a newer version, of a session of the same owner, by the lease holder.
_PUBLISH = """
local current = redis.call('HMGET', KEYS[1], 'version', 'owner')
if current[1] and tonumber(current[1]) >= tonumber(ARGV[1]) then return -1 end
if current[2] and current[2] ~= ARGV[2] then return -2 end
if ARGV[8] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[8] then return -3 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'owner', ARGV[2], 'file', ARGV[3], 'tokens', ARGV[4],
           'replica', ARGV[5], 'updated', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[9])
redis.call('PEXPIRE', KEYS[3], ARGV[7])
return 1
"""


class IndexUnavailable(RuntimeError):
    """Redis could not be reached (or is in its back-off period after a failure)."""


class PublishRejected(RuntimeError):
    """``publish`` refused: not newer than the indexed version, another owner's id, or the lease was lost."""


@dataclass(frozen=True)
class SessionRecord:
    """What the index knows of one session."""

    session_id: str
    owner: str
    version: int
    file: str  # file name inside the shared data directory
    tokens: int  # stream length of that version
    replica: str  # the replica that published it
    updated: float  # unix seconds


@dataclass
class Lease:
    """A held write lease; ``token`` proves it is ours when renewing or releasing."""

    session_id: str
    replica: str
    token: str
    ttl_ms: int
    lost: bool = False  # set when a renewal found someone else's lease (or none)


@dataclass(frozen=True)
class PrefixMatch:
    """The session whose indexed prefix is the longest prefix of a prompt."""

    session_id: str
    version: int  # the version that indexed this prefix
    length: int  # tokens of the prompt covered by the indexed prefix
    record: SessionRecord  # the session's current record (its version may be newer)


def prefix_digests(tokens: Sequence[int], lengths: Iterable[int]) -> dict[int, str]:
    """BLAKE2b-128 hex digest of ``tokens[:L]`` for each L in ``lengths`` with 0 < L <= len(tokens).

    One pass over the tokens: the hash state is copied at each length (ascending)."""
    wanted = sorted({n for n in lengths if 0 < n <= len(tokens)})
    if not wanted:
        return {}
    ids = array("I", tokens)  # (T,) uint32
    if sys.byteorder == "big":
        ids.byteswap()
    data = memoryview(ids.tobytes())  # little-endian, 4 bytes a token
    hasher = hashlib.blake2b(digest_size=16)
    out, done = {}, 0
    for n in wanted:
        hasher.update(data[4 * done : 4 * n])
        done = n
        out[n] = hasher.copy().hexdigest()
    return out


class SharedIndex:
    """The Redis-backed index; one per replica, safe to use from several threads (redis-py pools)."""

    def __init__(
        self,
        client: redis.Redis,
        replica: str,
        ttl_s: float,
        namespace: str = DEFAULT_NAMESPACE,
        retry_after_s: float = 1.0,
    ) -> None:
        self.client = client
        self.replica = replica
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.ns = namespace
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._healthy = True
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._publish = client.register_script(_PUBLISH)
        self._held: dict[str, Lease] = {}
        self._held_lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_url(cls, url: str, replica: str, ttl_s: float, namespace: str = DEFAULT_NAMESPACE,
                 timeout_s: float = 0.5, **kwargs) -> SharedIndex:
        """``redis://host:port/db`` with short timeouts, so a dead Redis costs a request little."""
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      decode_responses=True)
        return cls(client, replica, ttl_s, namespace, **kwargs)

    # ----- health ------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False since the last call that could not reach Redis, until one that could."""
        return self._healthy

    def ping(self) -> bool:
        """Try Redis now (ignoring the back-off); updates and returns ``healthy``."""
        self._down_until = 0.0
        try:
            self._call(self.client.ping)
        except IndexUnavailable:
            return False
        return True

    def _call(self, fn, *args, **kwargs):
        if time.monotonic() < self._down_until:
            raise IndexUnavailable("redis unavailable (backing off)")
        try:
            result = fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if self._healthy:
                log.warning("shared index: redis unavailable: %s", exc)
            self._healthy = False
            self._down_until = time.monotonic() + self.retry_after_s
            raise IndexUnavailable(str(exc)) from exc
        if not self._healthy:
            log.info("shared index: redis reachable again")
        self._healthy = True
        return result

    # ----- keys --------------------------------------------------------------------------------------
    def _session_key(self, session_id: str) -> str:
        return f"{self.ns}session:{session_id}"

    def _lease_key(self, session_id: str) -> str:
        return f"{self.ns}lease:{session_id}"

    def _prefix_key(self, owner: str, digest: str) -> str:
        return f"{self.ns}prefix:{owner}:{digest}"

    # ----- leases ------------------------------------------------------------------------------------
    def acquire_lease(self, session_id: str, ttl_ms: int = LEASE_TTL_MS, wait_s: float = 0.0) -> Lease | None:
        """The write lease of ``session_id`` for this replica (``SET NX PX``), or None if another holds it.

        ``wait_s`` > 0 polls until then (a crashed holder's lease lapses after its TTL)."""
        token = f"{self.replica}/{secrets.token_hex(8)}"
        deadline = time.monotonic() + wait_s
        while True:
            if self._call(self.client.set, self._lease_key(session_id), token, nx=True, px=ttl_ms):
                return Lease(session_id, self.replica, token, ttl_ms)
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def renew_lease(self, lease: Lease, ttl_ms: int | None = None) -> bool:
        """Extend a lease we hold; False (and ``lease.lost``) if it lapsed or someone else holds it now."""
        ttl = ttl_ms or lease.ttl_ms
        ok = bool(self._call(self._renew, keys=[self._lease_key(lease.session_id)], args=[lease.token, ttl]))
        if not ok:
            lease.lost = True
        return ok

    def release_lease(self, lease: Lease) -> bool:
        """Give a lease back (compare-and-delete: never someone else's). Also stops keeping it alive."""
        self.forget(lease)
        return bool(self._call(self._release, keys=[self._lease_key(lease.session_id)], args=[lease.token]))

    def lease_holder(self, session_id: str) -> str | None:
        """The replica holding the session's lease, if any."""
        value = self._call(self.client.get, self._lease_key(session_id))
        return value.rsplit("/", 1)[0] if value else None

    def keep_alive(self, lease: Lease) -> None:
        """Renew ``lease`` every third of its TTL from a background thread until released or lost."""
        with self._held_lock:
            self._held[lease.session_id] = lease
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep, name="lease-keeper", daemon=True)
                self._keeper.start()

    def forget(self, lease: Lease) -> None:
        with self._held_lock:
            if self._held.get(lease.session_id) is lease:
                del self._held[lease.session_id]

    def _keep(self) -> None:
        period = LEASE_TTL_MS / 3000
        while not self._stop.wait(period):
            with self._held_lock:
                leases = list(self._held.values())
            period = min([lease.ttl_ms for lease in leases] + [LEASE_TTL_MS]) / 3000
            for lease in leases:
                try:
                    if not self.renew_lease(lease):
                        log.warning("session %s: write lease lost", lease.session_id)
                        self.forget(lease)
                except IndexUnavailable:
                    pass  # retried next round; the lease may lapse meanwhile

    def close(self) -> None:
        """Stop renewing, release every held lease (best effort) and close the connection pool."""
        self._stop.set()
        with self._held_lock:
            leases = list(self._held.values())
        for lease in leases:
            try:
                self.release_lease(lease)
            except IndexUnavailable:
                break
        self.client.close()

    # ----- versions and records ----------------------------------------------------------------------
    def allocate_version(self, session_id: str) -> int:
        """A version number never handed out before for this session (INCR): name the file with it."""
        key = f"{self.ns}version:{session_id}"
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(key)
        pipe.pexpire(key, self.ttl_ms)
        return int(self._call(pipe.execute)[0])

    def publish(
        self,
        session_id: str,
        owner: str,
        version: int,
        file: str,
        tokens: Sequence[int],
        boundaries: Iterable[int] = (),
        lease: Lease | None = None,
    ) -> SessionRecord:
        """Make ``version`` (already written as ``file``) the session's current one, and index the prefixes
        of ``tokens`` (the saved stream) at ``boundaries`` plus its full length.

        Raises :class:`PublishRejected` when the index already has this or a newer version, when the id
        belongs to another owner, or when ``lease`` is given and no longer held."""
        now = time.time()
        lease_token = lease.token if lease is not None else ""
        status = self._call(
            self._publish,
            keys=[self._session_key(session_id), self._lease_key(session_id), f"{self.ns}owned:{owner}"],
            args=[version, owner, file, len(tokens), self.replica, repr(now), self.ttl_ms, lease_token, session_id],
        )
        if status != 1:
            reason = {-1: "not newer than the indexed version", -2: "another owner's session",
                      -3: "write lease not held"}.get(status, f"status {status}")
            raise PublishRejected(f"session {session_id} v{version}: {reason}")
        digests = prefix_digests(tokens, [*boundaries, len(tokens)])
        bounds_key = f"{self.ns}bounds:{owner}"
        pipe = self.client.pipeline(transaction=False)
        for digest in digests.values():
            pipe.set(self._prefix_key(owner, digest), f"{session_id}@{version}", px=self.ttl_ms)
        if digests:
            pipe.zadd(bounds_key, {str(n): now for n in digests})
        pipe.zremrangebyscore(bounds_key, "-inf", now - self.ttl_ms / 1000)
        pipe.pexpire(bounds_key, self.ttl_ms)
        self._call(pipe.execute)
        return SessionRecord(session_id, owner, version, file, len(tokens), self.replica, now)

    def lookup(self, session_id: str) -> SessionRecord | None:
        """The session's current record, or None if the index does not know it (never published/expired)."""
        return _record(session_id, self._call(self.client.hgetall, self._session_key(session_id)))

    def owned(self, owner: str) -> list[SessionRecord]:
        """Every indexed session of ``owner``, most recently published first."""
        ids = self._call(self.client.zrevrange, f"{self.ns}owned:{owner}", 0, -1)
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for session_id in ids:
            pipe.hgetall(self._session_key(session_id))
        records = [_record(i, h) for i, h in zip(ids, self._call(pipe.execute), strict=True)]
        return [r for r in records if r is not None and r.owner == owner]

    def delete(self, session_id: str, owner: str) -> None:
        """Forget a session (its prefix keys then point nowhere and are skipped until they expire)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self._session_key(session_id), f"{self.ns}version:{session_id}")
        pipe.zrem(f"{self.ns}owned:{owner}", session_id)
        self._call(pipe.execute)

    # ----- prefix lookup -----------------------------------------------------------------------------
    def find_by_prefix(self, owner: str, prompt: Sequence[int]) -> PrefixMatch | None:
        """The session of ``owner`` whose indexed prefix is the longest prefix of ``prompt`` (module doc).

        Three round trips: the owner's lengths, the keys of those lengths, the candidates' records."""
        now = time.time()
        lengths = self._call(self.client.zrangebyscore, f"{self.ns}bounds:{owner}", now - self.ttl_ms / 1000, "+inf")
        digests = prefix_digests(prompt, (int(n) for n in lengths))
        if not digests:
            return None
        ordered = sorted(digests, reverse=True)  # longest first
        hits = self._call(self.client.mget, [self._prefix_key(owner, digests[n]) for n in ordered])
        candidates = [(n, hit.rsplit("@", 1)) for n, hit in zip(ordered, hits, strict=True) if hit]
        if not candidates:
            return None
        ids = list(dict.fromkeys(sid for _, (sid, _) in candidates))
        pipe = self.client.pipeline(transaction=False)
        for session_id in ids:
            pipe.hgetall(self._session_key(session_id))
        records = {i: _record(i, h) for i, h in zip(ids, self._call(pipe.execute), strict=True)}
        for n, (session_id, version) in candidates:
            record = records[session_id]
            if record is not None and record.owner == owner and int(version) <= record.version:
                return PrefixMatch(session_id, int(version), n, record)
        return None


def _record(session_id: str, fields: dict[str, str] | None) -> SessionRecord | None:
    if not fields or "version" not in fields:
        return None
    return SessionRecord(
        session_id=session_id,
        owner=fields.get("owner", ""),
        version=int(fields["version"]),
        file=fields.get("file", ""),
        tokens=int(fields.get("tokens", 0)),
        replica=fields.get("replica", ""),
        updated=float(fields.get("updated", 0.0)),
    )
