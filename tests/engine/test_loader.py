"""Model loading: Hugging Face directories, refusal of models the cache cannot serve, size checks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from engine.cache.rope import UnsupportedModelError
from engine.config import QUANTIZE_CHOICES, EngineConfig, parse_quantize
from engine.engine import Engine
from engine.events import TokenEvent
from engine.model.loader import load, logits_size, prepare
from engine.scheduling.sampling import SamplingParams
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
    from engine.model.quantize import quantize_int8

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
    from engine.model.loader import resolve_dtype

    # a bf16-capable card, described to a CPU host (tests/engine/test_device.py covers cards without bf16)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_dtype("auto", torch.device("cuda")) == "bfloat16"
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("float16", torch.device("cuda")) == "float16"
    assert EngineConfig().dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="float8")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tokenizer = tiny_chat_engine_parts()
    directory = tmp_path_factory.mktemp("models") / "tiny"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("choice", QUANTIZE_CHOICES)
async def test_every_quantize_choice_serves_a_few_tokens(tiny_dir, tmp_path, choice):
    """Each ``--quantize`` the CLI accepts loads, reports the logits' size and generates (int8 once 500'd)."""
    config = EngineConfig(model=str(tiny_dir), sink_tokens=4, window=60, evict_block=8, device="cpu",
                          dtype="float32", quantize=parse_quantize(choice), data_dir=tmp_path / "sessions")
    engine = Engine(config).start()
    try:
        assert engine.loaded.quantize == {"int4": "int4", "int8": "int8"}.get(choice)  # auto: not a Q4_1 GGUF
        assert engine.vocab_size == len(engine.tokenizer) == engine.loaded.model.config.vocab_size
        gen = await engine.generate([1, 5, 9, 200], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                                    session_id=f"quantize-{choice}")
        tokens = [e.token_id for e in [e async for e in gen] if isinstance(e, TokenEvent)]
        assert len(tokens) == 4 and all(0 <= t < engine.vocab_size for t in tokens)
        assert gen.finished.finish_reason == "length"
    finally:
        engine.stop()


def test_logits_size_reads_a_quantized_head():
    from engine.model.quantize import quantize_int8

    model, tokenizer = tiny_chat_engine_parts()
    quantized = quantize_int8(model, torch.device("cpu"))
    assert callable(quantized.get_output_embeddings().weight)  # no .shape: what broke Engine.vocab_size
    assert logits_size(quantized) == len(tokenizer)


def test_sampling_defaults_come_from_the_generation_config_then_the_operator(tiny_dir):
    model, tokenizer = tiny_chat_engine_parts()
    plain = EngineConfig(sink_tokens=4, window=60, evict_block=8)
    assert prepare(model, tokenizer, "t", plain).sampling_defaults == {}  # transformers' defaults only
    card = {"temperature": 0.2, "top_p": 0.9}
    assert prepare(model, tokenizer, "t", plain, card=card).sampling_defaults == card
    model.generation_config.temperature, model.generation_config.top_p = 0.6, 0.95
    model.generation_config.do_sample = True
    assert prepare(model, tokenizer, "t", plain, card=card).sampling_defaults == {"temperature": 0.6, "top_p": 0.95}
    operator = EngineConfig(sink_tokens=4, window=60, evict_block=8, sampling_defaults={"temperature": 0.7, "top_k": 40})
    assert prepare(model, tokenizer, "t", operator).sampling_defaults == {"temperature": 0.7, "top_p": 0.95, "top_k": 40}


@pytest.mark.parametrize("bad", [{"temprature": 0.5}, {"temperature": "hot"}, {"top_p": 0.0}, {"top_k": 1.5}, [0.5]])
def test_operator_sampling_defaults_are_checked_at_start(bad):
    with pytest.raises(ValueError, match="sampling_defaults|top_p"):
        EngineConfig(sampling_defaults=bad)


@pytest.mark.parametrize("compile_decode", [False, True])
def test_int4_loads_float_modules_when_the_owned_step_decodes(tmp_path, compile_decode):
    """With int4 and the owned decode step, transformers' modules stay float (only prefill runs them) and
    decoding still goes through 4-bit weights; with --compile (transformers' forward decodes) they are
    swapped for Int4Linear as before."""
    from engine.model.quantize import Int4Linear
    from engine.model.runner import serving_runner

    model, tokenizer = tiny_chat_engine_parts()
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    config = EngineConfig(model=str(tmp_path / "tiny"), sink_tokens=4, window=60, evict_block=8, device="cpu",
                          dtype="float32", quantize="int4", compile=compile_decode)
    loaded = load(config)
    swapped = [m for m in loaded.model.modules() if isinstance(m, Int4Linear)]
    assert loaded.quantize == "int4"
    assert bool(swapped) == compile_decode
    if not compile_decode:
        from engine.cache.sink import SinkCache

        cache = SinkCache(loaded.shape, 1, config.cache_size, 4, 8, loaded.inv_freqs)
        runner = serving_runner(loaded.model, cache, loaded.quantize, max_rows=1)
        assert runner.decoder is not None
        four_bit = {"int4", "int4-rows", "int4-amx"}  # PyTorch's 4-bit kernel or ours, whichever tuning kept
        assert any(four_bit & set(layer.qkv.weights) for layer in runner.decoder.layers)
