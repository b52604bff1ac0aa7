"""Host-device synchronizations per decode step, counted with ``torch.cuda.set_sync_debug_mode("warn")``
(each synchronizing CUDA call warns once): printed as a report, and checked where the design promises a
bound. A sync stalls the CPU until the GPU drains its queue, so one per layer would cost a decode step
the launch overlap that makes small batches fast."""

from __future__ import annotations

import warnings

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
