"""The project's C kernels (``engine/model/kernels/*.c``), compiled at start for the running CPU.

Machines differ (AVX-512 or AVX2 only; AMX on some), so each kernel is built with the system's C compiler
for ``-march=native`` into a temporary file (about a second) and loaded with ctypes; where there is no
compiler or the build fails it is simply not used, and the engine runs PyTorch's operations instead
(:mod:`engine.model.kernels.int4_rows`, :mod:`engine.model.kernels.int8_rows`, :mod:`engine.model.kernels.attention`).

The kernels use OpenMP and link to ``libgomp.so.1``, which resolves to PyTorch's own copy, already loaded
under that name (torch is imported first, at the top of this module): their parallel loops then run on the
calling thread's existing PyTorch team. A PyTorch whose copy were named otherwise would leave two runtimes,
and a second one starts teams of its own (libgomp's teams sleep between kernels once they outnumber the
CPUs): a build that maps one is refused.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch  # first: its libgomp is the one the kernels' OpenMP resolves to (openmp_runtimes)

log = logging.getLogger(__name__)

KERNELS = Path(__file__).parent
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
MATMUL_BLOCK = 32  # outputs per block of the matmul kernels' weight layouts


# the matmul kernels' one signature: (x, codes, scales, y, M, N, K, group, threads) -> 0, or -1 for a shape
# they do not take (bind_matmul)
MATMUL_SIGNATURE = (ctypes.c_int, [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int])


def build(name: str, march: str = "native", functions: dict[str, tuple] | None = None) -> ctypes.CDLL | None:
    """``kernels/<name>.c`` compiled for ``-march=march`` (``native``: this CPU; tests also build ``haswell``,
    the AVX2 path, on a CPU with AVX-512) and loaded, with ``functions`` (name -> (restype, argtypes))
    declared; None (logged) where it cannot be built or would not run on PyTorch's OpenMP."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("%s kernel: no C compiler, not used", name)
        return None
    with tempfile.TemporaryDirectory(prefix="sinkserve-kernel-") as tmp:
        target = Path(tmp) / f"{name}.so"
        try:
            subprocess.run([compiler, *FLAGS, f"-march={march}", str(KERNELS / f"{name}.c"), "-o", str(target)],
                           check=True, capture_output=True, text=True, timeout=120)
            lib = ctypes.CDLL(str(target))  # stays mapped after the directory is removed
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            log.info("%s kernel: build failed, not used: %s", name, str(detail)[-500:])
            return None
    runtimes = openmp_runtimes()
    if len(runtimes) > 1:  # the kernel's OpenMP is not PyTorch's: it would start teams of its own
        log.warning("%s kernel: not used, it loaded a second OpenMP runtime: %s", name, sorted(runtimes))
        return None
    for function, (restype, argtypes) in (functions or {}).items():
        getattr(lib, function).restype = restype
        getattr(lib, function).argtypes = argtypes
    return lib


def loader(name: str, functions: dict[str, tuple]) -> tuple[Callable[[], ctypes.CDLL | None],
                                                             Callable[[str], ctypes.CDLL | None]]:
    """``(library, build)`` of the kernel ``kernels/<name>.c`` with ``functions`` declared: ``build(march)``
    compiles and loads it for ``-march=march`` (:func:`build`; None, logged, where it cannot be built), and
    ``library()`` is the build for this CPU, made once per process (``library.__wrapped__()`` builds anew)."""

    def build_for(march: str) -> ctypes.CDLL | None:
        return build(name, march, functions)

    @cache
    def library() -> ctypes.CDLL | None:
        return build_for("native")

    return library, build_for


def openmp_runtimes() -> set[str]:
    """The OpenMP runtimes (libgomp files) mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return set()


def bind_matmul(name: str, fn, packed: torch.Tensor, scales: torch.Tensor, group: int, in_features: int,
                dtype: torch.dtype, rows_per_call: int | None):
    """``x -> y`` (M, N) float32 through the C matmul ``fn`` with the kernels' one signature ``(x, codes,
    scales, y, M, N, K, group, threads)`` over a weight laid out in blocks of 32 outputs (``packed``, first
    dimension N / 32), its pointers, sizes and the thread count worked out once: a decode step makes ~120 of
    these calls. ``x`` is taken in ``dtype``, contiguous, and passed ``rows_per_call`` rows at a time (None:
    all)."""
    n, k = packed.shape[0] * MATMUL_BLOCK, in_features
    codes_at, scales_at, threads = packed.data_ptr(), scales.data_ptr(), torch.get_num_threads()
    empty, float32 = torch.empty, torch.float32

    def run(x: torch.Tensor, packed=packed, scales=scales) -> torch.Tensor:  # the defaults keep the weights alive
        if x.dtype != dtype or not x.is_contiguous():
            x = x.to(dtype).contiguous()
        rows = x.shape[0]
        if x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"{name} kernel: input {tuple(x.shape)} for a weight of {k} input features")
        y = empty((rows, n), dtype=float32)
        if rows_per_call is None or rows <= rows_per_call:  # a decode step's case: one call, no row views
            parts = ((x.data_ptr(), y.data_ptr(), rows),)
        else:
            parts = [(x[at].data_ptr(), y[at].data_ptr(), min(rows_per_call, rows - at))
                     for at in range(0, rows, rows_per_call)]
        for x_at, y_at, part in parts:
            if fn(x_at, codes_at, scales_at, y_at, part, n, k, group, threads):
                raise ValueError(f"{name} kernel: unsupported shape {part} x {k} @ {n}, group {group}")
        return y

    return run
