"""A pinned system prompt stays in the cache, unchanged, however long the conversation grows."""

from __future__ import annotations

import torch

from engine import FinishEvent, SamplingParams
from tests.tiny_models import tiny_engine


async def test_pinned_system_prompt_is_never_evicted(tmp_path):
    engine = tiny_engine(tmp_path, window=92)
    try:
        messages = [{"role": "system", "content": "You are a lighthouse keeper."},
                    {"role": "user", "content": "tell me everything " * 60}]
        prompt, pinned = engine.render_chat(messages, pin_system=True)
        assert engine.render_chat(messages) == (prompt, 0)
        assert 4 < pinned < 48
        gen = await engine.generate(prompt, SamplingParams(max_tokens=4, temperature=0), pin_prefix=pinned)
        async for event in gen:
            if isinstance(event, FinishEvent):
                finish = event
        cache = engine.scheduler.cache
        row = engine.scheduler.store.sessions[gen.session_id].row
        assert finish.usage.evicted_tokens > 0
        assert cache.pinned[row] == pinned
        described = await engine.get_session(None, gen.session_id)
        assert described["pinned_tokens"] == pinned
        # the pinned slots hold exactly what a fresh prefill of the system prompt alone computes
        fresh = engine.scheduler.runner
        spare = (row + 1) % cache.rows
        cache.reset(spare, pinned)
        fresh.prefill(spare, prompt[:pinned], 32)
        for layer in range(cache.shape.num_layers):
            torch.testing.assert_close(cache.k[layer][row, :, :pinned], cache.k[layer][spare, :, :pinned])
    finally:
        engine.stop()
