"""Weight quantization: int4 codes recover Q4_1 weights, and the int4 decode path tracks the float one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.cache.sink import SinkCache
from engine.config import EngineConfig
from engine.model.loader import prepare
from engine.model.quantize import (
    Int4Linear,
    PackedLinear,
    float_weights,
    int4_codes,
    int4_dequantize,
    quantize,
    quantize_int4,
)
from engine.model.runner import Runner
from tests.tiny_models import tiny_chat_engine_parts, tiny_model


def q4_1_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight built the way llama.cpp's Q4_1 stores it: per block of 32, ``d * q + m`` with q in 0..15.

    Like ggml's quantizer, every block uses its whole code range (its minimum has q = 0, its maximum 15).
    """
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, 15
    d = torch.rand(n, k // 32, generator=g) * 0.02 + 1e-3
    m = -(7.5 + torch.randn(n, k // 32, generator=g)) * d  # a block's minimum: about half its range below 0
    d, m = (x.half().float().repeat_interleave(32, 1) for x in (d, m))
    return d * codes + m, codes


def test_int4_codes_recover_a_q4_1_weight():
    weight, codes = q4_1_weight(48, 96)
    got, scales_zeros = int4_codes(weight)
    assert torch.equal(got, codes.to(torch.int32))  # the file's 4-bit codes come back unchanged
    error = (int4_dequantize(got, scales_zeros) - weight).abs()
    step = scales_zeros[..., 0].float().T.repeat_interleave(32, 1)
    assert float((error / step).max()) < 0.1  # only the bf16 rounding of scale and zero remains


def test_int4_codes_of_any_weight_round_to_the_nearest_level():
    weight = torch.randn(40, 64)
    codes, scales_zeros = int4_codes(weight)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    step = scales_zeros[..., 0].float().T.repeat_interleave(32, 1)
    assert float(((int4_dequantize(codes, scales_zeros) - weight).abs() / step).max()) <= 0.5 + 1e-3
    with pytest.raises(ValueError, match="multiple"):
        int4_codes(torch.randn(8, 40))


def test_int4_linear_uses_codes_for_few_rows_and_float_weights_for_many():
    linear = torch.nn.Linear(64, 48, bias=True).requires_grad_(False)
    weight, _ = q4_1_weight(48, 64, seed=1)
    linear.weight.copy_(weight)
    layer = Int4Linear(linear, max_rows=4)
    few, many = torch.randn(2, 3, 64), torch.randn(5, 64)
    expected = torch.nn.functional.linear(few, weight, linear.bias)
    got = layer(few)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert float((got - expected).abs().max()) < 2e-2 * float(expected.abs().max())  # bf16 activations
    torch.testing.assert_close(layer(many), torch.nn.functional.linear(many, weight, linear.bias))
    with float_weights(torch.nn.Sequential(layer)):
        torch.testing.assert_close(layer(few), expected)


def test_packed_linear_is_the_float_linear():
    linear = torch.nn.Linear(64, 300, bias=False).requires_grad_(False)
    layer = PackedLinear(linear, max_rows=8)
    for x in (torch.randn(1, 64), torch.randn(2, 4, 64), torch.randn(20, 64)):  # packed, packed, plain
        torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-5)


def test_int4_model_decodes_like_the_float_model():
    """The embedded model's situation: float weights that are dequantized 4-bit weights."""
    model, _ = tiny_chat_engine_parts()
    with torch.no_grad():
        for layer in model.model.layers.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(int4_dequantize(*int4_codes(layer.weight)))
    config = EngineConfig(sink_tokens=4, window=28, evict_block=4)
    loaded = prepare(model, None, "tiny", config)
    stream = [1, 5, 9, 13, 2, 40, 41] + [(7 * i) % 90 + 3 for i in range(40)]  # the window rolls

    def decode(runner: Runner) -> torch.Tensor:
        runner.cache.reset(0)
        runner.prefill(0, stream[:7], 16)
        return torch.stack([runner.decode([0], [token])[0] for token in stream[7:]])

    cache = SinkCache(loaded.shape, 1, config.cache_size, 4, 4, loaded.inv_freqs)
    reference = decode(Runner(model, cache))
    quantize_int4(model, torch.device("cpu"))
    swapped = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(swapped) == 2 * 7  # q, k, v, o, gate, up, down of both layers; not the output projection
    assert isinstance(model.get_output_embeddings(), PackedLinear)  # float32, packed
    got = decode(Runner(model, cache))
    # same weights; only the activations entering the 4-bit matmuls are rounded to bf16
    assert float((got - reference).abs().max()) < 0.02 * float(reference.abs().max())
    with float_weights(model):
        torch.testing.assert_close(decode(Runner(model, cache)), reference)


def test_quantize_modes():
    model = tiny_model("llama")
    assert quantize(model, None, torch.device("cpu")) is model
    with pytest.raises(ValueError, match="int4"):
        quantize(model, "int3", torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU"):
        quantize_int4(model, torch.device("meta"))
    with pytest.raises(ValueError):
        EngineConfig(quantize="int3")


def test_auto_picks_int4_for_q4_1_weights_on_cpu_only(tmp_path):
    from engine.model.loader import embedded_gguf_path, gguf_weight_types, resolve_quantize

    assert gguf_weight_types(embedded_gguf_path(), tmp_path) == {"Q4_1"}  # the embedded model
    assert (tmp_path / "sinkserve-gguf.json").exists()  # remembered beside the converted weights
    assert gguf_weight_types(Path("/nonexistent.gguf"), tmp_path) == {"Q4_1"}  # read back, not re-parsed
    cpu, q4_1 = torch.device("cpu"), {"Q4_1"}
    assert resolve_quantize(EngineConfig(), cpu, q4_1) == "int4"
    assert resolve_quantize(EngineConfig(), torch.device("cuda"), q4_1) is None
    assert resolve_quantize(EngineConfig(dtype="bfloat16"), cpu, q4_1) is None
    assert resolve_quantize(EngineConfig(), cpu, {"Q4_1", "Q6_K"}) is None  # other blocks would be re-rounded
    assert resolve_quantize(EngineConfig(), cpu, set()) is None  # a Hugging Face directory
    assert resolve_quantize(EngineConfig(quantize=None), cpu, q4_1) is None
    assert resolve_quantize(EngineConfig(quantize="int8"), cpu, set()) == "int8"


def test_settings_and_cli_values():
    from engine.config import parse_quantize
    from server.settings import Settings

    assert Settings().engine_config().quantize == "auto"
    assert Settings(quantize="none").engine_config().quantize is None
    assert Settings(quantize="INT4").engine_config().quantize == "int4"
    assert parse_quantize("off") is None
    with pytest.raises(ValueError, match="quantize"):
        Settings(quantize="int2")
