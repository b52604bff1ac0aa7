"""Our 4-bit kernels (engine/model/kernels/int4_rows.py, engine/model/kernels/int4_rows.c) against the float product of the weight
their codes stand for (engine.model.quantize.int4_dequantize), for every row count they take and the shapes of the
embedded model's layers (the AMX one where the CPU has AMX); and that without a compiler they are no
candidates at all."""

from __future__ import annotations

import pytest
import torch

from engine.model import linear
from engine.model.kernels import int4_rows, native
from engine.model.linear import DecodeLinear, candidate_kernels
from engine.model.quantize import INT4_GROUP, int4_codes, int4_dequantize

needs_kernel = pytest.mark.skipif(not int4_rows.available(), reason="no C compiler for this CPU's int4-rows kernel")
needs_amx = pytest.mark.skipif(not int4_rows.amx_available(), reason="no AMX on this CPU (or no compiler)")


@needs_kernel
@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 1536), (64, 32)])
def test_the_kernel_computes_the_float_product_of_its_codes(n, k):
    torch.manual_seed(n + k)
    codes, scales_zeros = int4_codes(torch.randn(n, k))
    weight = int4_dequantize(codes, scales_zeros)
    packed, scales = int4_rows.pack(codes, scales_zeros)
    run = int4_rows.bind(packed, scales, INT4_GROUP)
    for rows in (*range(1, 12), 16, 17):  # row chunks of 8 (AVX-512) or 3 (AVX2), and what is left over
        x = torch.randn(rows, k)
        expected = x.double() @ weight.double().T
        got = run(x)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        torch.testing.assert_close(got.double(), expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)
    # bf16 and non-contiguous inputs are taken as float32 copies
    x = torch.randn(k, 3).T
    torch.testing.assert_close(run(x), run(x.contiguous()), atol=0, rtol=0)
    torch.testing.assert_close(run(x.to(torch.bfloat16)), run(x.to(torch.bfloat16).float()), atol=0, rtol=0)


@needs_kernel
def test_each_output_block_is_its_own_weight_rows():
    # one weight row non-zero at a time: the product lands in exactly that output, whatever its block and nibble
    k = 64
    for row in (0, 15, 16, 31, 32, 63):
        weight = torch.zeros(64, k)
        weight[row] = torch.linspace(-1, 1, k)
        codes, scales_zeros = int4_codes(weight)
        got = int4_rows.matmul(torch.ones(2, k), *int4_rows.pack(codes, scales_zeros), INT4_GROUP)
        expected = torch.ones(2, k) @ int4_dequantize(codes, scales_zeros).T
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert got[:, row].abs().min() > 0


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return any(flag in line.split() for line in info if line.startswith("flags"))
    except OSError:
        return False


@pytest.mark.skipif(not (int4_rows.available() and _cpu_has("avx512f") and _cpu_has("avx2") and _cpu_has("fma")),
                    reason="only where the native build is the AVX-512 one and AVX2 runs too")
def test_the_avx2_build_computes_the_same_product():
    """CPUs differ between machines (AVX-512 here, AVX2 only on others): the AVX2 path (3 rows a chunk, 8-wide
    vectors, its own nibble unpacking) is built for Haswell and checked here too."""
    lib = int4_rows.build("haswell")
    assert lib is not None
    assert lib.int4_amx_init() == -1  # no AMX in that build: the AMX kernel is never offered from it
    torch.manual_seed(1)
    for n, k in ((960, 576), (64, 32)):
        codes, scales_zeros = int4_codes(torch.randn(n, k))
        weight = int4_dequantize(codes, scales_zeros)
        run = int4_rows.bind(*int4_rows.pack(codes, scales_zeros), INT4_GROUP, lib=lib)
        for rows in (1, 2, 3, 4, 7, 8, 17):
            x = torch.randn(rows, k)
            expected = x.double() @ weight.double().T
            torch.testing.assert_close(run(x).double(), expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)


