"""The int8-rows kernel (engine/model/kernels/int8_rows.py) against the product of its dequantized weights, on this CPU's
build and the AVX2 one, for row counts across its register blocks; and where it replaces PyTorch's 8-bit
kernel as the output projection's candidate."""

from __future__ import annotations

import pytest
import torch

from engine.model import linear
from engine.model.kernels import int8_rows
from engine.model.linear import DecodeLinear, candidate_kernels

needs_kernel = pytest.mark.skipif(not int8_rows.available(), reason="no C compiler to build the kernel")


def codes_and_scales(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The output projection's 8-bit copy of a random weight (decode_linear's ``int8``)."""
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return linear._prepare("int8", weight, None)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 8, 9, 17])
def test_the_product_of_the_same_weights(rows):
    codes, scales = codes_and_scales(96, 80)
    x = torch.randn(rows, 80)
    expected = x.double() @ (codes.double() * scales.double()[:, None]).T  # (rows, 96)
    got = int8_rows.bind(*int8_rows.pack(codes, scales))(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)


@needs_kernel
@pytest.mark.skipif("avx512f" not in open("/proc/cpuinfo").read(), reason="the AVX2 build is tested on AVX-512")
def test_the_avx2_build():
    codes, scales = codes_and_scales(64, 48, seed=1)
    x = torch.randn(5, 48)
    expected = x.double() @ (codes.double() * scales.double()[:, None]).T
    got = int8_rows.bind(*int8_rows.pack(codes, scales), lib=int8_rows.build("haswell"))(x)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)


@needs_kernel
def test_it_replaces_pytorchs_8_bit_kernel_for_the_output_projection():
    cpu = torch.device("cpu")
    head = candidate_kernels(cpu, torch.float32, "int4", output=True)
    assert "int8-rows" in head and "int8" not in head
    assert "int8-rows" not in candidate_kernels(cpu, torch.float32, "int4", output=False)
    layer = DecodeLinear(torch.randn(96, 64), None, ("int8", "int8-rows"))
    assert layer.weight_bytes("int8-rows") - layer.weight_bytes("int8") == 96 * 2  # float32 scales, same codes
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer.run("int8-rows", x), layer.run("int8", x).float(), atol=0.05, rtol=0.02)
    assert set(DecodeLinear(torch.randn(48, 64), None, ("int8", "int8-rows")).weights) == {"int8"}  # 32s only
    with pytest.raises(ValueError, match="input"):
        layer.run("int8-rows", torch.randn(2, 32))


def test_without_a_compiler_pytorchs_kernel_stays(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert int8_rows.library.__wrapped__() is None  # the build fails quietly, uncached
    monkeypatch.setattr(int8_rows, "available", lambda: False)
    assert "int8" in candidate_kernels(torch.device("cpu"), torch.float32, "int4", output=True)
