"""Sessions through the engine: reuse, rollback, residency under a budget, restarts, isolation."""

from __future__ import annotations

import asyncio

import pytest

from engine import InvalidRequest, SamplingParams, SessionNotFound
from tests.engine.generation import reply
from tests.tiny_models import tiny_engine


def turn(engine, history, text):
    """Prompt tokens for ``history`` + a user message, as a stateless client would resend them."""
    messages = history + [{"role": "user", "content": text}]
    return engine.render_chat(messages)[0], messages


@pytest.fixture
def engine(tmp_path):
    eng = tiny_engine(tmp_path)
    yield eng
    eng.stop()


async def test_follow_up_reuses_the_whole_stream(engine):
    prompt, history = turn(engine, [], "tell me a story " * 30)  # longer than the 64-token cache
    tokens, first, admission = await reply(engine, prompt)
    assert first.usage.evicted_tokens > 0
    follow_up = prompt + tokens + engine.encode(" and then?")[1:]
    _, second, again = await reply(engine, follow_up)
    assert again.session_id == admission.session_id
    assert second.usage.cached_tokens == len(prompt) + len(tokens) - 1  # the last sampled token was never fed


async def test_an_edit_continues_a_copy_and_keeps_the_original(engine):
    prompt, _ = turn(engine, [], "hello")
    tokens, _, admission = await reply(engine, prompt)
    original = list(engine.scheduler.store.sessions[admission.session_id].tokens)
    edited = prompt + tokens[:3] + [tokens[3] + 1]  # diverges inside the window
    _, finish, again = await reply(engine, edited)
    assert again.session_id != admission.session_id  # a branch of its own
    assert finish.usage.cached_tokens == len(prompt) + 3
    assert engine.scheduler.store.sessions[admission.session_id].tokens == original  # untouched


async def test_a_named_session_rolls_back_in_place(engine):
    prompt, _ = turn(engine, [], "hello")
    tokens, _, admission = await reply(engine, prompt, session_id="named")
    edited = prompt + tokens[:3] + [tokens[3] + 1]
    _, finish, again = await reply(engine, edited, session_id="named")
    assert again.session_id == "named"
    assert finish.usage.cached_tokens == len(prompt) + 3
    _, finish, forked = await reply(engine, prompt + tokens[:2] + [tokens[2] + 1], session_id="named", fork=True)
    assert forked.session_id != "named" and finish.usage.cached_tokens == len(prompt) + 2
    assert engine.scheduler.store.sessions["named"].tokens[: len(edited)] == edited


async def test_same_seed_same_tokens_different_sessions(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    prompt, _ = turn(engine, [], "pick words")
    a, _, first = await reply(engine, prompt, params, session_id="sess_a")
    b, _, second = await reply(engine, prompt, params, session_id="sess_b")
    c, _, _ = await reply(engine, prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=8, ignore_eos=True),
                          session_id="sess_c")
    assert first.session_id != second.session_id
    assert a == b and a != c


async def test_hundred_sessions_under_a_budget_of_ten(tmp_path):
    ample = tiny_engine(tmp_path / "ample")
    tight = tiny_engine(tmp_path / "tight", memory_budget_bytes=10 * 64 * 512, host_budget_bytes=3 * 64 * 512)
    assert tight.scheduler.cache.rows == 10
    budget = tight.stats()["cache_budget_bytes"]
    try:
        histories = {}
        for i in range(100):
            prompt, _ = turn(tight, [], f"conversation {i} " * (1 + i % 7))
            for eng in (ample, tight):
                tokens, _, admission = await reply(eng, prompt, session_id=f"s{i}")
                histories.setdefault((eng is tight, i), prompt + tokens)
            assert tight.stats()["resident_cache_bytes"] <= budget
        assert tight.stats()["sessions"] == 100
        for i in range(100):
            outputs = []
            for eng in (ample, tight):
                follow = histories[(eng is tight, i)] + tight.encode(" more")[1:]
                tokens, finish, _ = await reply(eng, follow, session_id=f"s{i}")
                assert finish.usage.cached_tokens > 0
                outputs.append(tokens)
            assert outputs[0] == outputs[1], f"session {i} continued differently after offloading"
            assert tight.stats()["resident_cache_bytes"] <= budget
    finally:
        ample.stop()
        tight.stop()


