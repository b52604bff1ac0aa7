"""A float64 reference of the sink-cache policy, written independently of engine/cache/sink.py.

It stores keys *un-rotated* (undoing the model's rotation exactly in float64) and rotates every key at
its current slot position on each read, so it has no re-rotation at all: the exact answer that the
production cache's block re-rotation must match.
"""

from __future__ import annotations

import math

import torch


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE in rotate_half layout at ``positions`` (T,), x: (H, T, D), all float64."""
    angle = positions[:, None].double() * inv_freq[None, :]  # (T, D/2)
    cos, sin = torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin()  # (T, D)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class ReferenceCache:
    """One sequence; raw keys; sinks + window with block eviction, positions = slot indices."""

    def __init__(self, num_layers: int, capacity: int, sink_tokens: int, evict_block: int, inv_freqs):
        self.capacity, self.sinks, self.block = capacity, sink_tokens, evict_block
        self.inv_freqs = [f.double() for f in inv_freqs]
        self.raw_k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0

    def begin(self, new_tokens: int) -> int:
        """Evict for ``new_tokens``; returns the first new position."""
        overflow = self.length + new_tokens - self.capacity
        if overflow > 0:
            evict = min(math.ceil(overflow / self.block) * self.block, self.length - self.sinks)
            for layer, (k, v) in enumerate(zip(self.raw_k, self.v, strict=True)):
                keep = torch.cat([k[:, : self.sinks], k[:, self.sinks + evict :]], dim=1)
                self.raw_k[layer] = keep
                self.v[layer] = torch.cat([v[:, : self.sinks], v[:, self.sinks + evict :]], dim=1)
            self.length -= evict
        self.start, self.new = self.length, new_tokens
        self.length += new_tokens
        return self.start

    def update(self, key, value, layer_idx, *args, **kwargs):
        positions = torch.arange(self.start, self.start + self.new)
        raw = _rotate(key[0].double(), -positions, self.inv_freqs[layer_idx])  # undo the model's rotation
        k, v = self.raw_k[layer_idx], self.v[layer_idx]
        self.raw_k[layer_idx] = raw if k is None else torch.cat([k, raw], dim=1)
        self.v[layer_idx] = value[0].double() if v is None else torch.cat([v, value[0].double()], dim=1)
        all_positions = torch.arange(self.length)
        keys = _rotate(self.raw_k[layer_idx], all_positions, self.inv_freqs[layer_idx])
        return keys[None], self.v[layer_idx][None]

    def mask(self) -> torch.Tensor:
        q = torch.arange(self.start, self.start + self.new)[:, None]
        return (torch.arange(self.length)[None, :] <= q)[None, None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start
