"""The sink cache against a float64 reference of the same policy, and against a plain forward."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.model.loader import prepare
from engine.model.runner import Runner
from tests.engine.reference_cache import ReferenceCache
from tests.tiny_models import FAMILIES, tiny_model


def _runner(model, sink_tokens: int, window: int, evict_block: int, rows: int = 1) -> Runner:
    config = EngineConfig(sink_tokens=sink_tokens, window=window, evict_block=evict_block)
    loaded = prepare(model, None, "tiny", config)
    cache = SinkCache(loaded.shape, rows, config.cache_size, sink_tokens, evict_block, loaded.inv_freqs)
    return Runner(model, cache)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_short_stream_equals_plain_forward(family):
    model = tiny_model(family)
    runner = _runner(model, sink_tokens=4, window=124, evict_block=16, rows=3)
    tokens = torch.randint(0, 96, (1, 100), generator=torch.Generator().manual_seed(1))
    expected = model(tokens).logits[0]  # (T, V)
    got = torch.cat([
        runner.forward([2], tokens[:, :37], all_logits=True)[0],
        *[runner.forward([2], tokens[:, t : t + 1], all_logits=True)[0] for t in range(37, 100)],
    ])
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,evict_block", [("llama", 8), ("qwen3", 1)])
def test_20k_token_stream_matches_float64_reference(family, evict_block):
    """Every logit of a 20,000-token stream within 1e-4 of the exact float64 policy."""
    model = tiny_model(family)
    sink_tokens, window = 4, 60
    runner = _runner(model, sink_tokens, window, evict_block)
    reference_model = copy.deepcopy(model).double()
    loaded = prepare(reference_model, None, "ref", EngineConfig(sink_tokens=4, window=window, evict_block=evict_block))
    reference = ReferenceCache(loaded.shape.num_layers, sink_tokens + window, sink_tokens, evict_block, loaded.inv_freqs)
    rng = random.Random(0)
    stream = torch.randint(0, 96, (20_000,), generator=torch.Generator().manual_seed(2))
    worst, position = 0.0, 0
    while position < len(stream):
        size = min(rng.choice([1, 1, 1, 3, 16, 40]), len(stream) - position)
        chunk = stream[None, position : position + size]
        got = runner.forward([0], chunk, all_logits=True)[0]  # (T, V)
        start = reference.begin(size)
        with torch.no_grad():
            want = reference_model(
                input_ids=chunk,
                position_ids=torch.arange(start, start + size)[None],
                attention_mask=reference.mask(),
                cache=reference,
                use_cache=True,
            ).logits[0]
        worst = max(worst, (got.double() - want).abs().max().item())
        position += size
    assert runner.cache.evicted[0] > 19_000  # the window really rolled
    assert runner.cache.lengths[0] == reference.length <= sink_tokens + window
    print(f"worst abs logit difference over 20k tokens: {worst:.2e}")
    assert worst <= 1e-4, worst


def test_prompt_longer_than_window_keeps_sinks_visible():
    """Each query of a chunked long prompt attends to the sinks: evicting them changes the logits."""
    model = tiny_model("llama")
    stream = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(3))
    with_sinks = _runner(model, 4, 60, 8)
    no_sinks = _runner(model, 0, 64, 8)
    a = torch.cat([with_sinks.forward([0], stream[:, i : i + 32], all_logits=True)[0] for i in range(0, 300, 32)])
    b = torch.cat([no_sinks.forward([0], stream[:, i : i + 32], all_logits=True)[0] for i in range(0, 300, 32)])
    assert with_sinks.cache.evicted[0] > 0
    assert torch.allclose(a[:64], b[:64], atol=1e-5)  # identical until the first eviction
    assert (a[100:] - b[100:]).abs().max() > 1e-2  # then the sinks make a difference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cache_follows_the_float64_policy(dtype):
    """Half-precision weights and cache: the streamed logits stay close to the exact policy."""
    model = tiny_model("llama", dtype=torch.float32)
    half = copy.deepcopy(model).to(dtype)
    config = EngineConfig(sink_tokens=4, window=60, evict_block=8, dtype=str(dtype).removeprefix("torch."))
    loaded = prepare(half, None, "tiny", config)
    runner = Runner(half, SinkCache(loaded.shape, 1, 64, 4, 8, loaded.inv_freqs, dtype=dtype))
    exact = copy.deepcopy(model).double()
    reference = ReferenceCache(loaded.shape.num_layers, 64, 4, 8, loaded.inv_freqs)
    stream = torch.randint(0, 96, (1, 600), generator=torch.Generator().manual_seed(5))
    worst = 0.0
    for start in range(0, 600, 20):
        chunk = stream[:, start : start + 20]
        got = runner.forward([0], chunk, all_logits=True)[0].double()
        first = reference.begin(20)
        with torch.no_grad():
            want = exact(input_ids=chunk, position_ids=torch.arange(first, first + 20)[None],
                         attention_mask=reference.mask(), cache=reference, use_cache=True).logits[0]
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    assert runner.cache.evicted[0] > 500
    print(f"{dtype}: worst relative logit error {worst:.4f}")
    assert worst < 0.05, worst  # relative to the logits' scale; half precision, no drift over 600 tokens


def test_swapping_rows_moves_their_slots_and_keeps_their_logits():
    """Rows of different lengths exchange places (only their used slots move when both were zeroed); each
    conversation then continues exactly as it would have in its old row, alone or batched."""
    model = tiny_model("llama")
    runner = _runner(model, sink_tokens=4, window=60, evict_block=8, rows=3)
    twin = _runner(model, sink_tokens=4, window=60, evict_block=8, rows=3)
    tokens = torch.randint(0, 96, (2, 90), generator=torch.Generator().manual_seed(3))
    for r in (runner, twin):
        r.forward([0], tokens[:1, :50])  # row 0: a full window, evicted once
        r.forward([0], tokens[:1, 50:80])
        r.forward([2], tokens[1:, :12])  # row 2: 12 tokens
    before = [runner.cache.export_row(r) for r in (0, 2)]
    runner.cache.swap_rows(0, 2)
    after = [runner.cache.export_row(r) for r in (2, 0)]
    for old, new in zip(before, after, strict=True):
        for key in ("k", "v", "meta"):
            assert torch.equal(old[key], new[key])
    assert runner.cache.lengths[0] == 12 and runner.cache.evicted[2] > 0
    step = torch.tensor([[5], [7]])
    want = twin.forward([2, 0], step)  # (2, V): the short row first
    got = runner.forward([0, 2], step)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert runner.cache.dirty[0] is not None and runner.cache.dirty[2] is not None


@pytest.mark.parametrize("rot_dim", [16, 12])
def test_rotate_float32_matches_rotate(rot_dim):
    """The cache's one-temporary re-rotation against the reference formula, partial rotary dims included."""
    from engine.cache.rope import rotate, rotate_float32, rotation

    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    cos, sin = rotation(inv_freq, -64, torch.float32, "cpu")
    keys = torch.randn(2, 3, 40, 16, generator=torch.Generator().manual_seed(4))[:, :, 5:]  # a strided view
    for dtype in (torch.float32, torch.bfloat16):
        x = keys.to(dtype)
        want = rotate(x.float(), cos, sin)
        got = rotate_float32(x, cos, sin)
        assert got.dtype == torch.float32 and not torch.equal(want, x.float())
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_a_failed_evicting_step_leaves_the_row_exactly_as_it_was():
    """A pass that evicted and then failed is undone bit for bit: keys, values and counters."""
    model = tiny_model("llama")
    runner = _runner(model, sink_tokens=4, window=60, evict_block=8)
    tokens = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(6))
    runner.forward([0], tokens[:, :40])
    runner.forward([0], tokens[:, 40:64])  # past the window: evicted once already, a moved row
    before = runner.cache.export_row(0)
    step = runner.cache.step([0], 5)  # evicts a block and moves the window
    assert runner.cache.evicted[0] > before["meta"][2]
    runner.cache.k[0][0, :, step.offsets[0]] = 7.0  # the pass wrote its new slots, then failed
    runner.cache.v[0][0, :, step.offsets[0]] = 7.0
    step.undo()
    after = runner.cache.export_row(0)
    for key in ("k", "v", "meta"):
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("capacity,garbage", [(64, False), (40, False), (64, True)])
def test_slots_beyond_a_rows_dirty_mark_stay_zero(capacity, garbage):
    """Rows are zeroed only up to the slots they used (``dirty``): across random steps (with evictions),
    resets, rollbacks, swaps, copies and imports, every slot at or past a row's mark holds zeros (what a
    shorter row's masked slots must hold in a batch), and a reset row is all zeros again. On a CPU the
    buffers start as zeros (memory maps) and a row of whole pages is zeroed by handing its pages back
    (capacity 64: 4 KiB rows) or else by writing zeros (40); ``garbage``: buffers that start as anything
    (untouched device memory), zeroed on first use."""
    from engine.cache.sink import CacheShape

    rng = random.Random(5)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    cache = SinkCache(CacheShape(num_layers=2, kv_heads=2, head_dim=8), 4, capacity, 4, 8, [inv_freq] * 2)
    assert cache.dirty == [0] * 4 and all(buf.eq(0).all() for buf in cache.k + cache.v)
    if garbage:
        for buf in cache.k + cache.v:
            buf.fill_(float("nan"))
        cache.dirty = [None] * 4
    cleared = []
    for _ in range(300):
        op = rng.choice(["step", "step", "step", "reset", "rollback", "swap", "copy", "import"])
        row, other = rng.randrange(4), rng.randrange(4)
        if op == "step":
            new = rng.randint(1, 12)
            step = cache.step([row], new)
            for layer in range(2):
                data = torch.randn(1, 2, new, 8)
                step.update(data, data + 1, layer)
        elif op == "reset":
            before = cache.dirty[row]
            cache.reset(row)
            cleared.append(cache.capacity if before is None else before)
            assert all(buf[row].eq(0).all() for buffers in (cache.k, cache.v) for buf in buffers)
        elif op == "rollback" and cache.dirty[row] is not None:
            state = cache.state(row)
            keep = state.reusable(rng.randint(0, state.stream_length), state.pinned)
            cache.rollback(row, keep)
        elif op == "swap":
            cache.swap_rows(row, other)
        elif op == "copy" and cache.dirty[row] is not None and row != other:
            cache.copy_row(row, other)
        elif op == "import" and cache.dirty[row] is not None:
            cache.import_row(other, cache.export_row(row))
        for r in range(4):
            if cache.dirty[r] is not None:
                assert cache.lengths[r] <= cache.dirty[r] <= cache.capacity
                for buffers in (cache.k, cache.v):
                    for buf in buffers:
                        assert buf[r, :, cache.dirty[r]:].eq(0).all(), (op, r)
    assert any(n < cache.capacity for n in cleared)  # some resets cleared less than a whole row
