"""Decode batches padded to buckets and replayed from CUDA graphs (engine/model/graphs.py) against the eager
owned step: the same greedy tokens at every bucket (1, 2, 4, ... 64 rows) and at batches padded up to one,
through a rolling window; every graph captured at warm-up and none after it; rows a graph cannot serve
decode eagerly. Rehearsed on a CPU (``SINKSERVE_GPU_TEST_DEVICE=cpu``) over PyTorch's attention, the path
a GPU takes, with the static steps run eagerly instead of replayed."""

from __future__ import annotations

import pytest
import torch

from tests.engine.generation import greedy_decode
from tests.gpu.conftest import deep_model, needs_gpu, runner_on

pytestmark = needs_gpu

ROWS = 64
SIZES = [1, 2, 4, 8, 16, 32, 64]


def _runners(dev, dtype):
    """An eager runner and a padding one (graphs captured at its warm-up on CUDA) over identical caches."""
    model = deep_model(num_hidden_layers=2)
    runners = [runner_on(model, dev, dtype, rows=ROWS, window=28, evict_block=4, owned=True, buckets=b)
               for b in (False, True)]
    for runner in runners:
        runner.decoder.attention_kernel = False  # a GPU's attention (PyTorch's), rehearsed on a CPU too
    runners[1].warm_up(max_batch=ROWS)
    return runners


def _prompts(batch: int) -> list[list[int]]:
    return [[1 + (row * 7 + i * 3) % 90 for i in range(3 + row % 11)] for row in range(batch)]


def _reset(*runners) -> None:
    for runner in runners:
        for row in range(ROWS):
            runner.cache.reset(row)


def _captured(steps, dev) -> int:
    """Graphs captured at warm-up: on CUDA one per bucket, none failed."""
    assert steps.sizes == SIZES
    if dev.type == "cuda":
        assert not steps.failures, steps.failures
        assert steps.captures == len(SIZES) and all(step.graph is not None for step in steps.steps.values())
    return steps.captures


def test_graph_decode_matches_eager_token_for_token_at_every_bucket(dev):
    eager, graphed = _runners(dev, torch.float32)
    steps = graphed.static_steps
    captured = _captured(steps, dev)
    for batch in [*SIZES, 3, 47]:  # every bucket, and two batches padded up to one
        assert steps.step_for(list(range(batch))) is steps.steps[min(s for s in SIZES if s >= batch)]
        _reset(eager, graphed)
        prompts = _prompts(batch)
        expected, expected_logits = greedy_decode(eager, prompts, steps=30)  # 30 steps: the window (28) rolls
        got, got_logits = greedy_decode(graphed, prompts, steps=30)
        assert graphed.cache.lengths == eager.cache.lengths and max(graphed.cache.evicted) > 0
        assert got == expected, f"{batch} rows"
        torch.testing.assert_close(got_logits, expected_logits, atol=1e-3, rtol=1e-3)
    assert steps.captures == captured, "a CUDA graph was captured after the warm-up"


def test_bf16_graph_decode_stays_within_rounding_of_eager(dev):
    """bf16 sums in another order with another row count or over more (masked) slots: the first step's logits
    within bf16 rounding, the same token wherever the eager step's best two are not near a tie."""
    eager, graphed = _runners(dev, torch.bfloat16)
    captured = _captured(graphed.static_steps, dev)
    for batch in [*SIZES, 3, 47]:
        _reset(eager, graphed)
        rows, prompts = list(range(batch)), _prompts(batch)
        for runner in (eager, graphed):
            for row, prompt in zip(rows, prompts, strict=True):
                runner.prefill(row, prompt, 16)
        tokens = [5 + row % 50 for row in rows]
        expected, got = eager.decode(rows, tokens), graphed.decode(rows, tokens)
        torch.testing.assert_close(got, expected, atol=0.3, rtol=0.05)
        best = expected.topk(2, dim=-1).values
        clear = (best[:, 0] - best[:, 1] > 0.6).tolist()
        assert sum(clear) >= batch // 2
        for row, (e, g) in enumerate(zip(expected.argmax(-1).tolist(), got.argmax(-1).tolist(), strict=True)):
            assert e == g or not clear[row], f"row {row} of {batch}"
    assert graphed.static_steps.captures == captured


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_its_step_run_eagerly(dev, dtype):
    """A replayed graph against the very step it recorded, run eagerly over the same inputs: the same logits
    and the same cache slots (the same kernels; only a capture that recorded the wrong buffers differs)."""
    _, graphed = _runners(dev, dtype)
    cache, steps = graphed.cache, graphed.static_steps
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for batch in [*SIZES, 3]:
        _reset(graphed)
        rows = list(range(batch))
        for row, prompt in zip(rows, _prompts(batch), strict=True):
            graphed.prefill(row, prompt, 16)
        static, tokens = steps.step_for(rows), [7] * batch
        for _ in range(6):
            step = cache.step(rows, 1)
            with torch.inference_mode():
                static.load(step.rows, step.offsets, tokens)
                eager_logits = static.compute()[:batch].clone()
                eager_cache = [buf[:ROWS].clone() for buf in cache.k + cache.v]
                replayed = static(step.rows, step.offsets, tokens)  # the graph on CUDA
            torch.testing.assert_close(replayed, eager_logits, **tolerance)
            for buf, expected in zip(cache.k + cache.v, eager_cache, strict=True):
                torch.testing.assert_close(buf[:ROWS], expected, **tolerance)
            tokens = replayed.argmax(-1).tolist()


def test_rows_no_graph_serves_decode_eagerly(dev):
    eager, graphed = _runners(dev, torch.float32)
    for runner in (eager, graphed):
        for row, prompt in zip((5, 0, 9), _prompts(3), strict=True):
            runner.prefill(row, prompt, 16)
    rows, tokens = [5, 0, 9], [11, 12, 13]  # not rows 0..B-1: no static step reads them in place
    assert graphed.static_steps.step_for(rows) is None
    captured = graphed.static_steps.captures
    torch.testing.assert_close(graphed.decode(rows, tokens), eager.decode(rows, tokens), atol=1e-4, rtol=1e-4)
    assert graphed.cache.lengths == eager.cache.lengths
    assert graphed.static_steps.captures == captured
