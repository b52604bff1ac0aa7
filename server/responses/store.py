"""Stored responses: what ``previous_response_id``, ``GET /v1/responses/{id}`` and its input items read.

A stored response is one JSON file, ``<data_dir>/responses/<id>.json``, next to the session files:
the response object as returned, the input items of its request, the owner (a hash of the API key,
``engine.engine.owner_of``), the session that produced it, that session's stream length after it, and
the conversation it represents (the input messages after the instructions, and the output) so a later
response can render the whole chain without walking it. Each file is self-contained: deleting one
response never breaks a later one that chained from it.

Files are written atomically (temporary file, fsync, rename, fsync of the folder), so a kill -9 leaves
either the old state or the new one. A response expires ``ttl_s`` after its creation, the session TTL
(``EngineConfig.session_ttl_s``): an expired file is removed when it is looked up, and by a sweep (by
file modification time) at most once a minute when new responses are saved.

Each API key keeps at most ``max_per_owner`` stored responses (``MAX_PER_OWNER``, 1,000): :meth:`full`
says when a key has reached it (after sweeping expired ones), and the route then refuses to create a
stored response (a 429 in OpenAI's shape; ``store: false`` responses are not counted). Which key owns
which file is indexed in memory, read from the files on first use.

Reads and writes block on the file system: call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESPONSE_ID = re.compile(r"^resp_[A-Za-z0-9]{1,128}$")
FORMAT_VERSION = 1
SWEEP_EVERY_S = 60.0
MAX_PER_OWNER = 1000  # stored responses per API key


@dataclass
class StoredResponse:
    id: str
    owner: str
    created_at: float
    session_id: str
    stream_tokens: int  # the session's stream length once this response was generated
    messages: list[dict[str, Any]]  # the conversation up to and including the output (no instructions)
    input_items: list[dict[str, Any]]  # this request's input items, with ids, as input_items lists them
    response: dict[str, Any]  # the response object as returned
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)


class ResponseStore:
    """One folder of stored responses, scoped by owner, expiring after ``ttl_s``, at most ``max_per_owner``
    per owner."""

    def __init__(self, root: Path, ttl_s: float, max_per_owner: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self.max_per_owner = MAX_PER_OWNER if max_per_owner is None else max_per_owner
        self._owners: dict[str, str] | None = None  # response id -> owner, read on first use
        self._lock = threading.Lock()
        self._last_sweep = 0.0  # the first put sweeps (off the event loop, like every call here)
        for stale in self.root.glob(".*.tmp"):  # a write interrupted by a crash
            stale.unlink(missing_ok=True)

    def path(self, response_id: str) -> Path | None:
        """The file of ``response_id``; ``None`` for anything that is not a plain response id."""
        if not isinstance(response_id, str) or not RESPONSE_ID.match(response_id):
            return None
        return self.root / f"{response_id}.json"

    def put(self, record: StoredResponse) -> None:
        path = self.path(record.id)
        assert path is not None, record.id
        data = json.dumps(asdict(record), separators=(",", ":")).encode()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.root)
        with self._lock:
            self._index()[record.id] = record.owner
        if time.time() - self._last_sweep > SWEEP_EVERY_S:
            self.sweep()

    def count(self, owner: str) -> int:
        with self._lock:
            return Counter(self._index().values())[owner]

    def full(self, owner: str) -> bool:
        """Whether ``owner`` has ``max_per_owner`` stored responses (expired ones swept first)."""
        if self.count(owner) < self.max_per_owner:
            return False
        self.sweep()
        return self.count(owner) >= self.max_per_owner

    def _index(self) -> dict[str, str]:
        """Response id -> owner of every stored file (call with the lock held)."""
        if self._owners is None:
            self._owners = {}
            for path in self.root.glob("resp_*.json"):
                record = self._read(path)
                if record is not None:
                    self._owners[record.id] = record.owner
        return self._owners

    def _forget(self, response_id: str) -> None:
        with self._lock:
            if self._owners is not None:
                self._owners.pop(response_id, None)

    def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """The stored response, or ``None`` when unknown, deleted, expired or someone else's."""
        path = self.path(response_id)
        if path is None:
            return None
        record = self._read(path)
        if record is None or record.owner != owner:
            return None
        if self._expired(record):
            path.unlink(missing_ok=True)
            self._forget(response_id)
            return None
        return record

    def delete(self, owner: str, response_id: str) -> bool:
        if self.get(owner, response_id) is None:
            return False
        self.path(response_id).unlink(missing_ok=True)
        self._forget(response_id)
        _fsync_dir(self.root)
        return True

    def sweep(self) -> int:
        """Remove expired files; returns how many went. A file is written once, when its response is
        created, so its modification time is its creation time (no need to read it)."""
        self._last_sweep = time.time()
        removed = 0
        for path in self.root.glob("resp_*.json"):
            try:
                expired = self._last_sweep - path.stat().st_mtime > self.ttl_s
            except FileNotFoundError:
                continue
            if expired:
                path.unlink(missing_ok=True)
                self._forget(path.stem)
                removed += 1
        if removed:
            log.info("removed %d expired stored responses", removed)
        return removed

    def _expired(self, record: StoredResponse) -> bool:
        return time.time() - record.created_at > self.ttl_s

    def _read(self, path: Path) -> StoredResponse | None:
        try:
            data = json.loads(path.read_bytes())
            if data.get("format") != FORMAT_VERSION:
                return None
            return StoredResponse(**data)
        except FileNotFoundError:
            return None
        except Exception:  # a damaged or foreign file reads as absent, never as a server error
            log.warning("ignoring unreadable stored response %s", path.name)
            return None


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX: the folder entry lives in the folder's own blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
