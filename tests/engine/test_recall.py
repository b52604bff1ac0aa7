"""Recall of evicted blocks (engine/cache/recall.py) on a tiny random model: what is stored, the budget,
the splice's positions, what it never displaces, and that a cache without recall behaves as before."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine.cache.recall import AGGREGATES, SCORES, Block, Recall, RecallStore, capture_queries
from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.model.loader import prepare
from engine.model.runner import Runner
from tests.tiny_models import tiny_model

SINKS, WINDOW, BLOCK = 2, 46, 8  # capacity 48


def _setup(recall_blocks: int = 2, rows: int = 1, attach: bool = True):
    model = tiny_model("llama")
    loaded = prepare(model, None, "tiny", EngineConfig(sink_tokens=SINKS, window=WINDOW, evict_block=BLOCK))
    cache = SinkCache(loaded.shape, rows, SINKS + WINDOW, SINKS, BLOCK, loaded.inv_freqs,
                      recall_slots=recall_blocks * BLOCK)
    recall = Recall(cache, recall_blocks) if attach else None
    return model, cache, recall, Runner(model, cache)


class _RawKeys:
    """The keys each layer's k_proj computed for every stream token (before RoPE), (H, D) per token."""

    def __init__(self, model, heads: int, head_dim: int) -> None:
        self.keys: list[dict[int, torch.Tensor]] = []
        self.next = 0
        self.hooks = []
        for layer in model.model.layers:
            store: dict[int, torch.Tensor] = {}
            self.keys.append(store)
            self.hooks.append(layer.self_attn.k_proj.register_forward_hook(self._keeper(store, heads, head_dim)))

    def _keeper(self, store, heads, head_dim):
        def keep(_module, _inputs, out):
            tokens = out.shape[1]
            for t in range(tokens):
                store[self.next + t] = out[0, t].reshape(heads, head_dim).detach().clone()
        return keep

    def fed(self, tokens: int) -> None:
        self.next += tokens

    def at(self, layer: int, start: int, count: int) -> torch.Tensor:  # (H, count, D)
        return torch.stack([self.keys[layer][start + i] for i in range(count)], dim=1)


def _stream(runner, raw, row: int, tokens: torch.Tensor, chunk: int) -> None:
    for start in range(0, tokens.shape[0], chunk):
        part = tokens[start : start + chunk]
        runner.forward([row], part[None])
        if raw is not None:
            raw.fed(part.shape[0])


def _tokens(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (count,), generator=torch.Generator().manual_seed(seed))


