"""Decode batches padded to buckets over static buffers (engine/model/buckets.py, engine/model/graphs.py), on
the CPU with padding forced on: the padding rows write only the cache's scratch row, the live rows' cache
and logits are the unpadded eager step's over many steps across evictions, and the pool never lends the
scratch row."""

from __future__ import annotations

import pytest
import torch

from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.model import device as device_module
from engine.model.buckets import bucket_for, bucket_sizes, pad_decode_batches, padded_inputs
from engine.model.families import owned_decoder
from engine.model.loader import prepare
from engine.model.runner import Runner
from tests.tiny_models import tiny_model

ROWS = 8
PROMPTS = [[1, 5, 9, 13, 2], [7, 7, 3], [4, 8, 15, 16, 23, 42, 11], [2, 3], [6, 1, 6, 1, 6, 1],
           [9, 9, 8, 7, 6, 5, 4, 3, 2], [5], [12, 14, 16, 18]]
# rows decoded per step, in turn: 3 pads to 4, 5 and 7 to 8, 1 and 2 and 4 and 8 are buckets themselves
BATCHES = [3, 5, 1, 2, 7, 4, 8]


def pair(attention_kernel: bool, rows: int = ROWS):
    """Two runners over two identical caches with a scratch row, sharing one owned decoder (the same kernels):
    one eager and unpadded, one padding its batches to buckets."""
    model = tiny_model("llama")
    config = EngineConfig(sink_tokens=4, window=28, evict_block=4)
    loaded = prepare(model, None, "tiny", config)

    def cache():
        return SinkCache(loaded.shape, rows, config.cache_size, 4, 4, loaded.inv_freqs, scratch_row=True)

    eager_cache, padded_cache = cache(), cache()
    decoder = owned_decoder(model, eager_cache, None, max_rows=rows)
    assert decoder is not None
    if attention_kernel and not decoder.attention_kernel:
        pytest.skip("the CPU attention kernel is not built here")
    decoder.attention_kernel = attention_kernel
    eager = Runner(model, eager_cache, decoder=decoder, buckets=False)
    padded = Runner(model, padded_cache, decoder=decoder, buckets=True)
    padded.warm_up(max_batch=rows)
    for runner in (eager, padded):
        for row, prompt in enumerate(PROMPTS[:rows]):
            runner.prefill(row, prompt, 16)
    return eager, padded


def test_bucket_sizes_and_choice():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert [bucket_for(n, bucket_sizes(8)) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, None]
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_padding_feeds_the_scratch_row_at_slot_zero():
    assert padded_inputs([3, 0], [17, 5], [42, 7], 4, 9) == [[42, 7, 0, 0], [17, 5, 0, 0], [3, 0, 9, 9]]
    assert padded_inputs([1], [2], [3], 1, 9) == [[3], [2], [1]]
    with pytest.raises(ValueError):
        padded_inputs([0, 1, 2], [0, 0, 0], [1, 1, 1], 2, 9)


def test_padding_is_on_by_default_for_cuda_only():
    assert pad_decode_batches(torch.device("cuda", 0)) is True
    assert pad_decode_batches(torch.device("cpu")) is False
    assert pad_decode_batches(torch.device("cpu"), "on") is True
    assert pad_decode_batches(torch.device("cuda", 0), "off") is False


def test_the_scratch_row_is_beside_the_rows_sessions_own():
    shape = tiny_cache_shape()
    cache = SinkCache(shape, 3, 32, 4, 4, [torch.ones(4)] * shape.num_layers, scratch_row=True)
    assert cache.rows == 3 and cache.scratch_row == 3
    assert cache.k[0].shape[0] == 4 and len(cache.lengths) == 3
    plain = SinkCache(shape, 3, 32, 4, 4, [torch.ones(4)] * shape.num_layers)
    assert plain.scratch_row is None and plain.k[0].shape[0] == 3
    # the pool's budget pays for the scratch row: 10 rows' worth of memory, 9 for sessions
    assert device_module.pool_rows(10 * 1000, 1000, 64, reserved=1) == 9
    assert device_module.pool_rows(10 * 1000, 1000, 5, reserved=1) == 5
    with pytest.raises(ValueError, match="reserved"):
        device_module.pool_rows(1000, 1000, 64, reserved=1)


def tiny_cache_shape():
    from engine.cache.sink import CacheShape

    return CacheShape(num_layers=2, kv_heads=2, head_dim=8)


