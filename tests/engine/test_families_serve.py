"""Each family without sliding-window layers served end to end: a tiny random model of it (the embedded
model's tokenizer and chat template) behind a real uvicorn server, a 12-turn conversation through the
``openai`` SDK well past its 60-token window, each turn reusing at least 90% of the previous prompt from
the session's cache, every decode step on the family's owned step (``/health`` says so too)."""

from __future__ import annotations

import httpx
import pytest

from bench.load import BAN_SPECIAL
from server.app import create_app
from server.settings import Settings
from tests.engine.test_families_owned import Counting
from tests.server.conftest import LiveServer
from tests.tiny_models import tiny_family_engine

SERVED = {"llama3": "llama", "mistral": "llama", "qwen2_5": "llama", "qwen3": "qwen3", "phi3": "phi3",
          "phi3_longrope": "phi3"}
TURNS = 12
WORDS = "river stone lantern orchard meadow harbor violet copper thistle falcon".split()


def user_turn(turn: int) -> str:
    """About 25 tokens of a user message, different each turn."""
    words = [WORDS[(turn * 3 + i) % len(WORDS)] for i in range(14)]
    return f"Turn {turn}: tell me about the " + " and the ".join(words[:7]) + "."


@pytest.mark.parametrize("family", sorted(SERVED))
def test_twelve_turns_past_the_window_on_the_owned_step(family, tmp_path):
    from openai import OpenAI

    engine = tiny_family_engine(tmp_path, family)
    try:
        assert engine.model_info() == {"model_type": engine.loaded.model.config.model_type,
                                       "family": SERVED[family], "decode": "owned"}
        runner = engine.scheduler.runner
        runner.decoder = Counting(runner.decoder)
        server = LiveServer(create_app(Settings(), engine=engine)).start()
        try:
            client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
            messages = [{"role": "system", "content": "You are a terse guide."}]
            previous, evicted, generated = None, 0, 0
            for turn in range(TURNS):
                messages.append({"role": "user", "content": user_turn(turn)})
                reply = client.chat.completions.create(model=f"tiny-{family}", messages=messages, max_tokens=6,
                                                       temperature=0, logit_bias=BAN_SPECIAL)
                usage = reply.usage
                assert usage.completion_tokens == 6
                if previous is not None:
                    assert usage.prompt_tokens > previous
                    assert usage.prompt_tokens_details.cached_tokens >= 0.9 * previous, (turn, usage)
                previous, generated = usage.prompt_tokens, generated + usage.completion_tokens
                evicted = reply.model_extra["sinkserve"]["evicted_tokens"]
                messages.append({"role": "assistant", "content": reply.choices[0].message.content})
            health = httpx.get(f"{server.url}/health", timeout=30).json()
            assert health["model"] == engine.model_info()
        finally:
            server.stop()
        assert previous > 4 * engine.config.cache_size and evicted > 0  # well past the window
        assert runner.decoder.calls >= TURNS * 5  # every turn's decode steps after its first token
    finally:
        engine.stop()
