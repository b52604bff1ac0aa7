"""Host-device synchronizations per decode step, counted with ``torch.cuda.set_sync_debug_mode("warn")``
(each synchronizing CUDA call warns once): printed as a report, and checked where the design promises a
bound. A sync stalls the CPU until the GPU drains its queue, so one per layer would cost a decode step
the launch overlap that makes small batches fast."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.scheduling.sampling import SamplingParams, filter_logits, penalize_logits, sample, sample_batch
from tests.gpu.conftest import deep_model, needs_cuda, runner_on

pytestmark = needs_cuda


def count_syncs(fn) -> int:
    """Synchronizing CUDA calls made by ``fn()``."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _decode_syncs(dev, layers: int, rows: int = 4, steps: int = 8) -> tuple[list[int], int]:
    """Syncs of each of ``steps`` decode steps over ``rows`` rows (no eviction), and of one evicting step."""
    runner = runner_on(deep_model(num_hidden_layers=layers), dev, torch.float32, rows=rows, window=124, evict_block=8)
    for row in range(rows):
        runner.prefill(row, list(range(1, 60 + row)), 32)
    tokens = [1] * rows
    runner.decode(list(range(rows)), tokens)  # first call: lazy initialisations out of the count
    per_step = [count_syncs(lambda: runner.decode(list(range(rows)), tokens)) for _ in range(steps)]
    for row in range(rows):
        runner.cache.lengths[row] = runner.cache.capacity  # full: the next step evicts a block in each row
    evicting = count_syncs(lambda: runner.decode(list(range(rows)), tokens))
    return per_step, evicting


def test_decode_syncs_do_not_grow_with_the_layers(dev):
    shallow, shallow_evict = _decode_syncs(dev, layers=2)
    deep, deep_evict = _decode_syncs(dev, layers=4)
    print(f"sync audit, decode of 4 rows: {shallow[0]} syncs/step with 2 layers, {deep[0]} with 4; "
          f"an evicting step: {shallow_evict} with 2 layers, {deep_evict} with 4")
    assert len(set(shallow)) == 1 and len(set(deep)) == 1, (shallow, deep)  # every step alike
    assert deep == shallow, "a decode step synchronizes once per layer"


def test_sampling_syncs_per_row_and_per_batch(dev):
    logits = torch.randn(8, 49152, device=dev) * 4  # (B, V)
    settings = {
        "greedy": SamplingParams(temperature=0),
        "top_p": SamplingParams(temperature=0.8, top_p=0.9),
        "penalties+seed": SamplingParams(temperature=0.8, repetition_penalty=1.2, presence_penalty=0.5, seed=3),
    }
    report = {}
    for name, params in settings.items():
        def one_row(params=params):
            context = list(range(50))
            penalized = penalize_logits(logits[0], params, context, context[-5:])
            sample(filter_logits(penalized, params), params)
        one_row()
        report[name] = count_syncs(one_row)
    plain = [SamplingParams(temperature=0.8, top_k=40)] * 8
    sample_batch(logits, plain)
    batched = count_syncs(lambda: sample_batch(logits, plain))
    print(f"sync audit, sampling: per row {report}; sample_batch over 8 rows: {batched}")
    assert batched <= 1, "sample_batch promises one host transfer for the whole batch"
    assert all(count >= 1 for count in report.values())  # a token id reaches the host: at least one


@pytest.mark.parametrize("buckets", [True, False], ids=["graphs", "eager"])
def test_an_owned_decode_step_synchronizes_once_at_most(dev, buckets):
    """The server's decode path (the owned step; with ``buckets`` padded to a bucket and replayed from its CUDA
    graph): no sync in the step itself, an evicting one included (the token ids and the step's slots cross
    from pinned memory without blocking), and one at most with the batch's sampling (the sampled ids)."""
    rows, steps = list(range(5)), 4
    runner = runner_on(deep_model(num_hidden_layers=2), dev, torch.float32, rows=8, window=124, evict_block=8,
                       owned=True, buckets=buckets)
    if buckets:
        runner.warm_up(max_batch=8)
        assert runner.static_steps.step_for(rows).graph is not None  # 5 rows replay the 8-row graph
    for row in rows:
        runner.prefill(row, list(range(1, 60 + row)), 32)
    tokens, plain = [1] * len(rows), [SamplingParams(temperature=0.8, top_k=40)] * len(rows)

    def sampled() -> None:
        sample_batch(runner.decode(rows, tokens), plain)

    def evicting() -> None:
        for row in rows:
            runner.cache.lengths[row] = runner.cache.capacity  # full: the step evicts a block in each row
        runner.decode(rows, tokens)

    sampled()
    evicting()  # first calls: lazy initialisations (the re-rotation's angles) out of the count
    decode = [count_syncs(lambda: runner.decode(rows, tokens)) for _ in range(steps)]
    with_sampling = [count_syncs(sampled) for _ in range(steps)]
    evict = count_syncs(evicting)
    print(f"sync audit, owned decode of 5 rows ({'graphs' if buckets else 'eager'}): {decode} syncs a step, "
          f"{with_sampling} with sampling, {evict} evicting")
    assert max(decode) == 0 and evict == 0, "the decode step synchronizes with the host"
    assert max(with_sampling) <= 1, "a decode step and its sampling synchronize more than once"
