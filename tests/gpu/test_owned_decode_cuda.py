"""The owned decode step (engine/model/families/llama.py) on the GPU against transformers' forward: the same greedy
tokens and logits through a rolling window, in float32 and bf16, for rows of different lengths."""

from __future__ import annotations

import pytest
import torch

from tests.engine.generation import greedy_decode
from tests.gpu.conftest import deep_model, needs_gpu, runner_on

pytestmark = needs_gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_owned_decode_matches_transformers(dev, dtype):
    model = deep_model(num_hidden_layers=2)
    make = lambda owned: runner_on(model, dev, dtype, rows=3, window=28, evict_block=4, owned=owned)  # noqa: E731
    reference = make(False)
    owned = make(True)
    assert owned.decoder is not None and reference.decoder is None
    prompts = [[1, 5, 9, 13, 2], [7, 7, 3], [4, 8, 15, 16, 23, 42, 11]]
    expected, expected_logits = greedy_decode(reference, prompts, steps=40)  # 40 steps: the window rolls
    got, got_logits = greedy_decode(owned, prompts, steps=40)
    if dtype == torch.float32:
        assert got == expected
        torch.testing.assert_close(got_logits, expected_logits, atol=1e-3, rtol=1e-3)
    else:  # bf16 sums in another order: the same tokens until a near tie
        assert all(g[:4] == e[:4] for g, e in zip(got, expected, strict=True))
