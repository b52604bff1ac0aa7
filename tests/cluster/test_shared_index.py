"""engine/sessions/shared_index.py against a real redis-server (leases, versions, the prefix index, TTLs, outages)
and engine/sessions/versions.py (the versioned session files)."""

from __future__ import annotations

import hashlib
import os
import secrets
import time

import numpy as np
import pytest

from engine.sessions.shared_index import IndexUnavailable, PublishRejected, SharedIndex, prefix_digests
from engine.sessions.versions import (
    collect_garbage,
    collect_temp_files,
    next_local_version,
    parse_version_path,
    saved_versions,
    version_path,
)
from tests.cluster.redis_process import RedisProcess, needs_redis

pytestmark = needs_redis
TTL_S = 60.0


@pytest.fixture
def index(redis_server):
    idx = SharedIndex.from_url(redis_server.url, "replica-a", TTL_S, namespace=f"t{secrets.token_hex(4)}:")
    yield idx
    idx.close()


def other(index: SharedIndex, replica: str = "replica-b") -> SharedIndex:
    return SharedIndex(index.client, replica, TTL_S, namespace=index.ns)


# ----- leases -----------------------------------------------------------------------------------------
def test_lease_is_exclusive_and_released_only_by_its_holder(index):
    b = other(index)
    lease = index.acquire_lease("s1", ttl_ms=5000)
    assert lease is not None and index.lease_holder("s1") == "replica-a"
    assert b.acquire_lease("s1") is None
    # b forging a release with a token it does not hold changes nothing
    forged = type(lease)("s1", "replica-b", "replica-b/0000", 5000)
    assert b.release_lease(forged) is False and index.lease_holder("s1") == "replica-a"
    assert index.release_lease(lease) is True
    assert index.lease_holder("s1") is None
    assert b.acquire_lease("s1") is not None
    assert index.release_lease(lease) is False  # already gone: never deletes b's lease
    assert index.lease_holder("s1") == "replica-b"


def test_lease_expires_and_renewal_keeps_it(index):
    b = other(index)
    lease = index.acquire_lease("s2", ttl_ms=300)
    assert index.renew_lease(lease, 300)
    time.sleep(0.2)
    assert index.renew_lease(lease, 300)  # renewed before lapsing
    time.sleep(0.2)
    assert b.acquire_lease("s2") is None  # 0.4 s after acquiring, still held thanks to the renewal
    time.sleep(0.25)
    taken = b.acquire_lease("s2", wait_s=1.0)  # lapsed: a crashed holder frees the session
    assert taken is not None
    assert index.renew_lease(lease) is False and lease.lost


def test_acquire_waits_for_a_lapsing_lease(index):
    b = other(index)
    assert index.acquire_lease("s3", ttl_ms=300) is not None
    start = time.monotonic()
    assert b.acquire_lease("s3", wait_s=2.0) is not None
    assert 0.2 < time.monotonic() - start < 1.5


def test_keep_alive_renews_past_the_ttl(index, monkeypatch):
    import engine.sessions.shared_index as mod

    monkeypatch.setattr(mod, "LEASE_TTL_MS", 300)  # keeper period: 0.1 s
    lease = index.acquire_lease("s4", ttl_ms=300)
    short = index.acquire_lease("s4b", ttl_ms=150)  # renewed at its own pace
    index.keep_alive(short)
    index.keep_alive(lease)
    time.sleep(0.8)
    assert index.lease_holder("s4") == "replica-a" and index.lease_holder("s4b") == "replica-a"
    assert index.release_lease(lease) and index.lease_holder("s4") is None
    index.forget(short)
    time.sleep(0.4)
    assert index.lease_holder("s4b") is None  # no longer renewed: it lapsed