def test_a_runner_pads_only_with_the_owned_step_and_a_scratch_row():
    model = tiny_model("llama")
    config = EngineConfig(sink_tokens=4, window=28, evict_block=4)
    loaded = prepare(model, None, "tiny", config)
    plain = SinkCache(loaded.shape, 2, config.cache_size, 4, 4, loaded.inv_freqs)
    decoder = owned_decoder(model, plain, None, max_rows=2)
    assert Runner(model, plain, decoder=decoder).buckets is False  # no scratch row: unpadded, as before
    with pytest.raises(ValueError, match="scratch row"):
        Runner(model, plain, decoder=decoder, buckets=True)
    scratch = SinkCache(loaded.shape, 2, config.cache_size, 4, 4, loaded.inv_freqs, scratch_row=True)
    assert Runner(model, scratch, decoder=decoder).buckets is True
    assert Runner(model, scratch).buckets is False  # transformers' forward: unpadded


@pytest.mark.parametrize("batches", [BATCHES, [1, 2, 4, 8, 4, 2]], ids=["padded", "buckets-only"])
@pytest.mark.parametrize("attention_kernel", [True, False], ids=["attention-kernel", "pytorch-attention"])
def test_static_steps_equal_the_eager_steps_across_evictions(attention_kernel, batches):
    """Bit for bit where every batch is a bucket and the step is the eager step's own call (the CPU attention
    kernel); else within float32 rounding: a matmul of 3 rows and the same 3 rows of one of 4 sum in another
    order (MKL, measured 3e-6; cuBLAS alike), and PyTorch's attention here attends over every slot, masked."""
    eager, padded = pair(attention_kernel)
    cache, scratch = padded.cache, padded.cache.scratch_row
    exact = attention_kernel and all(b in padded.static_steps.sizes for b in batches)
    last = [int(t) for t in torch.arange(ROWS) + 20]
    evictions = 0
    for step in range(70):  # the window (28) rolls over twice in the rows decoded most
        batch = batches[step % len(batches)]
        rows, tokens = list(range(batch)), last[:batch]
        idle_before = [(k[batch:ROWS].clone(), v[batch:ROWS].clone()) for k, v in zip(cache.k, cache.v, strict=True)]
        evicted_before = sum(cache.evicted)
        expected = eager.decode(rows, tokens)
        got = padded.decode(rows, tokens)
        evictions += sum(cache.evicted) > evicted_before
        assert got.shape == expected.shape == (batch, expected.shape[-1])
        if exact:
            assert torch.equal(got, expected), f"step {step}, {batch} rows"
        else:
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
        assert cache.lengths == eager.cache.lengths and cache.evicted == eager.cache.evicted
        for (k, v), (k_before, v_before) in zip(zip(cache.k, cache.v, strict=True), idle_before, strict=True):
            assert torch.equal(k[batch:ROWS], k_before) and torch.equal(v[batch:ROWS], v_before)  # idle rows
        for layer in range(len(cache.k)):
            for buffers, reference in ((cache.k, eager.cache.k), (cache.v, eager.cache.v)):
                for row in rows:
                    n = cache.lengths[row]
                    if exact:
                        assert torch.equal(buffers[layer][row, :, :n], reference[layer][row, :, :n]), (step, layer, row)
                    else:
                        torch.testing.assert_close(buffers[layer][row, :, :n], reference[layer][row, :, :n],
                                                   atol=1e-4, rtol=1e-4)
        last = expected.argmax(-1).tolist() + last[batch:]
    assert evictions >= 4  # the steps did run across evictions
    if batches is BATCHES:
        assert cache.k[0][scratch].abs().sum() > 0  # the padding rows wrote the scratch row, at slot 0 only
    assert cache.k[0][scratch, :, 1:].abs().sum() == 0


@pytest.mark.parametrize("attention_kernel", [True, False], ids=["attention-kernel", "pytorch-attention"])
def test_what_the_padding_rows_feed_never_reaches_the_live_rows(attention_kernel, monkeypatch):
    """The same padded steps with other padding (another token, another slot of the scratch row, the scratch
    row full of noise): the live rows' logits and every session row of the cache, bit for bit."""
    from engine.model import graphs

    results = []
    for noisy in (False, True):
        _, padded = pair(attention_kernel)
        cache = padded.cache
        if noisy:
            def other_padding(rows, slots, tokens, bucket, scratch_row):
                pad = bucket - len(rows)
                return [tokens + [31] * pad, slots + [9] * pad, rows + [scratch_row] * pad]

            monkeypatch.setattr(graphs, "padded_inputs", other_padding)
            for buffers in (cache.k, cache.v):
                for buffer in buffers:
                    buffer[cache.scratch_row] = torch.randn_like(buffer[cache.scratch_row]) * 100
        last, logits = [int(t) for t in torch.arange(ROWS) + 20], []
        for step in range(30):
            batch = BATCHES[step % len(BATCHES)]
            out = padded.decode(list(range(batch)), last[:batch])
            logits.append(out)
            last = out.argmax(-1).tolist() + last[batch:]
        results.append((logits, [k[:ROWS].clone() for k in cache.k + cache.v]))
    (plain_logits, plain_cache), (noisy_logits, noisy_cache) = results
    assert all(torch.equal(a, b) for a, b in zip(plain_logits, noisy_logits, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain_cache, noisy_cache, strict=True))


