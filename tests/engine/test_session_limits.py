"""Per-key bounds and names: a key's sessions and a session's branches are bounded (the least recently used
idle one dropped first, counted), and a session name belongs to the key that made it: another key naming
the same session gets its own, and never learns the first exists (engine/sessions/store.py)."""

from __future__ import annotations

import pytest

from engine import SamplingParams, SessionNotFound
from engine.engine import owner_of
from tests.engine.generation import reply
from tests.tiny_models import tiny_engine

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture
def engine(tmp_path):
    eng = tiny_engine(tmp_path)
    yield eng
    eng.stop()


def prompt(engine, text: str) -> list[int]:
    return engine.render_chat([{"role": "user", "content": text}])[0]


async def test_a_name_belongs_to_its_key(engine, tmp_path):
    _, _, a = await reply(engine, prompt(engine, "hello from a"), GREEDY, api_key="key-a", session_id="chat")
    assert a.session_id == "chat"
    with pytest.raises(SessionNotFound):
        await engine.get_session("key-b", "chat")
    b_prompt = prompt(engine, "b says something else entirely")
    _, finish, b = await reply(engine, b_prompt, GREEDY, api_key="key-b", session_id="chat")
    assert b.session_id == "chat" and finish.usage.cached_tokens == 0  # a session of its own, not A's
    seen_a, seen_b = await engine.get_session("key-a", "chat"), await engine.get_session("key-b", "chat")
    assert seen_a["id"] == seen_b["id"] == "chat"
    assert seen_b["tokens_seen"] == len(b_prompt) + GREEDY.max_tokens - 1
    assert seen_a["tokens_seen"] != seen_b["tokens_seen"]
    assert [s["id"] for s in await engine.list_sessions("key-b")] == ["chat"]
    await engine.delete_session("key-b", "chat")
    assert (await engine.get_session("key-a", "chat"))["tokens_seen"] == seen_a["tokens_seen"]  # A's untouched
    engine.stop()
    again = tiny_engine(tmp_path)  # the scoping survives a restart (the name is saved with the session)
    try:
        assert (await again.get_session("key-a", "chat"))["tokens_seen"] == seen_a["tokens_seen"]
        with pytest.raises(SessionNotFound):
            await again.get_session("key-b", "chat")
    finally:
        again.stop()


async def test_a_key_holds_at_most_its_bound_of_sessions(engine):
    store = engine.scheduler.store
    store.max_sessions_per_key = 3
    ids = [f"s{i}" for i in range(5)]
    for i in ids:  # five named sessions, used in turn
        await reply(engine, prompt(engine, f"topic {i}"), GREEDY, api_key="key-a", session_id=i)
    _, _, other = await reply(engine, prompt(engine, "another key"), GREEDY, api_key="key-b")
    kept = {s["id"] for s in await engine.list_sessions("key-a")}
    assert kept == set(ids[2:])  # the two least recently used went first
    assert store.counters["sessions_dropped"] == 2
    assert [s["id"] for s in await engine.list_sessions("key-b")] == [other.session_id]
    owner = owner_of("key-a")
    assert not any(store.path(store.scoped_id(owner, name)).exists() for name in ids[:2])  # their files too
    assert all(store.path(store.scoped_id(owner, name)).exists() for name in ids[2:])


async def test_a_session_holds_at_most_its_bound_of_branches(engine):
    store = engine.scheduler.store
    store.max_branches_per_session = 2
    base = prompt(engine, "hello there")
    tokens, _, first = await reply(engine, base, GREEDY, api_key="key-a")
    branches = []
    for k in range(1, 5):  # four edits of the reply's third token: each continues a copy
        _, _, admission = await reply(engine, base + tokens[:2] + [tokens[2] + k], GREEDY, api_key="key-a")
        branches.append(admission.session_id)
    assert len(set(branches)) == 4 and first.session_id not in branches
    kept = {s["id"] for s in await engine.list_sessions("key-a")}
    assert kept == {first.session_id, *branches[2:]}  # the original and the two newest branches
    assert store.counters["branches_dropped"] == 2
    assert {store.sessions[i].root for i in branches[2:]} == {first.session_id}


def test_bounds_must_be_positive(tmp_path):
    from engine.sessions.store import SessionStore

    with pytest.raises(ValueError, match="max_sessions_per_key"):
        SessionStore(None, tmp_path, 0, 60.0, max_sessions_per_key=0)
