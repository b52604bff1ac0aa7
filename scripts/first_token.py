"""The README's first question and the embedded model's sampling defaults: the first token's top
log-probabilities with and without the README's system message, and how often N sampled answers
(the model's default temperature/top_p, unseeded, fresh sessions) name Paris.

    .venv/bin/python scripts/first_token.py [--samples 20]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile

from engine import FinishEvent, SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine

QUESTION = {"role": "user", "content": "What is the capital of France?"}
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}


async def first_token(engine: Engine, messages: list[dict]) -> list[tuple[str, float]]:
    prompt, _ = engine.render_chat(messages)
    gen = await engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=True, top_logprobs=3),
                                api_key="first-token")
    top = []
    async for event in gen:
        if not isinstance(event, FinishEvent):
            top = [(t.token, round(t.logprob, 2)) for t in event.top_logprobs]
    return top


async def paris_rate(engine: Engine, messages: list[dict], samples: int) -> int:
    prompt, _ = engine.render_chat(messages)
    defaults = engine.loaded.sampling_defaults
    params = SamplingParams(max_tokens=40, temperature=defaults.get("temperature", 1.0), top_p=defaults.get("top_p", 1.0))
    hits = 0
    for i in range(samples):
        gen = await engine.generate(prompt, params, api_key=f"sample-{i}")  # a fresh session each
        text = "".join([event.text async for event in gen])
        hits += "Paris" in text
    return hits


async def main(samples: int) -> None:
    engine = Engine(EngineConfig(data_dir=tempfile.mkdtemp())).start()
    try:
        print(f"sampling defaults: {engine.loaded.sampling_defaults}")
        for name, messages in (("bare question", [QUESTION]), ("README body (system message)", [SYSTEM, QUESTION])):
            top = await first_token(engine, messages)
            hits = await paris_rate(engine, messages, samples)
            print(f"{name}: first-token top-3 {top}; Paris in {hits} of {samples} sampled answers")
    finally:
        engine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20)
    asyncio.run(main(parser.parse_args().samples))
