"""The compiled decode step on CUDA against eager: the same greedy tokens through a rolling window, and the
number of graphs compiled while serving after the warm-up (``torch._dynamo``'s counters, what
``TORCH_LOGS=recompiles`` logs). Batch buckets and their CUDA graphs, the server's GPU decode path, are
tested in tests/gpu/test_graphs_cuda.py."""

from __future__ import annotations

import pytest
import torch

from tests.engine.generation import greedy_decode
from tests.gpu.conftest import deep_model, needs_gpu, runner_on

pytestmark = needs_gpu


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_decode_matches_eager(dev, dtype):
    torch._dynamo.reset()
    model = deep_model(num_hidden_layers=2)
    make = lambda compiled: runner_on(model, dev, dtype, rows=2, window=28, evict_block=4,  # noqa: E731
                                      compile_decode=compiled)
    prompts = [[1, 5, 9, 13, 2], [4, 8, 15, 16, 23, 42, 11]]
    eager, eager_logits = greedy_decode(make(False), prompts, steps=40)  # 40 steps: the window rolls
    fast = make(True)
    fast.warm_up()
    warmed = _graphs()
    compiled, compiled_logits = greedy_decode(fast, prompts, steps=40)
    print(f"{dtype}: {warmed} graphs after the warm-up, {_graphs() - warmed} compiled while decoding")
    if dtype == torch.float32:
        assert compiled == eager
        torch.testing.assert_close(compiled_logits, eager_logits, atol=1e-3, rtol=1e-3)
    else:  # bf16 kernels fuse differently: the same tokens until a near tie, then logits of the same scale
        assert compiled[0][:4] == eager[0][:4] and compiled[1][:4] == eager[1][:4]
    assert _graphs() == warmed, "serving compiled again after the warm-up (batch sizes 1 and 2 are warmed)"
