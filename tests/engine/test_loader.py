"""Model loading: Hugging Face directories, refusal of models the cache cannot serve, size checks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from engine.config import EngineConfig
from engine.loader import load, prepare
from engine.rope import UnsupportedModelError
from tests.tiny_models import COMMON, tiny_chat_engine_parts


def test_loads_a_hugging_face_directory(tmp_path):
    model, tokenizer = tiny_chat_engine_parts()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    # pinned to the CPU in float32: on a GPU host `auto` would load bf16 on CUDA and the comparison below
    # is with the float32 CPU model (tests/gpu/ covers CUDA)
    loaded = load(EngineConfig(model=str(tmp_path / "tiny"), sink_tokens=4, window=60, evict_block=8,
                               device="cpu", dtype="float32"))
    assert loaded.name == "tiny"
    assert loaded.shape.num_layers == 2 and loaded.max_positions == 128
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)


def test_refuses_a_model_without_rope():
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=256)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="rotary"):
        prepare(model, None, "gpt2", EngineConfig(sink_tokens=4, window=60, evict_block=8))


def test_refuses_dynamic_rope_scaling():
    config = LlamaConfig(**COMMON, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        prepare(model, None, "dyn", EngineConfig(sink_tokens=4, window=60, evict_block=8))


def test_refuses_a_cache_larger_than_the_models_positions():
    model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON))  # 512 positions
    with pytest.raises(ValueError, match="512"):
        prepare(model, None, "small", EngineConfig(sink_tokens=4, window=600, evict_block=8))


def test_int8_quantization_keeps_the_model_close():
    from engine.quantize import quantize_int8

    model, _ = tiny_chat_engine_parts()
    ids = torch.tensor([[5, 9, 200, 7, 31]])
    expected = model(ids).logits
    quantized = quantize_int8(model, torch.device("cpu"))
    assert any("quantized" in type(m).__module__ for m in quantized.modules())
    got = quantized(ids).logits
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()
    with pytest.raises(ValueError):
        EngineConfig(quantize="int3")


def test_auto_dtype_is_bfloat16_on_a_gpu_and_float32_on_a_cpu(monkeypatch):
    from engine.loader import resolve_dtype

    # a bf16-capable card, described to a CPU host (tests/engine/test_device.py covers cards without bf16)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("float16", torch.device("cuda")) == "float16"
    assert EngineConfig().dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="float8")
