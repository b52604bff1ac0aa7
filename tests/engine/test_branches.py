"""Branching conversations, pinning changes and failed steps: a session's cache must always hold exactly
what feeding its stream afresh (with the request's pinning) would have produced."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from tests.engine.generation import reply
from tests.tiny_models import tiny_engine

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


class Conversation:
    """A stateless client: resends the whole history each turn."""

    def __init__(self, engine, system: str | None = None, pin: bool = False) -> None:
        self.engine, self.pin = engine, pin
        self.messages = [{"role": "system", "content": system}] if system else []
        self.cached: list[tuple[int, int]] = []  # (cached_tokens, previous prompt tokens) per turn
        self.previous = 0

    async def say(self, text: str, **kwargs):
        self.messages.append({"role": "user", "content": text})
        prompt, pinned = self.engine.render_chat(self.messages, pin_system=self.pin)
        tokens, finish, admission = await reply(self.engine, prompt, GREEDY, pin_prefix=pinned, **kwargs)
        self.messages.append({"role": "assistant", "content": self.engine.tokenizer.decode(tokens)})
        self.cached.append((finish.usage.cached_tokens, self.previous))
        self.previous = len(prompt)
        return finish, admission


def long_turn(i: int) -> str:
    return f"turn {i}: " + "the quick brown fox jumps over the lazy dog " * 3


@pytest.fixture
def engine(tmp_path):
    eng = tiny_engine(tmp_path, window=124, max_positions=256)
    yield eng
    eng.stop()


async def test_branches_never_destroy_each_other(engine):
    a = Conversation(engine)
    for i in range(6):
        finish, _ = await a.say(long_turn(i))
    assert finish.usage.evicted_tokens > 0  # A grew past the window
    b = Conversation(engine)
    for i in range(3):
        await b.say(long_turn(i))  # the same first three turns as A
    b.messages[-1]["content"] += " (edited)"  # B differs from here on
    for i in range(2):
        await b.say(f"branch question {i} " * 4)
    await a.say(long_turn(6))  # A continues at turn 7
    await b.say("and one more")  # B continues at its turn 3
    for conversation in (a, b):
        cached, previous = conversation.cached[-1]
        assert cached >= 0.9 * previous, conversation.cached


async def test_replaying_a_conversation_twice_keeps_every_turn_cached(engine):
    for _ in range(2):
        run = Conversation(engine)
        for i in range(9):
            await run.say(long_turn(i))
        for cached, previous in run.cached[1:]:
            assert cached >= 0.9 * previous, run.cached


def check_pinned_region(engine, session_id: str, prompt: list[int], pin_prefix: int) -> None:
    """The session continues ``prompt`` and its pinned slots hold exactly what a fresh session pinning
    ``pin_prefix`` computes for them (the pinned slots never move, so this is history-independent)."""
    store, cache, runner = engine.scheduler.store, engine.scheduler.cache, engine.scheduler.runner
    session = store.sessions[session_id]
    assert session.tokens[: len(prompt)] == prompt
    pinned = engine.pinned_slots(pin_prefix)
    row = session.row
    assert cache.pinned[row] == pinned
    spare = store.rows.free_row()
    cache.reset(spare, pinned)
    runner.prefill(spare, prompt[:pinned], engine.config.chunk_size)
    for layer in range(cache.shape.num_layers):
        torch.testing.assert_close(cache.k[layer][row, :, :pinned], cache.k[layer][spare, :, :pinned])
        torch.testing.assert_close(cache.v[layer][row, :, :pinned], cache.v[layer][spare, :, :pinned])


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("switch", ["pin-on", "pin-off", "system-changed"])
async def test_pinning_changes_never_reuse_a_stale_prefix(engine, named, switch):
    system = "You keep the lighthouse and remember the passkey 71432."
    first_pin = switch != "pin-on"
    convo = Conversation(engine, system=system, pin=first_pin)
    kwargs = {"session_id": "s1"} if named else {}
    for i in range(3):
        await convo.say(long_turn(i), **kwargs)
    if switch == "system-changed":
        convo.messages[0]["content"] = system.replace("71432", "99999")
    else:
        convo.pin = not first_pin
    before = convo.previous
    finish, admission = await convo.say("what is the passkey?", **kwargs)
    prompt, pinned = engine.render_chat(convo.messages[:-1], pin_system=convo.pin)
    assert finish.usage.pinned_tokens == engine.pinned_slots(pinned)
    assert finish.usage.cached_tokens <= engine.pinned_slots(21 if convo.pin else 0) < before  # evicted: re-streamed
    check_pinned_region(engine, admission.session_id, prompt, pinned)


async def test_a_failed_step_leaves_the_session_as_it_was(engine, tmp_path):
    reference = tiny_engine(tmp_path / "reference", window=124, max_positions=256)
    try:
        convos = [Conversation(engine), Conversation(reference)]
        for i in range(4):  # past the window: the failing step must undo an eviction too
            for c in convos:
                await c.say(long_turn(i), session_id="s")
        runner = engine.scheduler.runner
        real_forward = runner.model.forward

        def broken(*args, **kwargs):
            real_forward(*args, **kwargs)  # the cache is written, then the pass fails
            raise RuntimeError("injected failure")

        runner.model.forward = broken
        runner._decode_forward = broken
        convos[0].messages.append({"role": "user", "content": long_turn(99)})
        prompt, _ = engine.render_chat(convos[0].messages)
        _, finish, _ = await reply(engine, prompt, session_id="s")
        assert finish.finish_reason == "error" and "injected failure" in finish.error
        convos[0].messages.pop()
        assert engine.health()[0]
        for _ in range(3):
            _, finish, _ = await reply(engine, prompt, session_id="s")
        healthy, why = engine.health()
        assert not healthy and "injected failure" in why
        runner.model.forward = runner._decode_forward = real_forward
        outputs = []
        for c in convos:
            finish, _ = await c.say(long_turn(4), session_id="s")
            outputs.append(c.messages[-1]["content"])
        assert outputs[0] == outputs[1]
        assert engine.health() == (True, None)
    finally:
        reference.stop()


async def test_a_float32_session_loads_into_a_bfloat16_engine(tmp_path):
    first = tiny_engine(tmp_path)
    convo = Conversation(first)
    await convo.say(long_turn(0), session_id="s")
    first.stop()
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.model.loader import prepare
    from tests.tiny_models import tiny_chat_engine_parts

    model, tokenizer = tiny_chat_engine_parts()  # the same seed: the same weights as `first`
    config = EngineConfig(sink_tokens=4, window=60, evict_block=8, prefill_chunk=32, data_dir=tmp_path / "sessions")
    second = Engine(config, prepare(model.to(torch.bfloat16), tokenizer, "tiny-llama", config)).start()
    try:
        assert second.scheduler.cache.dtype == torch.bfloat16
        convo.engine = second
        finish, _ = await convo.say("and then?", session_id="s")
        assert finish.finish_reason == "length" and finish.usage.cached_tokens > 0
        row = second.scheduler.store.sessions["s"].row
        assert second.scheduler.cache.k[0][row].dtype == torch.bfloat16
    finally:
        second.stop()


def test_open_settings_are_decided_by_the_device(engine):
    from engine.model.device import CPU_CACHE_BUDGET_BYTES, CPU_MAX_BATCH

    assert engine.config.max_batch == CPU_MAX_BATCH  # the tiny engine leaves both open
    assert engine.config.memory_budget_bytes == CPU_CACHE_BUDGET_BYTES
    assert engine.scheduler.cache.rows == min(CPU_CACHE_BUDGET_BYTES // engine.scheduler.cache.bytes_per_row,
                                              engine.config.max_resident_sessions)
