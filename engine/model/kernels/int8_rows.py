"""An 8-bit matmul for the output projection of decode steps, each weight converted once for all the rows.

The output projection (49,152 x 576 in the embedded model) is the largest single read of a decode step. Its
8-bit copy (symmetric codes, a scale per output: :func:`engine.model.linear._prepare`'s ``int8``) halves
the bytes of bf16, but PyTorch's CPU kernel for it (``_weight_int8pack_mm``) converts every weight again
for each row: on a 2-core Xeon, 3.3 ms at 1 row and 7.2 ms at 8 against bf16-packed's 3.4 and 3.1. This
kernel (``kernels/int8_rows.c``) keeps up to 8 rows' accumulators in registers (3 on AVX2), converts each
code once and scales each output once at the end: 2.8 ms at 1 row, 3.5 at 8 (an indication from an ad-hoc
script; the decode step's tuning measures it against the others on the running machine, in whole steps).
It takes the same codes and scales and float32 activations (PyTorch's rounds them to bf16), so it computes
the product of the same weights, a little more exactly.

Built at start for the running CPU (:mod:`engine.model.kernels.native`); where it cannot be, PyTorch's ``int8`` kernel
stays the head's 8-bit candidate (:func:`engine.model.linear.candidate_kernels`).
"""

from __future__ import annotations

import ctypes

import torch

from engine.model.kernels import native

BLOCK = native.MATMUL_BLOCK  # outputs per block of the layout


# library(): the kernel built for this CPU, once; build(march): for another (native.loader)
library, build = native.loader("int8_rows", {"int8_rows_matmul": native.MATMUL_SIGNATURE})


def available() -> bool:
    return library() is not None


def supports(out_features: int) -> bool:
    return out_features % BLOCK == 0


def pack(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout of ``codes`` (N, K) int8 and ``scales`` (N,): codes (N / 32, K, 32) int8, byte j of
    (b, k) the code of output ``32 b + j`` for input k; scales (N,) float32."""
    n, k = codes.shape
    blocks = codes.to(torch.int8).reshape(n // BLOCK, BLOCK, k).transpose(1, 2).contiguous()
    return blocks, scales.to(torch.float32).contiguous()


def bind(packed: torch.Tensor, scales: torch.Tensor, lib: ctypes.CDLL | None = None):
    """``x`` (M, K) -> ``x @ W.T`` (M, N) float32 for the weight W that :func:`pack`'s inputs stand for, as one
    callable with its weight bound. ``lib``: another build than :func:`library` (tests)."""
    fn = (lib or library()).int8_rows_matmul
    return native.bind_matmul("int8-rows", fn, packed, scales, group=packed.shape[1], in_features=packed.shape[1],
                              dtype=torch.float32, rows_per_call=None)
