"""Where the model runs: device and dtype resolution, the card's description, and GPU-sized defaults.

One place decides what ``--device`` and ``--dtype`` mean, so that ``auto``, ``cuda`` and ``cuda:0`` name one
and the same ``torch.device`` (``torch.device("cuda") != torch.device("cuda:0")`` in torch), bfloat16 is
chosen only on cards that compute in it natively (compute capability 8.0 and later: Ampere, Hopper), and
the session-cache pool and the decode batch are sized for the device they live on.

Pure functions over ``torch.cuda``'s queries, so they are tested on a CPU by monkeypatching those queries
(tests/engine/test_device.py). Sources: ``torch.cuda.is_bf16_supported``, ``torch.cuda.mem_get_info``
(cudaMemGetInfo: free and total bytes of the device), https://pytorch.org/docs/stable/notes/cuda.html.

``python -m engine.model.device`` logs torch's CUDA build and the visible cards; with ``--require-cuda`` (or
``SINKSERVE_REQUIRE_CUDA=1``) it exits 1 when CUDA is not usable, which the CUDA container image's
entry point runs first so that it never falls back to the CPU silently (docker/entrypoint.sh).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

#: share of the device memory left free after the weights load that the session-cache pool may take;
#: the rest is headroom for activations, logits, the allocator's fragmentation and compile workspaces.
GPU_CACHE_FRACTION = 0.8
#: sessions decoding together in one forward pass (the GPU target is 64 concurrent sessions)
GPU_MAX_BATCH = 64
CPU_MAX_BATCH = 8
#: resident session caches on a CPU unless configured (the host's RAM also holds offloaded sessions)
CPU_CACHE_BUDGET_BYTES = 2 * 1024**3


def on_own_thread(fn: Callable[..., T], /, *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run on a thread of its own that has ended when this returns (its exception
    raised here), so that the caller's thread never runs PyTorch's parallel CPU kernels.

    OpenMP (libgomp, which PyTorch's CPU kernels run on) keeps a team of helper threads for every thread that
    ever ran a parallel kernel, for as long as that thread lives. Once the process holds more such helpers
    than it has CPUs, every team stops spinning between kernels and sleeps on a futex instead, and each of
    the ~600 kernels of a decode step pays a wake-up. Loading a model and building the decode step run large
    parallel kernels; done on a thread that lives on (the server's loader thread, a benchmark's main thread)
    they left a second team beside the engine worker's. Measured on a 2-core host: 160-280 voluntary context
    switches a decode step against ~2 (tests/engine/test_engine_threads.py fails above 40), and in ``bench
    concurrency`` 8 streams' inter-token gap 52.4 against 40.9 ms once the benchmark's load stopped leaving one.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="sinkserve-setup") as executor:  # its thread ends on exit
        return executor.submit(fn, *args, **kwargs).result()


def cuda_build() -> str:
    """torch's build, e.g. ``torch 2.11.0+cu130, CUDA 13.0`` or ``torch 2.13.0+cpu, CPU-only build``."""
    cuda = torch.version.cuda
    return f"torch {torch.__version__}, " + (f"CUDA {cuda}" if cuda else "CPU-only build")


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the current CUDA device when CUDA is usable, else the CPU; ``cuda`` -> ``cuda:<current>``.

    CUDA devices always carry their index, so every spelling of one card compares equal. Asking for CUDA
    where it is not usable raises with the reason (a CPU-only torch, or no visible device).
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} asked for, but CUDA is not usable here ({cuda_build()}, "
                           f"{torch.cuda.device_count()} visible devices)")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", index)


