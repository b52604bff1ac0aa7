"""engine/sessions/cluster.py in-process: two tiny engines ("replicas") share one data directory and a
real redis-server. A conversation moved to the other replica resumes from the shared store with the
same greedy reply as one replica serving it throughout; a replica a conversation comes back to reloads
the newer version; with Redis down a replica keeps serving its local sessions and says so."""

from __future__ import annotations

import time

import pytest

from engine import FinishEvent, SamplingParams
from engine.errors import SessionNotFound
from tests.tiny_models import tiny_engine

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={0: -100, 1: -100, 2: -100})


async def reply(engine, prompt, **kwargs):
    gen = await engine.generate(prompt, GREEDY, **kwargs)
    tokens = []
    async for event in gen:
        if isinstance(event, FinishEvent):
            return tokens, event.usage, gen.admission
        tokens.append(event.token_id)
    raise AssertionError("no finish event")


class Conversation:
    """A client talking to whichever engine it is given each turn; stateless unless ``named``."""

    def __init__(self, name: str, named: bool = False) -> None:
        self.name, self.named = name, named
        self.messages: list[dict] = []
        self.session_id: str | None = None
        self.previous = 0

    async def say(self, engine, turn: int):
        self.messages.append({"role": "user", "content": f"{self.name} question {turn}: and then?"})
        prompt, _ = engine.render_chat(self.messages)
        kwargs = {"session_id": self.session_id or self.name} if self.named else {}
        tokens, usage, admission = await reply(engine, prompt, **kwargs)
        self.session_id = admission.session_id if self.named else None
        self.messages.append({"role": "assistant", "content": engine.tokenizer.decode(tokens)})
        previous, self.previous = self.previous, len(prompt)
        return tokens, usage, admission, previous


@pytest.fixture
def replicas(tmp_path, redis_server):
    redis_server.proc.poll() is None or redis_server.start()
    engines = [tiny_engine(tmp_path, window=124, max_positions=256, replica=name, session_store=redis_server.url)
               for name in ("a", "b")]  # both in tmp_path/sessions
    yield engines
    for engine in engines:
        engine.stop()


@pytest.fixture
def reference(tmp_path):
    engine = tiny_engine(tmp_path / "reference", window=124, max_positions=256)
    yield engine
    engine.stop()


@pytest.mark.parametrize("named", [False, True], ids=["stateless", "session-id"])
async def test_moved_conversation_resumes_from_the_shared_store(replicas, reference, named):
    a, b = replicas
    name = "named" if named else "stateless"
    expected, moved = Conversation(name, named), Conversation(name, named)
    # turns 1-3 on a, 4 on b (a "died"), 5 on a again (its copy is stale: it must reload), 6 on a
    route = [a, a, a, b, a, a]
    sources = []
    for turn, engine in enumerate(route, 1):
        ref_tokens, _, _, _ = await expected.say(reference, turn)
        tokens, usage, admission, previous = await moved.say(engine, turn)
        assert tokens == ref_tokens, f"turn {turn} on replica {engine.replica}"
        sources.append(admission.source)
        if turn > 1:
            assert usage.cached_tokens >= 0.8 * previous, (turn, usage, previous)
    assert sources == ["prefill", "local", "local", "shared", "shared", "local"]
    assert a.stats()["source_shared"] == 1 and b.stats()["source_shared"] == 1


async def test_a_new_replica_finds_nothing_stale_and_the_lease_is_free_after_a_turn(replicas):
    a, b = replicas
    conv = Conversation("lease", named=True)
    await conv.say(a, 1)
    index = a.scheduler.store.index
    assert index.lease_holder(conv.session_id) is None  # released once the turn was published
    record = index.lookup(conv.session_id)
    assert record is not None and record.replica == "a"
    _, usage, admission, previous = await conv.say(b, 2)
    assert admission.source == "shared" and usage.cached_tokens >= 0.8 * previous
    assert index.lookup(conv.session_id).version > record.version


async def test_a_leased_session_waits_for_its_writer(replicas):
    a, b = replicas
    conv = Conversation("busy", named=True)
    await conv.say(a, 1)
    lease = b.scheduler.store.index.acquire_lease(conv.session_id, ttl_ms=1500)  # b "is writing it"
    assert lease is not None
    started = time.monotonic()
    _, _, admission, _ = await conv.say(a, 2)  # waits until the lease lapses, then serves
    assert time.monotonic() - started >= 1.0
    assert admission.source == "local"


async def test_redis_down_serves_local_sessions_and_says_so(replicas, redis_server):
    a, _ = replicas
    conv = Conversation("down", named=True)
    await conv.say(a, 1)
    redis_server.stop()
    try:
        deadline = time.monotonic() + 5
        while a.session_store_status() != "down" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert a.session_store_status() == "down"
        for turn in (2, 3):
            _, usage, admission, previous = await conv.say(a, turn)
            assert admission.source == "local" and usage.cached_tokens >= 0.9 * previous
        assert a.health() == (True, None)
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    while a.session_store_status() != "up" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert a.session_store_status() == "up"
    _, usage, admission, previous = await conv.say(a, 4)
    assert admission.source == "local" and usage.cached_tokens >= 0.9 * previous


async def test_every_replica_lists_and_deletes_the_owners_sessions(replicas):
    a, b = replicas
    conv = Conversation("listed", named=True)
    await conv.say(a, 1)
    await conv.say(a, 2)
    listed = {s["id"]: s for s in await b.list_sessions(None)}
    assert conv.session_id in listed and listed[conv.session_id]["tokens_seen"] > 0
    assert (await b.get_session(None, conv.session_id))["tokens_seen"] == listed[conv.session_id]["tokens_seen"]
    await b.delete_session(None, conv.session_id)
    index = a.scheduler.store.index
    assert index.lookup(conv.session_id) is None
    assert not list(a.config.data_dir.glob(f"{conv.session_id}.v*.safetensors"))
    with pytest.raises(SessionNotFound):  # a's copy in memory is gone too
        await a.get_session(None, conv.session_id)


async def test_another_keys_name_is_its_own_session_on_any_replica(replicas):
    a, b = replicas
    prompt, _ = a.render_chat([{"role": "user", "content": "mine"}])
    await reply(a, prompt, session_id="private", api_key="k1")
    for engine in (a, b):
        with pytest.raises(SessionNotFound):
            await engine.get_session("k2", "private")
    for engine in (a, b):  # the same name under another key: a session of its own, never k1's
        _, _, admission = await reply(engine, prompt, session_id="private", api_key="k2")
        assert admission.session_id == "private"
        assert admission.source != "shared" or engine is b  # b may take k2's own session from a
    _, _, admission = await reply(b, prompt, session_id="private", api_key="k1")
    assert admission.source == "shared"
