"""Stored responses on disk: owner scoping, expiry, atomic files, ids that never reach the file system."""

from __future__ import annotations

import json
import os
import time

from server.responses.store import ResponseStore, StoredResponse


def record(response_id: str, owner: str = "owner-a", created_at: float | None = None) -> StoredResponse:
    return StoredResponse(
        id=response_id, owner=owner, created_at=time.time() if created_at is None else created_at,
        session_id="sess_1", stream_tokens=12, messages=[{"role": "user", "content": "hi"}],
        input_items=[{"id": "msg_1", "type": "message", "role": "user", "content": []}],
        response={"id": response_id, "object": "response"},
    )


def test_put_get_delete_scoped_to_the_owner(tmp_path):
    store = ResponseStore(tmp_path, ttl_s=3600)
    store.put(record("resp_abc"))
    assert store.get("owner-a", "resp_abc").messages == [{"role": "user", "content": "hi"}]
    assert store.get("owner-b", "resp_abc") is None
    assert not store.delete("owner-b", "resp_abc")
    assert ResponseStore(tmp_path, ttl_s=3600).get("owner-a", "resp_abc") is not None  # survives a restart
    assert store.delete("owner-a", "resp_abc")
    assert store.get("owner-a", "resp_abc") is None and not store.delete("owner-a", "resp_abc")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_expired_responses_are_gone(tmp_path):
    store = ResponseStore(tmp_path, ttl_s=60)
    store.put(record("resp_old", created_at=time.time() - 61))
    store.put(record("resp_new"))
    assert store.get("owner-a", "resp_old") is None
    assert not (tmp_path / "resp_old.json").exists()
    store.put(record("resp_older", created_at=time.time() - 120))
    old = time.time() - 120
    os.utime(tmp_path / "resp_older.json", (old, old))  # written two minutes ago
    restarted = ResponseStore(tmp_path, ttl_s=60)
    restarted.put(record("resp_newer"))  # the first save sweeps
    assert restarted.get("owner-a", "resp_new") is not None
    assert not (tmp_path / "resp_older.json").exists()


def test_bad_ids_and_damaged_files_read_as_absent(tmp_path):
    store = ResponseStore(tmp_path, ttl_s=3600)
    for bad in ("../resp_x", "resp_../../etc", "sess_1", "", "resp_" + "a" * 200):
        assert store.path(bad) is None and store.get("owner-a", bad) is None
    (tmp_path / "resp_broken.json").write_text("{not json")
    (tmp_path / "resp_future.json").write_text(json.dumps({"format": 99}))
    assert store.get("owner-a", "resp_broken") is None and store.get("owner-a", "resp_future") is None
    (tmp_path / ".resp_x.json.123.tmp").write_text("partial")
    ResponseStore(tmp_path, ttl_s=3600)
    assert not (tmp_path / ".resp_x.json.123.tmp").exists()  # an interrupted write is cleaned up


def test_each_owner_keeps_at_most_its_share(tmp_path):
    store = ResponseStore(tmp_path, ttl_s=3600, max_per_owner=2)
    store.put(record("resp_a1"))
    assert not store.full("owner-a")
    store.put(record("resp_a2"))
    assert store.full("owner-a") and not store.full("owner-b")  # another key's share is its own
    assert ResponseStore(tmp_path, ttl_s=3600, max_per_owner=2).full("owner-a")  # counted from the files
    assert store.delete("owner-a", "resp_a1")
    assert not store.full("owner-a")


def test_expired_responses_make_room(tmp_path):
    store = ResponseStore(tmp_path, ttl_s=60, max_per_owner=1)
    store.put(record("resp_old", created_at=time.time() - 120))
    old = time.time() - 120
    os.utime(tmp_path / "resp_old.json", (old, old))
    assert not store.full("owner-a")  # swept when the share looked full
    assert not (tmp_path / "resp_old.json").exists()
