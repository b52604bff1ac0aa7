"""Rotary position embedding facts the cache needs: per-layer frequencies and exact re-rotation.

RoPE (Su et al. 2021, arXiv 2104.09864) rotates each pair of key dimensions (i, i + d/2) by the angle
``position * inv_freq[i]`` (the "rotate_half" layout used by every transformers model we serve). Two
rotations compose by adding angles, so a key stored at position p is moved to position p - e by one
rotation of angle ``-e * inv_freq``. We compute that angle in float64 and apply it in float32 (or float64),
never in the cache's storage dtype, and a key is shifted at most ``window / evict_block`` times in its
life (it is evicted once it has moved ``window`` slots), so rounding cannot accumulate over a stream.

Models whose positions are not a fixed rotation (dynamic NTK scaling, multimodal RoPE, ALiBi, learned
absolute positions) are refused by :func:`layer_inv_freqs` with a reason.
"""

from __future__ import annotations

import torch

# rope types whose angle is position * a fixed inv_freq (scaling only changes inv_freq / attention_scaling)
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "longrope"}


class UnsupportedModelError(ValueError):
    """The model cannot be served by a sink cache with in-cache positions."""


def _rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} has no rotary position embedding: a sink cache re-assigns positions, "
        "which only works with RoPE models"
    )


def _rope_types(config) -> dict[str, dict]:
    params = getattr(config, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return params  # per layer type (Gemma 3)
    return {"default": params}


def check_rope(config, cache_size: int) -> None:
    """Raise UnsupportedModelError when positions in the cache would not be a fixed rotation."""
    for layer_type, params in _rope_types(config).items():
        rope_type = params.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope_type {rope_type!r} ({layer_type}) changes frequencies with sequence length; "
                f"sinkserve supports {sorted(STATIC_ROPE_TYPES)}"
            )
        if rope_type == "longrope":
            original = params.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None
            )
            if original is not None and cache_size > original:
                raise UnsupportedModelError(
                    f"longrope switches frequencies past {original} positions; use a cache of at most that size"
                )
    if getattr(config, "rope_scaling", None) and (config.rope_scaling or {}).get("mrope_section"):
        raise UnsupportedModelError("multimodal RoPE (mrope) is not supported")


def layer_inv_freqs(model: torch.nn.Module, num_layers: int) -> list[torch.Tensor]:
    """The inverse frequencies each layer's keys were rotated with, as float64 on CPU."""
    rotary = _rotary_module(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if hasattr(rotary, "inv_freq"):
        inv = rotary.inv_freq.detach().to("cpu", torch.float64)
        return [inv] * num_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [getattr(rotary, f"{t}_inv_freq").detach().to("cpu", torch.float64) for t in layer_types]
    raise UnsupportedModelError(f"cannot find RoPE frequencies on {type(rotary).__name__}")


def rotation(inv_freq: torch.Tensor, shift: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``shift * inv_freq`` in rotate_half layout, shape (rot_dim,), computed in float64."""
    angle = shift * inv_freq.to(torch.float64)  # (rot_dim/2,)
    angle = torch.cat([angle, angle])  # (rot_dim,)
    return angle.cos().to(device, dtype), angle.sin().to(device, dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``len(cos)`` dims of x (..., D) by the given angles (rotate_half layout)."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def rotate_float32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`rotate` computed in float32 (``cos``/``sin`` float32) into a single float32 temporary (storing
    it into the cache casts it to the cache's dtype): the cache's re-rotation of a whole window on
    eviction, where :func:`rotate`'s four window-sized temporaries cost more than the arithmetic. The same
    products and sums per element."""
    rot_dim, half = cos.shape[-1], cos.shape[-1] // 2
    x = x.float()  # a view when x is float32 already
    out = torch.empty_like(x)  # (..., D)
    first, second = x[..., :half], x[..., half:rot_dim]
    torch.mul(first, cos[:half], out=out[..., :half])
    out[..., :half].addcmul_(second, sin[:half], value=-1)  # x1 cos - x2 sin
    torch.mul(second, cos[half:], out=out[..., half:rot_dim])
    out[..., half:rot_dim].addcmul_(first, sin[half:])  # x2 cos + x1 sin
    if rot_dim < x.shape[-1]:
        out[..., rot_dim:] = x[..., rot_dim:]
    return out
