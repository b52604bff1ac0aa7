"""Device and dtype resolution and GPU-sized defaults (engine/model/device.py), on a CPU: torch.cuda's queries are
monkeypatched to describe a card. tests/gpu/ runs the same resolution on a real one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.model import device as dev

GiB = 1024**3


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two visible cards, the current one is 0; card 0 is an H200 (sm 9.0), card 1 a T4 (sm 7.5)."""
    cards = {0: SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=141 * GiB),
             1: SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15 * GiB)}
    state = {"current": 0, "free": {0: 100 * GiB, 1: 10 * GiB}}

    def props(device):
        index = device.index if isinstance(device, torch.device) else int(device)
        return cards[index]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: cards[state["current"]].major >= 8 or including_emulation)
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (state["free"][torch.device(device).index], props(torch.device(device)).total_memory))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    return state


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_auto_cuda_and_cuda0_are_one_device(fake_cuda):
    devices = {dev.resolve_device(spec) for spec in ("auto", "cuda", "cuda:0", "CUDA:0", " cuda ")}
    assert devices == {torch.device("cuda", 0)}
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    fake_cuda["current"] = 1  # torch.cuda.set_device(1): auto and cuda follow the current card
    assert dev.resolve_device("auto") == dev.resolve_device("cuda") == torch.device("cuda", 1)
    assert dev.resolve_device("cpu") == torch.device("cpu")


def test_cuda_asked_for_without_cuda_says_why(no_cuda):
    assert dev.resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(RuntimeError, match="CUDA is not usable"):
            dev.resolve_device(spec)
    with pytest.raises(RuntimeError, match="SINKSERVE_REQUIRE_CUDA=0"):
        dev.require_cuda("auto")


def test_a_missing_card_index_is_refused(fake_cuda):
    with pytest.raises(RuntimeError, match="only 2 CUDA devices"):
        dev.resolve_device("cuda:2")


def test_auto_dtype_is_bf16_only_where_the_card_computes_in_it(fake_cuda, caplog):
    assert dev.resolve_dtype("auto", torch.device("cuda", 0)) == "bfloat16"  # H200
    assert dev.resolve_dtype("auto", torch.device("cuda", 1)) == "float16"  # T4: emulated bf16 only
    fake_cuda["current"] = 1
    assert dev.resolve_dtype("auto", torch.device("cuda", 1)) == "float16"
    assert dev.resolve_dtype("auto", torch.device("cuda", 0)) == "bfloat16"
    assert dev.resolve_dtype("auto", torch.device("cpu")) == "float32"
    # explicit choices stand, with a warning where bf16 would be emulated
    assert dev.resolve_dtype("float32", torch.device("cuda", 0)) == "float32"
    with caplog.at_level("WARNING"):
        assert dev.resolve_dtype("bfloat16", torch.device("cuda", 1)) == "bfloat16"
    assert "emulates" in caplog.text


def test_describe_names_the_card_and_the_cuda_build(fake_cuda):
    line = dev.describe(torch.device("cuda", 0))
    assert "NVIDIA H200" in line and "9.0" in line and "CUDA 13.0" in line and "141.0 GiB" in line
    assert "cpu" in dev.describe(torch.device("cpu"))


def test_cache_pool_is_a_fraction_of_free_memory_unless_configured(fake_cuda):
    h200, t4 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert dev.cache_budget_bytes(h200) == int(100 * GiB * dev.GPU_CACHE_FRACTION)
    assert dev.cache_budget_bytes(t4) == int(10 * GiB * dev.GPU_CACHE_FRACTION)
    assert dev.cache_budget_bytes(h200, fraction=0.5) == 50 * GiB
    fake_cuda["free"][0] = 40 * GiB  # the weights took memory: the pool shrinks with what is left
    assert dev.cache_budget_bytes(h200) == int(40 * GiB * dev.GPU_CACHE_FRACTION)
    assert dev.cache_budget_bytes(h200, configured=3 * GiB) == 3 * GiB
    assert dev.cache_budget_bytes(torch.device("cpu")) == dev.CPU_CACHE_BUDGET_BYTES
    with pytest.raises(ValueError, match="fraction"):
        dev.cache_budget_bytes(h200, fraction=1.5)


def test_pool_rows_fit_the_budget():
    per_row = 47_185_920  # the embedded model's 4 + 1020 slots in float32
    assert dev.pool_rows(2 * GiB, per_row, 64) == 45
    assert dev.pool_rows(100 * GiB, per_row, 64) == 64
    with pytest.raises(ValueError, match="below one session"):
        dev.pool_rows(per_row - 1, per_row, 64)


def test_max_batch_defaults_higher_on_a_gpu(fake_cuda):
    assert dev.default_max_batch(torch.device("cuda", 0)) == dev.GPU_MAX_BATCH == 64
    assert dev.default_max_batch(torch.device("cpu")) == dev.CPU_MAX_BATCH == 8
    assert dev.default_max_batch(torch.device("cuda", 0), configured=16) == 16


def test_require_cuda_command_exits_1_without_cuda(no_cuda, monkeypatch, caplog):
    monkeypatch.delenv("SINKSERVE_DEVICE", raising=False)
    monkeypatch.setenv("SINKSERVE_REQUIRE_CUDA", "1")
    with caplog.at_level("INFO"):
        assert dev.main([]) == 1
    assert "CUDA is required" in caplog.text and "torch.version.cuda" in caplog.text
    monkeypatch.setenv("SINKSERVE_REQUIRE_CUDA", "0")
    assert dev.main([]) == 0
    assert dev.main(["--require-cuda"]) == 1


def test_require_cuda_command_passes_on_a_card(fake_cuda, caplog):
    with caplog.at_level("INFO"):
        assert dev.main(["--require-cuda", "--device", "cuda"]) == 0
    assert "NVIDIA H200" in caplog.text
