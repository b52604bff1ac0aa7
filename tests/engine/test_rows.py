"""The pool's row table (engine/sessions/rows.py): one record of which session holds each cache row, read
both ways, changed only through assign / release / swap; and a store whose sessions move in and out of
the pool (a single server, and a cluster replica whose Redis is down) keeps it consistent; the engine
holds the one pool and lends it to the runner and the row table."""

from __future__ import annotations

import pytest
import torch

from engine.cache.sink import CacheShape, SinkCache
from engine.sessions.rows import RowTable
from engine.sessions.store import SessionStore


def pool(rows: int = 3) -> SinkCache:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    return SinkCache(CacheShape(num_layers=1, kv_heads=1, head_dim=8), rows, 16, 2, 4, [inv_freq])


def test_assign_release_swap_read_both_ways():
    cache = pool()
    table = RowTable(cache)
    table.assign(0, "a")
    table.assign(2, "b")
    assert (table.owner_of(0), table.owner_of(1), table.owner_of(2)) == ("a", None, "b")
    assert (table.row_of("a"), table.row_of("b"), table.row_of("c")) == (0, 2, None)
    assert table.free_row() == 1 and len(table) == 2 and table.holders() == ["a", "b"]
    with pytest.raises(RuntimeError):
        table.assign(0, "c")  # held
    with pytest.raises(RuntimeError):
        table.assign(1, "a")  # "a" holds a row already
    cache.step([0], 3)
    cache.k[0][0, :, :3] = 1.0
    table.swap(0, 1)  # into a free row: the contents move with the holder
    assert (table.owner_of(0), table.row_of("a")) == (None, 1)
    assert cache.k[0][1, :, :3].eq(1.0).all() and cache.k[0][0, :, :3].eq(0.0).all()
    assert (cache.lengths[0], cache.lengths[1]) == (0, 3)
    table.swap(1, 2)
    assert (table.row_of("a"), table.row_of("b")) == (2, 1)
    assert table.release("a") == 2 and table.release("a") is None
    assert table.owner_of(2) is None and table.row_of("a") is None and len(table) == 1


def consistent(store: SessionStore) -> None:
    resident = [s for s in store.sessions.values() if s.row is not None]
    assert sorted(store.rows.holders()) == sorted(s.id for s in resident)
    for session in resident:
        assert store.rows.owner_of(session.row) == session.id
        assert session.location == "device"


def test_residency_changes_keep_one_record(tmp_path):
    store = SessionStore(pool(2), tmp_path, 1 << 20, 3600.0)
    sessions = [store.create("owner") for _ in range(4)]
    for session in sessions:  # two rows for four sessions: each one moves the oldest out
        store.make_resident(session, set())
        consistent(store)
    assert [s.location for s in sessions] == ["host", "host", "device", "device"]
    child = store.fork(sessions[3], 0, 2, {sessions[3].id})
    consistent(store)
    assert child.row is not None and sessions[3].row is not None and sessions[2].row is None
    store.compact([child, sessions[3]])
    assert (child.row, sessions[3].row) == (0, 1)
    consistent(store)
    store.delete(child)
    consistent(store)
    assert store.rows.free_row() == 0 and store.resident_bytes() == store.cache.bytes_per_row
    store.close()


def test_a_cluster_replica_forgets_its_rows(tmp_path):
    from engine.sessions.cluster import ClusterSessionStore

    store = ClusterSessionStore.connect(pool(2), tmp_path, 1 << 20, 3600.0, url="redis://127.0.0.1:1/0",
                                        replica="r", model="tiny")  # nothing listens: Redis is down
    try:
        session = store.create("owner")
        store.make_resident(session, set())
        assert store.expire(now=session.last_used + 7200.0) == 1
        assert session.row is None and len(store.rows) == 0 and not store.sessions
        other = store.create("owner")
        store.make_resident(other, set())
        store.delete(other)
        assert other.row is None and store.rows.free_row() == 0
    finally:
        store.close()


def test_the_engine_lends_its_one_pool(tmp_path):
    from tests.tiny_models import tiny_engine

    engine = tiny_engine(tmp_path)
    try:
        scheduler = engine.scheduler
        assert isinstance(engine.cache, SinkCache)
        assert scheduler.runner.cache is engine.cache and scheduler.store.rows.cache is engine.cache
        assert scheduler.cache is engine.cache and scheduler.store.cache is engine.cache
        session = scheduler.store.create("owner")
        assert not hasattr(session, "cache") and session.rows is scheduler.store.rows
    finally:
        engine.stop()