async def test_restart_continues_from_the_saved_cache(tmp_path):
    first = tiny_engine(tmp_path)
    prompt, _ = turn(first, [], "remember this " * 20)
    tokens, _, admission = await reply(first, prompt)
    expected, _, _ = await reply(first, prompt + tokens + [42], session_id=admission.session_id)
    first.stop()  # persists the session
    # rebuild with the stream before the second turn to compare against
    second = tiny_engine(tmp_path)
    try:
        listed = await second.list_sessions(None)
        assert [s["id"] for s in listed] == [admission.session_id]
        assert listed[0]["location"] == "disk"
        again, finish, _ = await reply(second, prompt + tokens + [42] + expected + [43], session_id=admission.session_id)
        assert finish.usage.cached_tokens == len(prompt) + len(tokens) + 1 + len(expected) - 1
    finally:
        second.stop()


async def test_keys_are_isolated(engine):
    prompt, _ = turn(engine, [], "secret")
    _, _, admission = await reply(engine, prompt, api_key="key-a")
    sid = admission.session_id
    assert await engine.list_sessions("key-b") == []
    with pytest.raises(SessionNotFound):
        await engine.get_session("key-b", sid)
    with pytest.raises(SessionNotFound):
        await engine.delete_session("key-b", sid)
    with pytest.raises(SessionNotFound):
        await reply(engine, prompt, api_key="key-b", session_id=sid)
    # implicit matching never crosses keys: key-b gets a session of its own
    _, _, other = await reply(engine, prompt, api_key="key-b")
    assert other.session_id != sid
    assert (await engine.get_session("key-a", sid))["id"] == sid


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "..", "x" * 129, "sessión", "", "a b", "a\\b"])
async def test_malformed_session_ids_are_refused(engine, tmp_path, bad):
    prompt, _ = turn(engine, [], "hi")
    with pytest.raises((InvalidRequest, SessionNotFound)):
        await reply(engine, prompt, session_id=bad or None) if bad else engine.scheduler.store.path(bad)
    outside = list(tmp_path.parent.glob("**/passwd*"))
    assert outside == []


async def test_concurrent_sessions_batch_and_match_sequential(tmp_path):
    eng = tiny_engine(tmp_path)
    try:
        prompts = [turn(eng, [], f"topic {i} " * (i + 1))[0] for i in range(6)]
        sequential = [(await reply(eng, p, session_id=f"seq{i}"))[0] for i, p in enumerate(prompts)]
        results = await asyncio.gather(*[reply(eng, p, session_id=f"par{i}") for i, p in enumerate(prompts)])
        assert [r[0] for r in results] == sequential
    finally:
        eng.stop()


def test_compaction_puts_sessions_in_consecutive_rows_in_the_order_given(tmp_path):
    """A batch's rows are a view of the cache only when they are consecutive in the batch's order. Once
    conversations outnumber the rows, new ones get recycled rows in no particular order (those of the
    least recently used sessions): compaction must then order the rows as the batch lists its sessions,
    not by their old rows (which made every batched step gather a copy of all its rows, 3-4x slower, in
    a server that had served more conversations than it has rows). Each session's slots move with it."""
    import torch

    from engine.cache.sink import CacheShape, SinkCache
    from engine.sessions.store import SessionStore

    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    cache = SinkCache(CacheShape(num_layers=1, kv_heads=1, head_dim=8), 6, 16, 2, 4, [inv_freq])
    store = SessionStore(cache, tmp_path, 1 << 20, 3600.0)
    sessions = []
    for marker in range(6):
        session = store.create("owner")
        row = store.make_resident(session, set())
        cache.step([row], 3)
        cache.k[0][row, :, :3] = float(marker + 1)
        sessions.append(session)
    batch = [sessions[5], sessions[2], sessions[4]]  # rows 5, 2, 4: admitted in this order
    assert store.compact(batch) == [0, 1, 2]
    assert [s.row for s in batch] == [0, 1, 2]
    for session in sessions:  # every session's slots moved with it, the others' included
        marker = sessions.index(session) + 1
        assert store.rows.owner_of(session.row) == session.id
        assert cache.k[0][session.row, :, :3].eq(marker).all()

