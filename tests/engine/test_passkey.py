"""Issue 16 with the embedded model: a pinned system prompt survives thousands of evicted tokens, also
when the same conversation was first sent unpinned (a session that must not be reused as it is)."""

from __future__ import annotations

from importlib import resources

import pytest

from engine import FinishEvent, SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine

pytestmark = pytest.mark.slow

SYSTEM = "The secret passkey is 71432. When asked, reply with the passkey."
PASSKEY = "71432"
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine(EngineConfig(data_dir=tmp_path_factory.mktemp("sessions"))).start()
    yield eng
    eng.stop()


def passkey_messages(engine) -> list[dict]:
    text = resources.files("engine").joinpath("data/tinyshakespeare.txt").read_text()
    ids = engine.tokenizer.encode(text[:20000])[:3000]
    filler = engine.tokenizer.decode(ids)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": filler + "\n\nWhat is the secret passkey?"}]


async def ask(engine, messages, pin: bool, **kwargs):
    prompt, pinned = engine.render_chat(messages, pin_system=pin)
    gen = await engine.generate(prompt, GREEDY, pin_prefix=pinned, **kwargs)
    text = ""
    async for event in gen:
        text += event.text
        if isinstance(event, FinishEvent):
            return text, event.usage, gen.admission


@pytest.mark.parametrize("session_id", [None, "passkey-named"])
async def test_pinned_passkey_survives_after_an_unpinned_run(engine, session_id):
    messages = passkey_messages(engine)
    _, unpinned, first = await ask(engine, messages, pin=False, session_id=session_id)
    assert unpinned.evicted_tokens > 2000 and unpinned.pinned_tokens == engine.config.sink_tokens
    answer, pinned, second = await ask(engine, messages, pin=True, session_id=session_id)
    assert pinned.evicted_tokens > 2000 and pinned.pinned_tokens > 10
    assert pinned.cached_tokens <= engine.config.sink_tokens  # the unpinned cache could not be reused
    assert PASSKEY in answer, answer
    # and back: the unpinned request never inherits the pinned prefix: it branches off the unpinned
    # conversation (left intact by the pinned fork) or, when the session is named, re-streams it
    _, again, third = await ask(engine, messages, pin=False, session_id=session_id)
    assert again.pinned_tokens == engine.config.sink_tokens
    if session_id is None:
        assert second.session_id != first.session_id
        assert third.session_id != second.session_id and again.cached_tokens == again.prompt_tokens - 1
    else:
        assert again.cached_tokens <= engine.config.sink_tokens
