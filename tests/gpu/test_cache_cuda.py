"""The sink cache and runner on CUDA at the served defaults (4 sinks + 1020 window, blocks of 64), against the
float64 reference of tests/engine/reference_cache.py through many evictions; device spellings; session caches
exported to a file and imported across devices and dtypes."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig
from engine.model.loader import prepare
from engine.model.runner import Runner
from tests.engine.reference_cache import ReferenceCache
from tests.gpu.conftest import BLOCK, SINKS, WINDOW, deep_model, needs_cuda, needs_gpu, runner_on

pytestmark = needs_gpu


@needs_cuda
def test_auto_cuda_and_cuda0_are_one_device():
    from engine.model.device import describe, resolve_device, resolve_dtype

    devices = [resolve_device(spec) for spec in ("auto", "cuda", "cuda:0" if torch.cuda.current_device() == 0
                                                 else f"cuda:{torch.cuda.current_device()}")]
    assert len(set(devices)) == 1 and devices[0].type == "cuda", devices
    params = {next(torch.nn.Linear(2, 2).to(d).parameters()).device for d in devices}
    assert params == {devices[0]}  # tensors land on the resolved device itself
    major, _ = torch.cuda.get_device_capability(devices[0])
    assert resolve_dtype("auto", devices[0]) == ("bfloat16" if major >= 8 else "float16")
    print(describe(devices[0]))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-3), (torch.bfloat16, 0.15)])
def test_default_cache_follows_the_float64_policy(dev, dtype, tolerance):
    """Every logit of a 3,000-token stream (2,000 evicted, about 31 blocks) close to the exact policy."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = deep_model()
    exact = copy.deepcopy(model).double()  # the reference runs in float64 on the CPU
    runner = runner_on(model, dev, dtype)
    loaded = prepare(exact, None, "ref", EngineConfig(sink_tokens=SINKS, window=WINDOW, evict_block=BLOCK))
    reference = ReferenceCache(loaded.shape.num_layers, SINKS + WINDOW, SINKS, BLOCK, loaded.inv_freqs)
    stream = torch.randint(0, 96, (3000,), generator=torch.Generator().manual_seed(2))
    rng, position, worst = random.Random(0), 0, 0.0
    while position < len(stream):
        size = min(rng.choice([1, 1, 1, 3, 16, 40, 64]), len(stream) - position)
        chunk = stream[None, position : position + size]
        got = runner.forward([0], chunk, all_logits=True)[0].double().cpu()  # (T, V)
        start = reference.begin(size)
        with torch.no_grad():
            want = exact(input_ids=chunk, position_ids=torch.arange(start, start + size)[None],
                         attention_mask=reference.mask(), cache=reference, use_cache=True).logits[0]
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
        position += size
    assert runner.cache.evicted[0] >= 1900 and runner.cache.lengths[0] == reference.length
    print(f"{dtype} on {dev}: worst relative logit error over 3000 tokens {worst:.2e}")
    assert worst < tolerance, worst


def _fill(runner: Runner, tokens: torch.Tensor) -> None:
    for start in range(0, tokens.shape[1], 256):
        runner.forward([0], tokens[:, start : start + 256])


@pytest.mark.parametrize("first,second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_session_file_moves_between_devices_and_dtypes(dev, tmp_path, first, second):
    """export -> file -> import into a cache on the other device and the other dtype, and back: the saved
    tensors come back bit for bit (bf16 -> float32 -> bf16 is exact), and the restored row's next logits
    equal the original row's. (Logits of a bf16 and a float32 model differ by the model's own precision,
    not the cache's, so the float32 leg is compared by its tensors.)"""
    where = {"cuda": dev, "cpu": torch.device("cpu")}
    model = deep_model()
    bf16 = runner_on(copy.deepcopy(model), where[first], torch.bfloat16)
    f32 = runner_on(copy.deepcopy(model), where[second], torch.float32)
    stream = torch.randint(0, 96, (1, 1500), generator=torch.Generator().manual_seed(4))
    _fill(bf16, stream)  # evicts: the counters travel too
    saved = bf16.cache.export_row(0)
    save_file({k: v.contiguous() for k, v in saved.items()}, str(tmp_path / "a.safetensors"))
    f32.cache.import_row(0, load_file(str(tmp_path / "a.safetensors")))
    assert f32.cache.state(0) == bf16.cache.state(0)
    again = f32.cache.export_row(0)
    torch.testing.assert_close(again["k"].to(torch.bfloat16), saved["k"], atol=0, rtol=0)
    save_file({k: v.contiguous() for k, v in again.items()}, str(tmp_path / "b.safetensors"))
    back = runner_on(copy.deepcopy(model), where[first], torch.bfloat16)
    back.cache.import_row(0, load_file(str(tmp_path / "b.safetensors")))
    for name in ("k", "v"):
        torch.testing.assert_close(back.cache.export_row(0)[name], saved[name], atol=0, rtol=0)
    following = stream[:, :7] + 1
    torch.testing.assert_close(back.forward([0], following), bf16.forward([0], following), atol=0, rtol=0)
