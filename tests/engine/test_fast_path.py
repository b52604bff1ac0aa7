"""The fast decode paths against their references: the compiled decode step against eager (greedy tokens),
batched sampling in the scheduler against the per-row path (greedy and seeded tokens through Engine.generate)."""

from __future__ import annotations

import asyncio

import pytest
import torch

import engine.scheduling.output as output_module
from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.events import TokenEvent
from engine.model.linear import packed_bf16_supported
from engine.model.loader import prepare
from engine.model.quantize import quantize_int4
from engine.model.runner import Runner
from engine.scheduling.sampling import SamplingParams
from tests.engine.generation import greedy_decode
from tests.tiny_models import tiny_engine, tiny_model


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_compiled_decode_matches_eager(quantize):
    model = tiny_model("llama")
    if quantize:  # the CPU default for the embedded model: int4 decode weights
        quantize_int4(model, torch.device("cpu"))
    config = EngineConfig(sink_tokens=4, window=28, evict_block=4)
    loaded = prepare(model, None, "tiny", config)
    make = lambda compiled: Runner(  # noqa: E731
        model, SinkCache(loaded.shape, 3, config.cache_size, 4, 4, loaded.inv_freqs), compile_decode=compiled
    )
    prompts = [[1, 5, 9, 13, 2], [7, 7, 3], [4, 8, 15, 16, 23, 42, 11]]
    eager, eager_logits = greedy_decode(make(False), prompts, steps=40)  # 40 steps: the window rolls
    fast_runner = make(True)
    fast_runner.warm_up()
    fast, fast_logits = greedy_decode(fast_runner, prompts, steps=40)
    assert fast == eager
    torch.testing.assert_close(fast_logits, eager_logits, atol=1e-4, rtol=1e-4)


# ----- batched sampling in the decode step ---------------------------------------------------------------
MIXED_PARAMS = [
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.0, top_k=5, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True),  # unseeded: in the batch, not compared
    SamplingParams(max_tokens=12, temperature=1.2, top_k=20, min_p=0.05, seed=11, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.0, min_p=0.2, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=0.5, ignore_eos=True),
]


async def _generate_mixed(tmp_path) -> list[list[int]]:
    engine = tiny_engine(tmp_path, max_batch=8)
    try:
        prompts = [engine.render_chat([{"role": "user", "content": f"topic {i} " * (i + 2)}])[0]
                   for i in range(len(MIXED_PARAMS))]

        async def one(prompt, params, key):
            generation = await engine.generate(prompt, params, api_key=key)
            return [e.token_id async for e in generation if isinstance(e, TokenEvent)]

        return await asyncio.gather(*(one(p, s, f"k{i}") for i, (p, s) in enumerate(zip(prompts, MIXED_PARAMS,
                                                                                          strict=True))))
    finally:
        engine.stop()


async def test_batched_sampling_leaves_the_tokens_unchanged(tmp_path, monkeypatch):
    calls = []
    batched_sampler = output_module.sample_batch
    monkeypatch.setattr(output_module, "sample_batch", lambda logits, params: calls.append(len(params))
                        or batched_sampler(logits, params))
    batched = await _generate_mixed(tmp_path / "batched")
    assert calls and max(calls) == 4  # the plain rows: greedy, unseeded, top-k and min-p greedy
    monkeypatch.setattr(output_module, "plain", lambda params: False)  # every row through the per-row path
    calls.clear()
    per_row = await _generate_mixed(tmp_path / "per-row")
    assert not calls
    assert all(len(tokens) == 12 for tokens in batched + per_row)
    compared = [i for i, p in enumerate(MIXED_PARAMS) if p.seed is not None or p.temperature == 0]
    assert [batched[i] for i in compared] == [per_row[i] for i in compared]


@pytest.mark.skipif(not packed_bf16_supported(), reason="oneDNN has no native bf16 on this CPU: no owned prefill")
async def test_requests_arriving_together_share_prefill_passes(tmp_path, monkeypatch):
    """Four requests sent at once are prefilled together (the owned step's prefill_rows, within the chunk
    budget) and answer exactly what each answers when it is sent alone."""
    from engine.engine import Engine
    from tests.tiny_models import tiny_chat_engine_parts

    model, tokenizer = tiny_chat_engine_parts(max_positions=512)
    config = EngineConfig(sink_tokens=4, window=250, evict_block=8, prefill_chunk=256, max_batch=8,
                          data_dir=tmp_path / "sessions")
    loaded = prepare(model, tokenizer, "tiny-llama", config)
    loaded.quantize = "int4"
    engine = Engine(config, loaded).start()
    # decode kernels are chosen per row count by timing, and a 4-row step may run another 4-bit kernel (other
    # rounding: bf16 or float32 activations) than a 1-row one, which can tip a near-tie of this random model;
    # what is tested here is the shared prefill, so every row count decodes on the 1-row step's kernels
    decoder = engine.scheduler.runner.decoder
    decoder.assign({name: group[0].choice[1] for name, group in decoder.projections().items()}, decoder.head.choice)
    shared = []
    prefill_rows = engine.scheduler.runner.prefill_rows
    monkeypatch.setattr(engine.scheduler.runner, "prefill_rows",
                        lambda rows, chunks: shared.append(len(rows)) or prefill_rows(rows, chunks))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    try:
        prompts = [engine.render_chat([{"role": "user", "content": f"question {i}"}])[0] for i in range(4)]

        async def one(prompt, key):
            generation = await engine.generate(prompt, params, api_key=key)
            return [e.token_id async for e in generation if isinstance(e, TokenEvent)]

        alone = [await one(p, f"alone-{i}") for i, p in enumerate(prompts)]
        assert not shared
        together = await asyncio.gather(*(one(p, f"together-{i}") for i, p in enumerate(prompts)))
    finally:
        engine.stop()
    assert shared and max(shared) > 1
    assert together == alone and all(len(tokens) == 8 for tokens in alone)


async def test_decode_counters_account_for_every_decoded_token(tmp_path):
    """stats() (and /metrics) count the batched decode steps, the rows they carried and their wall time:
    every generated token but each request's first (its prompt's last logits give it) is one decode row, and
    requests running together share steps."""
    engine = tiny_engine(tmp_path, max_batch=4)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def one(text: str, key: str) -> int:
        prompt = engine.render_chat([{"role": "user", "content": text}])[0]
        generation = await engine.generate(prompt, params, api_key=key)
        return sum([isinstance(e, TokenEvent) async for e in generation])

    try:
        assert await one("alone", "a") == 6
        alone = dict(engine.stats())
        assert alone["decode_steps"] == alone["decode_rows"] == 5
        counts = await asyncio.gather(*(one(f"together {i}", f"t{i}") for i in range(3)))
        stats = engine.stats()
    finally:
        engine.stop()
    assert counts == [6, 6, 6]
    assert stats["decode_rows"] - alone["decode_rows"] == 3 * 5
    assert stats["decode_steps"] - alone["decode_steps"] < 3 * 5  # shared steps
    assert 0 < stats["decode_forward_seconds"] < stats["decode_seconds"]
