"""Sliding-window layers over the sink cache (engine/cache/sink.py ``CacheStep.attention_mask(window)``, the
runner's per-layer-type masks): a sliding layer sees only the last ``window`` tokens of the text, never the
sinks once they are further back than that, whatever the cache holds; full layers keep sinks + window."""

from __future__ import annotations

import random

import pytest
import torch

from engine.cache.sink import CacheShape, SinkCache
from engine.config import EngineConfig
from engine.model.loader import prepare
from engine.model.runner import Runner, sliding_window
from tests.tiny_models import tiny_model

WINDOW = 32  # the tiny Gemma models' sliding window (tests/tiny_models.py)


def _bookkeeping_cache(capacity: int = 64, sinks: int = 4, block: int = 8, rows: int = 2) -> SinkCache:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    return SinkCache(CacheShape(num_layers=1, kv_heads=1, head_dim=8), rows, capacity, sinks, block, [inv_freq])


def test_the_visibility_rule_follows_the_text_through_evictions():
    """Each slot's place in the text is tracked independently (a list of the stream indices the row holds,
    evicted as the cache says); across random chunks, resets with other pinnings and rollbacks a sliding
    query sees exactly the held tokens at most ``window - 1`` back in the text, a full query every slot up
    to its own."""
    rng = random.Random(0)
    cache = _bookkeeping_cache()
    held = [[], []]  # per row: the stream index of each slot's token
    fed = [0, 0]
    checked_evicted = 0
    for _ in range(400):
        row = rng.randrange(2)
        if rng.random() < 0.03:
            pinned = rng.choice([0, 4, 10])
            cache.reset(row, pinned)
            held[row], fed[row] = [], 0
            continue
        new = rng.choice([1, 1, 1, 5, 16, 40])
        new = min(new, cache.max_chunk(row))
        before, evicted_before = cache.lengths[row], cache.evicted[row]
        step = cache.step([row], new)
        evict = before + new - cache.lengths[row]  # tokens this step evicted
        assert cache.evicted[row] - evicted_before == evict
        pinned = cache.pinned[row]
        held[row] = held[row][:pinned] + held[row][pinned + evict :] + list(range(fed[row], fed[row] + new))
        fed[row] += new
        text = torch.tensor(held[row])
        assert torch.equal(step.text_positions()[0], text)
        full, sliding = step.attention_mask()[0, 0], step.attention_mask(WINDOW)[0, 0]  # (T, S)
        for t in range(new):
            query = text[step.offsets[0] + t]
            assert torch.equal(full[t], torch.arange(len(text)) <= step.offsets[0] + t)
            assert torch.equal(sliding[t], (text <= query) & (query - text < WINDOW))
        checked_evicted = max(checked_evicted, cache.evicted[row])
    assert checked_evicted > 200  # the rows rolled many times


def test_sinks_drop_out_of_a_sliding_view_once_far_enough_back_in_the_text():
    cache = _bookkeeping_cache()
    step = cache.step([0], 20)
    assert step.attention_mask(WINDOW)[0, 0, -1].all()  # 20 tokens: all within the window, sinks too
    cache.step([0], 40)  # 60 tokens, nothing evicted yet
    step = cache.step([0], 8)  # evicts a block: 68 tokens seen
    sliding, full = step.attention_mask(WINDOW)[0, 0, -1], step.attention_mask()[0, 0, -1]
    assert cache.evicted[0] == 8 and full.all()  # the full layers see the sinks and the window
    assert not sliding[:4].any() and sliding.sum() == WINDOW  # the sliding ones the last 32 tokens only
    assert sliding[-WINDOW:].all()


def test_batched_rows_each_follow_their_own_text():
    cache = _bookkeeping_cache()
    cache.step([0], 50)
    cache.step([0], 30)  # row 0 evicted
    cache.step([1], 10)  # row 1 did not
    step = cache.step([0, 1], 1)
    mask = step.attention_mask(WINDOW)[:, 0, 0]  # (2, S)
    assert mask[0].sum() == WINDOW and not mask[0, :4].any()
    assert mask[1, :11].all() and not mask[1, 11:].any()


def test_models_without_sliding_layers_keep_one_mask():
    assert sliding_window(tiny_model("llama").config) is None
    assert sliding_window(tiny_model("gemma3").config) == WINDOW


def _runner(model, sinks: int = 4, window: int = 60, block: int = 8) -> Runner:
    config = EngineConfig(sink_tokens=sinks, window=window, evict_block=block)
    loaded = prepare(model, None, "tiny", config)
    return Runner(model, SinkCache(loaded.shape, 1, config.cache_size, sinks, block, loaded.inv_freqs))


def text_distances(cache: SinkCache, row: int) -> torch.Tensor:
    """How far back in the text each used slot of ``row`` is from the next token the row is fed, (S,)."""
    slots = torch.arange(cache.lengths[row])
    text = slots + cache.evicted[row] * (slots >= cache.pinned[row])
    return cache.lengths[row] + cache.evicted[row] - text


def corrupted_step(runner: Runner, layers: list[int], slots: torch.Tensor, token: int = 5) -> torch.Tensor:
    """The logits of decoding ``token`` into row 0 with the keys and values of ``slots`` in ``layers``
    replaced by large noise (the row is put back as it was afterwards)."""
    saved = runner.cache.export_row(0)
    noise = torch.Generator().manual_seed(7)
    for layer in layers:
        for buf in (runner.cache.k[layer], runner.cache.v[layer]):
            buf[0, :, slots] = 50 * torch.randn(buf[0, :, slots].shape, generator=noise)
    logits = runner.decode([0], [token])
    runner.cache.import_row(0, saved)
    return logits


def assert_sliding_layers_see_only_their_window(runner: Runner, stream: torch.Tensor) -> None:
    """Feed ``stream`` (past evictions, ending short of the next one); then noise in the sliding layers'
    slots 32 or more tokens back in the text (the sinks among them) leaves the next logits exactly as
    they were, noise in their slot 31 back does not, and noise in the full layers' sinks does not."""
    types = runner.model.config.layer_types
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    for start in range(0, stream.shape[1], 16):
        runner.forward([0], stream[:, start : start + 16])
    cache = runner.cache
    assert cache.evicted[0] > 0 and cache.lengths[0] < cache.capacity  # rolled; the next step evicts nothing
    distance = text_distances(cache, 0)
    far = torch.nonzero(distance >= WINDOW)[:, 0]
    assert far[:4].tolist() == [0, 1, 2, 3] and len(far) > 4  # the sinks and some of the window
    clean = corrupted_step(runner, [], far)
    assert torch.equal(corrupted_step(runner, sliding, far), clean)
    edge = torch.nonzero(distance == WINDOW - 1)[:, 0]
    assert not torch.allclose(corrupted_step(runner, sliding, edge), clean)
    assert not torch.allclose(corrupted_step(runner, full, torch.arange(4)), clean)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gpt_oss_sliding"])
def test_transformers_forward_sliding_layers_never_see_past_their_window(family):
    """Through transformers' forward with the runner's per-layer-type masks."""
    model = tiny_model(family)
    stream = torch.randint(0, 96, (1, 90), generator=torch.Generator().manual_seed(1))
    assert_sliding_layers_see_only_their_window(_runner(model), stream)
