"""Generation helpers the engine tests share: one generation through the engine, collected; greedy
decoding straight through a runner."""

from __future__ import annotations

import torch

from engine import FinishEvent, SamplingParams
from engine.model.runner import Runner

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


def greedy_decode(runner: Runner, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    """Prefill each prompt into its own row (0..B-1), then ``steps`` batched greedy decode steps: the tokens
    of each row and the last step's logits (B, V)."""
    rows = list(range(len(prompts)))
    last = [int(runner.prefill(row, p, 16).argmax()) for row, p in zip(rows, prompts, strict=True)]
    out = [[t] for t in last]
    for _ in range(steps):
        logits = runner.decode(rows, last)  # (B, V)
        last = logits.argmax(-1).tolist()
        for seq, token in zip(out, last, strict=True):
            seq.append(token)
    return out, logits