# ----- versions and records ---------------------------------------------------------------------------
def test_publish_lookup_and_version_order(index):
    assert index.lookup("s5") is None
    v1, v2 = index.allocate_version("s5"), index.allocate_version("s5")
    assert (v1, v2) == (1, 2)
    lease = index.acquire_lease("s5")
    rec = index.publish("s5", "owner1", v2, "s5.v2.safetensors", [1, 2, 3], lease=lease)
    assert index.lookup("s5") == rec
    assert (rec.version, rec.tokens, rec.replica, rec.owner) == (2, 3, "replica-a", "owner1")
    with pytest.raises(PublishRejected, match="not newer"):
        index.publish("s5", "owner1", v1, "s5.v1.safetensors", [1, 2], lease=lease)  # a late, older write
    with pytest.raises(PublishRejected, match="another owner"):
        index.publish("s5", "owner2", 9, "s5.v9.safetensors", [1], lease=lease)
    index.release_lease(lease)
    thief = other(index).acquire_lease("s5")
    with pytest.raises(PublishRejected, match="lease"):
        index.publish("s5", "owner1", 3, "s5.v3.safetensors", [1, 2, 3, 4], lease=lease)
    assert index.lookup("s5").version == 2
    other(index).publish("s5", "owner1", 3, "s5.v3.safetensors", [1, 2, 3, 4], lease=thief)
    assert index.lookup("s5").version == 3 and index.lookup("s5").replica == "replica-b"
    assert [r.session_id for r in index.owned("owner1")] == ["s5"] and index.owned("owner2") == []


def test_every_key_expires_with_the_session_ttl(index):
    index.publish("s6", "o", 1, "s6.v1.safetensors", list(range(10)), boundaries=[4])
    index.allocate_version("s6")
    keys = index.client.keys(f"{index.ns}*")
    assert len(keys) == 6  # session, version, owned, bounds, 2 prefixes
    for key in keys:
        assert 0 < index.client.pttl(key) <= TTL_S * 1000, key


def test_delete_forgets_the_session(index):
    index.publish("s7", "o", 1, "f", [5, 6, 7])
    index.delete("s7", "o")
    assert index.lookup("s7") is None and index.owned("o") == []
    assert index.find_by_prefix("o", [5, 6, 7, 8]) is None  # its prefix keys now point nowhere


# ----- prefix index -----------------------------------------------------------------------------------
def test_prefix_digests_match_hashing_each_prefix():
    tokens = list(np.random.default_rng(0).integers(0, 49152, 500))
    got = prefix_digests(tokens, [0, 1, 17, 17, 499, 500, 501])
    assert sorted(got) == [1, 17, 499, 500]
    for n, digest in got.items():
        raw = np.asarray(tokens[:n], dtype="<u4").tobytes()
        assert digest == hashlib.blake2b(raw, digest_size=16).hexdigest()


def test_find_by_prefix_takes_the_longest_indexed_prefix(index):
    system = list(range(100, 120))
    a_turn1 = system + [1, 2, 3, 4]
    a_stream = a_turn1 + [50, 51, 52]  # prompt of turn 1, then the reply
    b_stream = system + [9, 9, 9, 9, 60]
    index.publish("a", "o", 1, "a.v1.safetensors", a_stream, boundaries=[len(a_turn1)])
    index.publish("b", "o", 1, "b.v1.safetensors", b_stream, boundaries=[len(system) + 4])

    follow_up = a_stream + [7, 7, 7]
    match = index.find_by_prefix("o", follow_up)
    assert (match.session_id, match.version, match.length) == ("a", 1, len(a_stream))
    # the reply re-rendered differently: the prompt-end boundary still finds the session
    edited = a_turn1 + [50, 99, 99, 8]
    match = index.find_by_prefix("o", edited)
    assert (match.session_id, match.length) == ("a", len(a_turn1))
    assert index.find_by_prefix("o", b_stream + [1]).session_id == "b"
    assert index.find_by_prefix("o", system + [1, 2, 3]) is None  # shares only the system prompt
    assert index.find_by_prefix("o", a_stream[:-1]).length == len(a_turn1)
    assert index.find_by_prefix("someone-else", follow_up) is None  # scoped to the owner
    assert index.find_by_prefix("o", []) is None