@pytest.mark.parametrize("attention_kernel", [True, False], ids=["attention-kernel", "pytorch-attention"])
def test_rows_the_static_step_cannot_serve_run_eagerly(attention_kernel):
    eager, padded = pair(attention_kernel)
    rows, tokens = [5, 0, 3], [11, 12, 13]  # not rows 0..B-1: PyTorch's attention reads those in place only
    static = padded.static_steps.step_for(rows)
    assert (static is not None) == attention_kernel
    expected = eager.decode(rows, tokens)
    got = padded.decode(rows, tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)  # 3 rows padded to 4, or the eager step
    assert padded.cache.lengths == eager.cache.lengths
    assert padded.static_steps.step_for(list(range(ROWS + 1))) is None  # larger than every bucket: eager


def test_a_failed_padded_step_leaves_the_rows_as_they_were():
    _, padded = pair(attention_kernel=False)
    for row in range(3):
        padded.cache.lengths[row] = padded.cache.capacity  # full: the step evicts in each row first
    before = [(padded.cache.state(r), padded.cache.k[0][r].clone()) for r in range(3)]
    with pytest.raises(IndexError):
        padded.decode([0, 1, 2], [1, 2, 10_000])  # no such token
    for row, (state, keys) in enumerate(before):
        assert padded.cache.state(row) == state
        assert torch.equal(padded.cache.k[0][row], keys)


def test_static_steps_need_no_capture_on_a_cpu():
    _, padded = pair(attention_kernel=False)
    assert padded.static_steps.sizes == [1, 2, 4, 8]
    assert padded.static_steps.captures == 0
    assert all(step.graph is None for step in padded.static_steps.steps.values())


def test_an_engine_padding_its_batches_never_lends_the_scratch_row(tmp_path, monkeypatch):
    import asyncio

    from engine.scheduling.sampling import SamplingParams
    from tests.engine.generation import reply
    from tests.tiny_models import tiny_engine

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [5, 5, 5, 5]]

    async def three(engine):
        return await asyncio.gather(*(reply(engine, p, params) for p in prompts))

    engines = {}
    for padded in (False, True):
        monkeypatch.setattr("engine.engine.pad_decode_batches", lambda device, setting="auto", p=padded: p)
        engines[padded] = tiny_engine(tmp_path / str(padded), max_resident_sessions=3)
    try:
        plain, padded = engines[False], engines[True]
        cache = padded.scheduler.cache
        assert cache.rows == 3 and cache.scratch_row == 3 and padded.scheduler.store.rows.cache is cache
        assert plain.scheduler.cache.scratch_row is None and plain.scheduler.runner.buckets is False
        runner = padded.scheduler.runner
        assert runner.buckets and runner.static_steps.sizes == [1, 2, 3]  # warmed at start, up to the rows
        expected = [tokens for tokens, _, _ in asyncio.run(three(plain))]
        got = [tokens for tokens, _, _ in asyncio.run(three(padded))]
        assert got == expected
        table = padded.scheduler.store.rows  # every row lent to a session, none of them the scratch row
        assert sorted(table.row_of(s) for s in table.holders()) == [0, 1, 2]
    finally:
        for engine in engines.values():
            engine.stop()


def test_on_a_gpu_only_captured_graphs_serve_and_a_failed_capture_falls_back_to_eager(monkeypatch, caplog):
    """The capture itself needs CUDA (tests/gpu/test_graphs_cuda.py); its bookkeeping is checked here with the
    capture faked: a bucket whose capture fails is logged and decodes eagerly, unpadded."""
    from engine.model import graphs

    eager, padded = pair(attention_kernel=False)
    steps = padded.static_steps
    steps.cuda = True  # as on a GPU: a static step serves only once its graph is captured
    assert steps.step_for([0, 1, 2]) is None

    def fake_capture(self, pool=None):
        if self.bucket == 4:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.graph = "captured"

    monkeypatch.setattr(graphs.StaticStep, "capture", fake_capture)
    monkeypatch.setattr(graphs.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(graphs.torch.cuda, "synchronize", lambda device=None: None)
    with caplog.at_level("WARNING", logger="engine.model.graphs"):
        steps.capture()
    assert steps.captures == 3 and list(steps.failures) == [4]
    assert "4-row decode step not captured" in caplog.text
    assert steps.step_for([0, 1, 2]) is None  # its bucket's capture failed: eager, unpadded
    assert steps.step_for([0, 1, 2, 3, 4]) is steps.steps[8]
    assert steps.step_for([0]) is steps.steps[1]
    torch.testing.assert_close(padded.decode([0, 1, 2], [1, 2, 3]), eager.decode([0, 1, 2], [1, 2, 3]))
