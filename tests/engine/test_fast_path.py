"""The compiled decode path against the eager reference: same tokens under greedy decoding."""

from __future__ import annotations

import pytest
import torch

from engine.cache import SinkCache
from engine.config import EngineConfig
from engine.loader import prepare
from engine.quantize import quantize_int4
from engine.runner import Runner
from tests.tiny_models import tiny_model


def _greedy(runner: Runner, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], torch.Tensor]:
    rows = list(range(len(prompts)))
    last = [int(runner.prefill(row, p, 16).argmax()) for row, p in zip(rows, prompts, strict=True)]
    out = [[t] for t in last]
    for _ in range(steps):
        logits = runner.decode(rows, last)  # (B, V)
        last = logits.argmax(-1).tolist()
        for seq, token in zip(out, last, strict=True):
            seq.append(token)
    return out, logits


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
    eager, eager_logits = _greedy(make(False), prompts, steps=40)  # 40 steps: the window rolls
    fast_runner = make(True)
    fast_runner.warm_up()
    fast, fast_logits = _greedy(fast_runner, prompts, steps=40)
    assert fast == eager
    torch.testing.assert_close(fast_logits, eager_logits, atol=1e-4, rtol=1e-4)
