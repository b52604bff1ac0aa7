"""Decode-batch buckets: the batch sizes a decode step is padded to, and the padding itself.

A CUDA graph replays one fixed shape, so a step of any batch size is padded up to the next bucket (1, 2, 4,
8, 16, 32, 64, up to the largest batch the server decodes) and every bucket's graph is captured at start
(:mod:`engine.model.graphs`): serving then never captures or compiles on a request's time. The padding rows
feed token 0 at slot 0 of the cache's scratch row (:class:`~engine.cache.sink.SinkCache` ``scratch_row``),
which no session ever owns: they never write a live row's slots, never evict and never grow (the scratch row
has no counters, and slot 0 is all they write or read), and their logits are dropped.

On a CPU each padding row costs its share of the matmuls, so padding is a setting: on by default on CUDA,
off on a CPU (:func:`pad_decode_batches`).
"""

from __future__ import annotations

import torch

#: the bucket sizes, up to the largest decode batch (which is a bucket of its own when it is none of these)
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def pad_decode_batches(device: torch.device, setting: str = "auto") -> bool:
    """Whether decode batches are padded to buckets (and captured in CUDA graphs on a GPU): ``setting`` is
    ``EngineConfig.decode_buckets``, ``on`` or ``off``, else (``auto``) on for CUDA and off for a CPU."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda"


def bucket_sizes(max_batch: int) -> list[int]:
    """The buckets for decode batches of up to ``max_batch`` rows: ``BUCKETS`` below it, then ``max_batch``."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return [size for size in BUCKETS if size < max_batch] + [max_batch]


def bucket_for(batch: int, sizes: list[int]) -> int | None:
    """The smallest bucket that holds ``batch`` rows; None when none does (the step runs unpadded)."""
    return next((size for size in sizes if size >= batch), None)


def padded_inputs(rows: list[int], slots: list[int], tokens: list[int], bucket: int,
                  scratch_row: int) -> list[list[int]]:
    """A step's inputs padded to ``bucket`` rows: [token ids, slots (= in-cache positions), cache rows], the
    padding rows feeding token 0 at slot 0 of ``scratch_row``."""
    pad = bucket - len(rows)
    if pad < 0 or not len(rows) == len(slots) == len(tokens):
        raise ValueError(f"{len(rows)} rows, {len(slots)} slots and {len(tokens)} tokens do not pad to {bucket}")
    return [list(tokens) + [0] * pad, list(slots) + [0] * pad, list(rows) + [scratch_row] * pad]


def host_inputs(values: list | list[list[int]], device: torch.device) -> torch.Tensor:
    """Small integer inputs (int64) on the host, ready to cross to ``device``: in pinned memory for a GPU, so
    that a ``non_blocking`` copy does not block the host (the pinned block is not reused before the copy has
    run: PyTorch's host allocator records the copy's stream)."""
    host = torch.tensor(values, dtype=torch.long)
    return host.pin_memory() if device.type == "cuda" else host


def to_device(values: list | list[list[int]], device: torch.device) -> torch.Tensor:
    """Small integer inputs (int64) on ``device``, through pinned memory without blocking on a GPU."""
    return host_inputs(values, device).to(device, non_blocking=True)
