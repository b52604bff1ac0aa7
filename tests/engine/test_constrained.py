"""Constrained generations through the engine: grammar masks on batched rows, beside free rows."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from engine import FinishEvent, InvalidRequest, SamplingParams
from engine.scheduling.grammar import Grammar
from tests.tiny_models import tiny_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "items": {"enum": ["sea", "hill", "port"]}, "maxItems": 3},
        "size": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                 "additionalProperties": False},
    },
    "required": ["city", "tags", "size"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = tiny_engine(tmp_path_factory.mktemp("constrained"), window=252, max_positions=512)
    yield eng
    eng.stop()


async def run(engine, prompt, params, **kwargs):
    gen = await engine.generate(prompt, params, **kwargs)
    text, tokens = "", []
    async for event in gen:
        text += event.text
        if isinstance(event, FinishEvent):
            return text, tokens, event
        tokens.append(event.token_id)


async def test_random_model_follows_the_schema_in_a_batch(engine):
    prompt = engine.render_chat([{"role": "user", "content": "a city as JSON"}])[0]
    grammar = Grammar.json_schema(SCHEMA)
    sampled = SamplingParams(max_tokens=120, temperature=1.0)
    jobs = [run(engine, prompt, SamplingParams(max_tokens=120, temperature=1.0, seed=i),
                constraint=await engine.constraint(grammar)) for i in range(4)]
    jobs += [run(engine, prompt, sampled) for _ in range(2)]  # unconstrained rows in the same batches
    results = await asyncio.gather(*jobs)
    for text, _, finish in results[:4]:
        assert finish.finish_reason == "stop", (finish, text)
        jsonschema.validate(json.loads(text), SCHEMA)
    free = [text for text, _, _ in results[4:]]
    assert not all(_is_json(t) for t in free)  # the mask applied to the constrained rows only


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


async def test_a_cut_reply_reports_length(engine):
    prompt = engine.render_chat([{"role": "user", "content": "JSON please"}])[0]
    constraint = await engine.constraint(Grammar.json_schema(SCHEMA))
    text, _, finish = await run(engine, prompt, SamplingParams(max_tokens=5, temperature=0), constraint=constraint)
    assert finish.finish_reason == "length" and text.startswith("{")


async def test_an_invalid_schema_is_refused_before_queueing(engine):
    with pytest.raises(InvalidRequest):
        await engine.constraint(Grammar.json_schema({"type": "object", "properties": {"a": {"type": "nonsense"}}}))
