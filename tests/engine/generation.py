"""One generation through the engine, collected: the helper the engine tests share."""

from __future__ import annotations

from engine import FinishEvent, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


async def reply(engine, prompt, params=GREEDY, **kwargs):
    """Run one generation; returns (tokens, finish event, admission)."""
    gen = await engine.generate(prompt, params, **kwargs)
    tokens = []
    async for event in gen:
        if isinstance(event, FinishEvent):
            return tokens, event, gen.admission
        tokens.append(event.token_id)
    raise AssertionError("no finish event")