@needs_amx
@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 1536), (64, 32)])
def test_the_amx_kernel_computes_the_product_within_bf16(n, k):
    """bf16 activations and dequantized weights, float32 sums: within 1% of the largest output (measured
    ~0.3%); a miswired layout (pairs, halves, nibbles) gives errors of the outputs' own size."""
    torch.manual_seed(n * k)
    codes, scales_zeros = int4_codes(torch.randn(n, k))
    weight = int4_dequantize(codes, scales_zeros)
    run = int4_rows.bind_amx(*int4_rows.pack_pairs(codes, scales_zeros), INT4_GROUP)
    for rows in (1, 2, 7, 8, 15, 16, 17, 40):  # more than 16 rows run 16 at a time
        x = torch.randn(rows, k)
        expected = x @ weight.T
        got = run(x)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        assert (got - expected).abs().max() < 0.01 * expected.abs().max(), rows
    for row in (0, 7, 8, 15, 16, 31):  # each output from its own weight row only
        weight = torch.zeros(32, k)
        weight[row] = torch.linspace(0.1, 1, k)  # positive: its sum does not cancel out
        codes, scales_zeros = int4_codes(weight)
        got = int4_rows.bind_amx(*int4_rows.pack_pairs(codes, scales_zeros), INT4_GROUP)(torch.ones(1, k))
        assert got[0, row] != 0 and torch.count_nonzero(got) == 1
        torch.testing.assert_close(got[0, row], (int4_dequantize(codes, scales_zeros)[row]).sum(), rtol=0.01, atol=0.01)


@needs_kernel
def test_shapes_it_does_not_take():
    assert not int4_rows.supports(48, 64, INT4_GROUP)  # outputs in blocks of 32
    assert not int4_rows.supports(64, 48, INT4_GROUP)  # inputs in groups
    layer = DecodeLinear(torch.randn(48, 64), None, ("int4", "int4-rows", "int4-amx"))
    assert set(layer.weights) == {"int4"}
    packed, scales = int4_rows.pack(*int4_codes(torch.randn(64, 64)))
    with pytest.raises(ValueError, match="input"):
        int4_rows.bind(packed, scales, INT4_GROUP)(torch.randn(2, 32))


def test_without_a_compiler_it_is_no_candidate(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert int4_rows.library.__wrapped__() is None  # the build fails quietly, uncached
    monkeypatch.setattr(int4_rows, "available", lambda: False)
    monkeypatch.setattr(int4_rows, "amx_available", lambda: False)
    assert not {"int4-rows", "int4-amx"} & set(candidate_kernels(torch.device("cpu"), torch.float32, "int4", False))
    assert "int4" in candidate_kernels(torch.device("cpu"), torch.float32, "int4", output=False)


@needs_kernel
def test_it_is_a_candidate_for_the_layers_only():
    cpu = torch.device("cpu")
    assert "int4-rows" in candidate_kernels(cpu, torch.float32, "int4", output=False)
    assert "int4-rows" not in candidate_kernels(cpu, torch.float32, "int4", output=True)
    assert "int4-rows" not in candidate_kernels(cpu, torch.float32, None, output=False)
    assert ("int4-amx" in candidate_kernels(cpu, torch.float32, "int4", output=False)) == int4_rows.amx_available()
    assert set(linear.FOUR_BIT) == {"int4", "int4-rows", "int4-amx"} <= set(linear.KERNELS)


@needs_kernel
def test_the_kernel_runs_on_pytorchs_openmp():
    """One OpenMP runtime in the process: the kernel's parallel loops run on the calling thread's existing
    PyTorch team (a second runtime would start teams of its own, and libgomp's teams sleep between kernels
    once they outnumber the CPUs: tests/engine/test_engine_threads.py)."""
    int4_rows.library()
    runtimes = native.openmp_runtimes()
    assert len(runtimes) == 1 and "torch" in next(iter(runtimes))