def test_find_by_prefix_after_a_newer_version(index):
    turn1 = [1, 2, 3, 4, 5]
    index.publish("c", "o", 1, "c.v1.safetensors", turn1)
    turn2 = turn1 + [6, 7, 8]
    index.publish("c", "o", 2, "c.v2.safetensors", turn2, boundaries=[len(turn1) + 1])
    match = index.find_by_prefix("o", turn2 + [9])
    assert (match.version, match.length, match.record.version) == (2, len(turn2), 2)
    old = index.find_by_prefix("o", turn1 + [42])  # indexed by v1, the session is at v2 now
    assert (old.version, old.record.version, old.record.file) == (1, 2, "c.v2.safetensors")


def test_lookup_cost_is_one_pass_over_the_prompt(index):
    """50k-token stream with 50 turn boundaries: publishing and finding stay in milliseconds."""
    rng = np.random.default_rng(1)
    stream = [int(t) for t in rng.integers(0, 49152, 50_000)]
    bounds = list(range(1000, 50_000, 1000))
    index.publish("big", "o", 1, "big.v1.safetensors", stream, boundaries=bounds)
    start = time.perf_counter()
    match = index.find_by_prefix("o", stream + [1, 2, 3])
    elapsed = time.perf_counter() - start
    assert match.length == len(stream)
    assert elapsed < 0.5, elapsed


# ----- Redis down -------------------------------------------------------------------------------------
def test_redis_down_fails_soft_and_recovers(tmp_path):
    server = RedisProcess(tmp_path).start()
    idx = SharedIndex.from_url(server.url, "r", TTL_S, retry_after_s=0.3)
    try:
        idx.publish("d", "o", 1, "d.v1.safetensors", [1, 2, 3])
        assert idx.healthy
        server.stop()
        with pytest.raises(IndexUnavailable):
            idx.lookup("d")
        assert not idx.healthy
        start = time.monotonic()
        for call in (lambda: idx.find_by_prefix("o", [1, 2, 3]), lambda: idx.acquire_lease("d"),
                     lambda: idx.publish("d", "o", 2, "f", [1]), lambda: idx.allocate_version("d")):
            with pytest.raises(IndexUnavailable):
                call()
        assert time.monotonic() - start < 0.5  # backing off: no network wait per call
        assert idx.ping() is False
        server.start()
        assert idx.ping() is True and idx.healthy
        assert idx.lookup("d") is None  # a fresh Redis knows nothing: replicas fall back to their own files
    finally:
        idx.close()
        server.stop()


# ----- version files ----------------------------------------------------------------------------------
def test_version_files_and_garbage_collection(tmp_path):
    for v in (1, 2, 3, 5):
        version_path(tmp_path, "sess_x", v).write_bytes(b"x")
    version_path(tmp_path, "sess_xy", 9).write_bytes(b"y")  # another session sharing the prefix
    assert version_path(tmp_path, "sess_x", 3).name == "sess_x.v3.safetensors"
    assert parse_version_path(tmp_path / "sess_x.v12.safetensors") == ("sess_x", 12)
    assert parse_version_path("sess_x.safetensors") is None
    with pytest.raises(ValueError):
        version_path(tmp_path, "../etc", 1)
    assert [v for v, _ in saved_versions(tmp_path, "sess_x")] == [5, 3, 2, 1]
    assert next_local_version(tmp_path, "sess_x") == 6 and next_local_version(tmp_path, "sess_none") == 1
    removed = collect_garbage(tmp_path, "sess_x", current=3)
    assert sorted(p.name for p in removed) == ["sess_x.v1.safetensors"]
    assert [v for v, _ in saved_versions(tmp_path, "sess_x")] == [5, 3, 2]  # v5: not yet published
    assert collect_garbage(tmp_path, "sess_x", current=5, keep=1)
    assert [v for v, _ in saved_versions(tmp_path, "sess_x")] == [5]
    assert [v for v, _ in saved_versions(tmp_path, "sess_xy")] == [9]

    old, fresh = tmp_path / ".a.safetensors.1.tmp", tmp_path / ".b.safetensors.2.tmp"
    old.write_bytes(b""), fresh.write_bytes(b"")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert collect_temp_files(tmp_path, older_than_s=3600) == [old]
    assert fresh.exists() and not old.exists()