def bf16_supported(device: torch.device) -> bool:
    """Native bfloat16 on this CUDA device (compute capability >= 8.0), not torch's slow emulation."""
    if device.type != "cuda":
        return False
    if device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.get_device_properties(device).major >= 8
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bfloat16 on a CUDA card that supports it (else float16, half the bytes of float32 and
    fast on every card), float32 on a CPU, whose bf16 decode is slower (README). Explicit names stand."""
    if dtype != "auto":
        if dtype == "bfloat16" and device.type == "cuda" and not bf16_supported(device):
            log.warning("bfloat16 asked for on %s, which emulates it (compute capability < 8.0): slow", device)
        return dtype
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if bf16_supported(device) else "float16"


def describe(device: torch.device) -> str:
    """One line naming the card (or the CPU) and torch's CUDA build, for the start-up log."""
    if device.type != "cuda":
        return f"{device} ({cuda_build()})"
    props = torch.cuda.get_device_properties(device)
    return (f"{device}: {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB ({cuda_build()})")


def log_device(device: torch.device, dtype: str) -> None:
    log.info("device %s, dtype %s", describe(device), dtype)


def cache_budget_bytes(device: torch.device, configured: int | None = None,
                       fraction: float = GPU_CACHE_FRACTION) -> int:
    """Bytes the resident session-cache pool may take: the configured budget when given, else on a GPU
    ``fraction`` of the memory free on the device *now* (call it after the weights load), else 2 GiB."""
    if configured is not None:
        return int(configured)
    if device.type != "cuda":
        return CPU_CACHE_BUDGET_BYTES
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    free, total = torch.cuda.mem_get_info(device)
    budget = int(free * fraction)
    log.info("session cache pool: %.2f GiB (%.0f%% of %.2f GiB free of %.2f GiB on %s)",
             budget / 2**30, fraction * 100, free / 2**30, total / 2**30, device)
    return budget


def pool_rows(budget_bytes: int, bytes_per_row: int, max_rows: int, reserved: int = 0) -> int:
    """Session-cache rows that fit ``budget_bytes`` (at most ``max_rows``) beside ``reserved`` rows no session
    owns (the scratch row of padded decode batches); at least one, or an error."""
    rows = min(budget_bytes // bytes_per_row - reserved, max_rows)
    if rows < 1:
        raise ValueError(f"memory budget {budget_bytes} B is below one session ({bytes_per_row} B)"
                         + (f" beside {reserved} reserved rows" if reserved else ""))
    return int(rows)


def default_max_batch(device: torch.device, configured: int | None = None) -> int:
    """Decode rows per step: the configured value, else 64 on a GPU (one pass costs about the same for 1
    or 64 rows there) and 8 on a CPU (where each row adds its own matmul time)."""
    if configured is not None:
        return configured
    return GPU_MAX_BATCH if device.type == "cuda" else CPU_MAX_BATCH


def require_cuda(spec: str = "auto") -> torch.device:
    """The CUDA device ``spec`` names (``auto`` included), or RuntimeError saying why there is none."""
    device = resolve_device(spec)
    if device.type != "cuda":
        raise RuntimeError(f"CUDA is required but not usable ({cuda_build()}, "
                           f"{torch.cuda.device_count()} visible devices): check the NVIDIA driver and the "
                           "container's GPU access (docker run --gpus all), or set SINKSERVE_REQUIRE_CUDA=0 "
                           "to run on the CPU")
    return device


def main(argv: list[str] | None = None) -> int:
    """Log torch's build and the devices; exit 1 when CUDA is required and not usable."""
    parser = argparse.ArgumentParser(prog="python -m engine.model.device", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=os.environ.get("SINKSERVE_DEVICE", "auto"))
    parser.add_argument("--require-cuda", action="store_true",
                        default=os.environ.get("SINKSERVE_REQUIRE_CUDA", "0").strip().lower() in ("1", "true", "yes"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    log.info("%s; torch.version.cuda=%s; %d CUDA devices visible", cuda_build(), torch.version.cuda,
             torch.cuda.device_count() if torch.cuda.is_available() else 0)
    try:
        device = require_cuda(args.device) if args.require_cuda else resolve_device(args.device)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    log.info("device %s", describe(device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
