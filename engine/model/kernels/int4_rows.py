"""A 4-bit matmul for decode steps of several rows that dequantizes each weight once for all the rows.

PyTorch's CPU kernel for 4-bit weights (``_weight_int4pack_mm_for_cpu``) works in blocks of at most 4 rows
and dequantizes every weight again for each block: 8 rows cost it two full passes of dequantization, and
its time grows with the rows (on a 2-core Xeon, over the embedded model's layers in a profiled step:
5.2 ms at 1 row, 14.6 ms at 8) although the bytes read stay the same. This kernel (``kernels/int4_rows.c``)
keeps up to 8 rows' accumulators in registers (3 on AVX2), so each weight is unpacked and scaled once and
then multiplied into every row. It takes the same codes, scales and zeros as the PyTorch kernel (:func:`engine.model.quantize.int4_codes`,
relaid in blocks of 32 outputs by :func:`pack`) and float32 activations, so it computes the same product
(:func:`engine.model.quantize.int4_dequantize` is the reference, tests/engine/test_int4_rows.py).

Where the CPU has AMX (Intel Sapphire Rapids and later), the same file builds a second kernel, ``int4-amx``
(:func:`amx_available`, :func:`bind_amx`): the weights are dequantized with AVX-512 into bf16 tiles and the
tile unit multiplies them by up to 16 rows of bf16 activations, so its time is the dequantization and does
not grow with the rows (over the embedded model's layers on a 2-core Xeon guest with AMX, ms at 1 / 8 /
16 rows: 10.9 / 10.4 / 10.9 against 9.2 / 14.8 / 25.9 for ``int4-rows``, an indication from an ad-hoc
script). Its activations are rounded to bf16, as PyTorch's 4-bit kernel rounds them, and its dequantized
weights too (a product within ~0.3% of the float one, tests/engine/test_int4_rows.py; perplexity:
``scripts/ppl_output_kernels.py``).

It is C built at start for the running CPU (:mod:`engine.model.kernels.native`: machines here differ, AVX-512 or AVX2
only). Where there is no compiler or the build fails, it is simply not a candidate: :mod:`engine.model.linear` measures it against the others and it
is used only where it is faster (:func:`available`).
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from engine.model.kernels import native

BLOCK = native.MATMUL_BLOCK  # outputs per block of the layout


# library(): the kernels built for this CPU, once; build(march): for another (native.loader)
library, build = native.loader("int4_rows", {"int4_rows_matmul": native.MATMUL_SIGNATURE,
                                             "int4_amx_matmul": native.MATMUL_SIGNATURE,
                                             "int4_amx_init": (ctypes.c_int, [])})


def available() -> bool:
    return library() is not None


@cache
def amx_available() -> bool:
    """Whether the AMX kernel was built (the CPU has AMX) and Linux grants this process the tile state."""
    lib = library()
    return lib is not None and lib.int4_amx_init() == 0


def supports(out_features: int, in_features: int, group: int) -> bool:
    return out_features % BLOCK == 0 and in_features % group == 0


def pack(codes: torch.Tensor, scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layout of ``codes`` (N, K) int in 0..15 and ``scales_zeros`` (K / group, N, 2) bf16 (the
    layout of :func:`engine.model.quantize.int4_codes`): codes (N / 32, K, 16) uint8, output ``32 b + j`` in the low
    nibble of byte j and ``32 b + 16 + j`` in the high one; scales (N / 32, K / group, 2, 32) bf16."""
    n, k = codes.shape
    blocks = codes.to(torch.uint8).reshape(n // BLOCK, BLOCK, k)
    packed = (blocks[:, :16] | (blocks[:, 16:] << 4)).transpose(1, 2).contiguous()  # (N / 32, K, 16)
    groups = scales_zeros.shape[0]
    scales = scales_zeros.reshape(groups, n // BLOCK, BLOCK, 2).permute(1, 0, 3, 2).contiguous()
    return packed, scales.to(torch.bfloat16)


def pack_pairs(codes: torch.Tensor, scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The AMX kernel's layout (kernels/int4_rows.c): codes (N / 32, K / 2, 32) uint8 by input pairs, for pair p
    and output ``32 b + 16 h + i`` the code of input ``2p + e`` in byte ``16 h + 2 (i % 8) + e``, low nibble for
    ``i < 8``, high for ``i >= 8``; scales as :func:`pack`'s."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n // BLOCK, 2, 16, k // 2, 2)  # block, half, output, pair, input of pair
    packed = c[:, :, :8] | (c[:, :, 8:] << 4)  # (N / 32, 2, 8, K / 2, 2)
    return packed.permute(0, 3, 1, 2, 4).reshape(n // BLOCK, k // 2, BLOCK).contiguous(), pack(codes, scales_zeros)[1]


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` (M, K) -> (M, N) float32: ``x @ W.T`` for the weight W that :func:`pack`'s inputs stand for."""
    return bind(packed, scales, group)(x)


def bind(packed: torch.Tensor, scales: torch.Tensor, group: int, lib: ctypes.CDLL | None = None):
    """:func:`matmul` with its weight bound once, as one lean callable ``x -> y`` (a decode step makes ~120
    of these calls, so what can be worked out once is: pointers, sizes, the thread count). ``lib``: another
    build than :func:`library` (tests)."""
    fn = (lib or library()).int4_rows_matmul
    return native.bind_matmul("int4-rows", fn, packed, scales, group, in_features=packed.shape[1],
                              dtype=torch.float32, rows_per_call=None)


def bind_amx(packed: torch.Tensor, scales: torch.Tensor, group: int):
    """The AMX kernel with its weight (:func:`pack_pairs`) bound, as one callable ``x -> y`` (M, N) float32;
    more than 16 rows run 16 at a time (the tile unit's rows)."""
    if not amx_available():  # it also asks Linux for the tile state, without which AMX instructions fault
        raise RuntimeError("int4-amx kernel: no AMX here, or Linux did not grant this process the tile state")
    return native.bind_matmul("int4-amx", library().int4_amx_matmul, packed, scales, group,
                              in_features=packed.shape[1] * 2, dtype=torch.bfloat16, rows_per_call=16)