def test_evicted_blocks_are_stored_unrotated_and_exact():
    model, cache, recall, runner = _setup()
    raw = _RawKeys(model, cache.shape.kv_heads, cache.shape.head_dim)
    _stream(runner, raw, 0, _tokens(150), chunk=5)  # keys move several times before they are evicted
    store = recall.store(0)
    assert store.blocks and cache.evicted[0] == store.tokens  # every evicted token stored, once
    starts = list(store.blocks)
    assert starts == list(range(SINKS, SINKS + store.tokens, BLOCK))  # stream order, whole blocks
    for block in store.blocks.values():
        for layer in range(cache.shape.num_layers):
            expected = raw.at(layer, block.start, block.tokens)
            assert expected.abs().max() > 1.0
            torch.testing.assert_close(block.keys[layer], expected, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(block.key_min[layer], expected.amin(1))
            torch.testing.assert_close(block.key_max[layer], expected.amax(1))


def test_the_budget_drops_the_oldest_blocks_first():
    store = RecallStore(budget_tokens=16)

    def block(start: int) -> Block:
        keys = torch.full((1, 1, 8, 2), float(start))
        return Block(start, keys, keys.clone(), keys.amin(2), keys.amax(2), keys.mean(2))

    for start in (16, 0, 8):  # added out of order: kept in stream order
        store.add(block(start))
    assert list(store.blocks) == [8, 16]
    assert (store.dropped_blocks, store.dropped_tokens, store.tokens) == (1, 8, 16)
    store.add(block(24))
    assert list(store.blocks) == [16, 24] and store.dropped_tokens == 16


def _rotated_by_model(model, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``keys`` (H, n, D) rotated at ``positions`` by transformers' own rotary embedding."""
    cos, sin = model.model.rotary_emb(keys[None], positions[None])
    rotated, _ = apply_rotary_pos_emb(keys[None], keys[None], cos, sin)
    return rotated[0]


def test_a_spliced_segment_sits_between_the_sinks_and_the_window_at_its_own_positions():
    model, cache, recall, runner = _setup()
    raw = _RawKeys(model, cache.shape.kv_heads, cache.shape.head_dim)
    _stream(runner, raw, 0, _tokens(130), chunk=7)
    before = {name: [t[0].clone() for t in getattr(cache, name)] for name in ("k", "v")}
    length, pinned, evicted = cache.lengths[0], cache.pinned[0], cache.evicted[0]
    window_start_stream = pinned + evicted
    chosen = list(recall.store(0).blocks)[1:3]
    recall.splice(0, chosen)
    new = 2 * BLOCK
    assert cache.pinned[0] == SINKS + new and cache.lengths[0] == length + new
    assert cache.pinned[0] + cache.evicted[0] == window_start_stream  # the stream's arithmetic holds
    assert cache.lengths[0] + cache.evicted[0] == length + evicted
    assert cache.reserved[0] == 0
    for layer in range(cache.shape.num_layers):
        k, v = cache.k[layer][0], cache.v[layer][0]
        # the sinks: untouched, bit for bit
        assert torch.equal(k[:, :SINKS], before["k"][layer][:, :SINKS])
        # the segment: each block's raw keys rotated by the model's own RoPE at the segment's slots
        for i, start in enumerate(chosen):
            slots = torch.arange(SINKS + i * BLOCK, SINKS + (i + 1) * BLOCK)
            expected = _rotated_by_model(model, raw.at(layer, start, BLOCK), slots)
            torch.testing.assert_close(k[:, slots], expected, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(v[:, slots], recall.store(0).blocks[start].values[layer])
        # the window: the same tokens, moved up by the segment, keys re-rotated by as much
        window = slice(pinned, length)
        moved = slice(pinned + new, length + new)
        assert torch.equal(v[:, moved], before["v"][layer][:, window])
        wstart = window_start_stream
        expected = _rotated_by_model(model, raw.at(layer, wstart, length - pinned), torch.arange(moved.start, moved.stop))
        torch.testing.assert_close(k[:, moved], expected, atol=1e-4, rtol=1e-5)


def test_the_segment_is_never_evicted_and_the_window_never_grows_into_the_reservation():
    model, cache, recall, runner = _setup()
    _stream(runner, None, 0, _tokens(120), chunk=9)
    assert cache.lengths[0] <= cache.capacity - cache.recall_slots  # reserved while the segment is empty
    chosen = list(recall.store(0).blocks)[:2]
    recall.splice(0, chosen)
    segment = [k[0, :, SINKS : SINKS + 2 * BLOCK].clone() for k in cache.k]
    stored_before = recall.store(0).tokens
    _stream(runner, None, 0, _tokens(90, seed=2), chunk=9)  # more evictions after the splice
    assert cache.pinned[0] == SINKS + 2 * BLOCK
    for layer, keys in enumerate(segment):
        assert torch.equal(cache.k[layer][0, :, SINKS : SINKS + 2 * BLOCK], keys)
    assert recall.store(0).tokens > stored_before
    assert cache.lengths[0] + cache.evicted[0] == 210  # every token of the stream accounted for
    recall.clear(0)  # the window moves back down, the reservation is free again
    assert cache.pinned[0] == SINKS and cache.reserved[0] == 2 * BLOCK
    assert cache.lengths[0] + cache.evicted[0] == 210


@pytest.mark.parametrize("score,aggregate", [(s, a) for s in SCORES for a in AGGREGATES if (s, a) != ("mean", "max")])
def test_before_turn_recalls_the_block_the_queries_point_at(score, aggregate):
    model, cache, _, runner = _setup()
    recall = Recall(cache, 2, score=score, aggregate=aggregate)
    _stream(runner, None, 0, _tokens(120), chunk=10)
    store = recall.store(0)
    target = list(store.blocks)[1]
    # queries equal to the target block's keys score it highest (by its per-channel bound and its mean)
    queries = []
    for layer in range(cache.shape.num_layers):
        keys = store.blocks[target].keys[layer]  # (H, n, D)
        queries.append(keys.repeat_interleave(model.config.num_attention_heads // cache.shape.kv_heads, 0) * 4)
    recalled = recall.before_turn(0, queries)
    assert target in recall.segments[0] and recalled == 2 * BLOCK == recall.recalled_tokens[0]
    assert recall.counters["turns"] == 1


def test_capture_queries_leaves_the_row_as_it_was():
    model, cache, recall, runner = _setup()
    _stream(runner, None, 0, _tokens(40), chunk=10)  # the probe's 12 tokens need an eviction
    state = cache.state(0)
    keys = [k[0].clone() for k in cache.k]
    stored = recall.store(0).tokens
    queries = capture_queries(model, cache, 0, _tokens(12, seed=3).tolist())
    assert len(queries) == cache.shape.num_layers
    assert queries[0].shape == (model.config.num_attention_heads, 12, cache.shape.head_dim)
    assert cache.state(0) == state and recall.store(0).tokens == stored
    for layer, k in enumerate(keys):
        assert torch.equal(cache.k[layer][0, :, : state.length], k[:, : state.length])


@pytest.mark.parametrize("attach", [False, True])
def test_a_cache_without_recall_slots_behaves_as_before(attach):
    """No reserved slots: an attached store only watches (same logits, bit for bit, as a plain cache)."""
    model = tiny_model("llama")
    loaded = prepare(model, None, "tiny", EngineConfig(sink_tokens=SINKS, window=WINDOW, evict_block=BLOCK))
    plain = SinkCache(loaded.shape, 1, SINKS + WINDOW, SINKS, BLOCK, loaded.inv_freqs)
    watched = SinkCache(loaded.shape, 1, SINKS + WINDOW, SINKS, BLOCK, loaded.inv_freqs)
    recall = Recall(watched, 0) if attach else None
    tokens = _tokens(140)
    a, b = Runner(model, plain), Runner(model, watched)
    for start in range(0, 140, 7):
        part = tokens[start : start + 7][None]
        assert torch.equal(a.forward([0], part, all_logits=True), b.forward([0], part, all_logits=True))
    assert plain.state(0) == watched.state(0) and plain.max_chunk(0) == watched.max_chunk(0) == WINDOW
    if recall is not None:
        assert recall.store(0).tokens == watched.evicted[0]


def test_a_turn_recalls_nothing_before_anything_was_evicted_and_a_segment_after():
    model, cache, recall, runner = _setup()
    _stream(runner, None, 0, _tokens(20), chunk=10)
    assert recall.turn(model, 0, _tokens(6, seed=4).tolist()) == 0 and cache.pinned[0] == SINKS
    _stream(runner, None, 0, _tokens(100, seed=5), chunk=10)
    recalled = recall.turn(model, 0, _tokens(6, seed=4).tolist())
    assert recalled == 2 * BLOCK and cache.pinned[0] == SINKS + recalled and cache.reserved[0] == 0
    logits = runner.forward([0], _tokens(6, seed=4)[None])  # the turn's prefill runs on the spliced row
    assert torch.isfinite(logits).all()


def test_rows_swapped_or_copied_keep_their_stores_and_segments():
    model, cache, recall, runner = _setup(rows=3)
    _stream(runner, None, 0, _tokens(100), chunk=10)
    recall.splice(0, list(recall.store(0).blocks)[:1])
    blocks, segment = dict(recall.store(0).blocks), recall.segments[0]
    cache.swap_rows(0, 2)
    recall.swap_rows(0, 2)
    assert recall.store(2).blocks == blocks and recall.segments[2] == segment and not recall.store(0).blocks
    cache.copy_row(2, 1)
    recall.copy_row(2, 1)
    assert list(recall.store(1).blocks) == list(blocks) and recall.segments[1] == segment
    assert cache.pinned[1] == SINKS + BLOCK and cache.reserved[1] == BLOCK
    recall.clear(1)
    assert cache.pinned[1] == SINKS and cache.pinned[2] == SINKS + BLOCK
