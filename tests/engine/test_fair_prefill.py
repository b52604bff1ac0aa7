"""Fair prefill: a long prompt shares each step's prompt-token budget with the other requests, so a short
prompt admitted behind it gets its first token before the long one finishes prefilling, and the rows
already decoding advance every step meanwhile (engine/scheduling/scheduler.py ``_plan_prefill``)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine import FinishEvent, SamplingParams
from engine.config import EngineConfig
from engine.engine import Engine
from engine.model.linear import packed_bf16_supported
from engine.model.loader import prepare
from tests.tiny_models import tiny_chat_engine_parts

LONG, SHORT, DECODING = 600, 5, 3  # prompt lengths, which also tell the requests apart in the records
SHARE = 8  # the long prompt's tokens per step here: 75 steps of prefill
WAIT_S = 60  # how long the worker waits for the short request to be queued (a loaded host)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, ignore_eos=True, max_tokens=max_tokens)


async def collect(generation) -> list[int]:
    tokens = []
    async for event in generation:
        if isinstance(event, FinishEvent):
            return tokens
        tokens.append(event.token_id)
    raise AssertionError("no finish event")


@pytest.fixture(params=["per-row passes", "shared passes"])
def engine(request, tmp_path):
    shared = request.param == "shared passes"  # the owned step's batched prefill: int4 with a native-bf16 copy
    if shared and not packed_bf16_supported():
        pytest.skip("oneDNN has no native bf16 on this CPU: prompts are fed one row per pass")
    model, tokenizer = tiny_chat_engine_parts(max_positions=256)
    config = EngineConfig(sink_tokens=4, window=124, evict_block=8, prefill_chunk=32, data_dir=tmp_path / "sessions")
    loaded = prepare(model, tokenizer, "tiny-llama", config)
    loaded.quantize = "int4" if shared else None
    eng = Engine(config, loaded).start()
    eng.scheduler.long_prefill = SHARE
    assert eng.scheduler.runner.batch_prefill == shared
    yield eng
    eng.stop()


async def test_short_prompt_behind_a_long_one_is_served_first_and_decoding_goes_on(engine):
    scheduler = engine.scheduler
    short_queued = threading.Event()
    first_token = {}  # prompt length -> (step, the long request's prompt tokens still to feed)
    decoded_while_long_prefills = []  # decode rows' prompt lengths, one entry per decode step

    def long_left() -> int:
        return next((len(r.pending) for r in scheduler.running if len(r.prompt) == LONG), -1)

    prefill_piece, prefilled, decode_step = scheduler._prefill_piece, scheduler._prefilled, scheduler._decode_step

    def gated_piece(request, piece):  # the long prompt's first piece waits until the short one is queued
        if len(request.prompt) == LONG and not short_queued.is_set():
            assert short_queued.wait(WAIT_S)
        prefill_piece(request, piece)

    def recording_prefilled(request, piece, logits):
        if len(request.prompt) == LONG and not short_queued.is_set():
            assert short_queued.wait(WAIT_S)
        prefilled(request, piece, logits)

    def recording_decode(requests):
        if long_left() > 0:
            decoded_while_long_prefills.append(sorted(len(r.prompt) for r in requests))
        decode_step(requests)

    sample = scheduler.output.sample

    def recording_sample(request, logits, token=None):
        first_token.setdefault(len(request.prompt), (scheduler.counters["steps"], long_left()))
        sample(request, logits, token)

    scheduler._prefill_piece, scheduler._prefilled = gated_piece, recording_prefilled
    scheduler._decode_step, scheduler.output.sample = recording_decode, recording_sample

    decoding = await engine.generate(list(range(10, 10 + DECODING)), greedy(400))
    decoding_task = asyncio.create_task(collect(decoding))
    while DECODING not in first_token:  # the decoding row is decoding before the long prompt arrives
        await asyncio.sleep(0.01)
    long = await engine.generate([7] * LONG, greedy(2))
    short_task = asyncio.create_task(engine.generate([5] * SHORT, greedy(2)))
    while scheduler.inbox.qsize() == 0 and not scheduler.waiting and not short_task.done():
        await asyncio.sleep(0.005)
    short_queued.set()
    short = await short_task
    await asyncio.wait_for(asyncio.gather(collect(long), collect(short)), WAIT_S)
    decoding.cancel()
    await asyncio.wait_for(decoding_task, WAIT_S)

    short_step, long_still_to_feed = first_token[SHORT]
    long_step, _ = first_token[LONG]
    assert long_still_to_feed > LONG // 2  # the short reply began with most of the long prompt still unfed
    assert short_step < long_step - LONG // (2 * SHARE)
    # the decoding row took a step beside every prefill step of the long prompt
    assert len(decoded_while_long_prefills) >= LONG // SHARE - 2
    assert all(DECODING in rows for rows in decoded_while_long_prefills)
