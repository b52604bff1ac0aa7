"""The owned decode step for Qwen3: the Llama step with an RMS norm over each query and key head.

Qwen3 (transformers' ``Qwen3Attention``) normalises every query head with ``q_norm`` and every key head
with ``k_norm`` (RMSNorm over the head dimension, one weight shared by all heads of its kind) after the
projections and before RoPE. The step is :class:`~engine.model.families.llama.LlamaDecoder`'s, with those
weights laid out once as one (H + Hkv, D) table so each layer normalises all its heads in one call; the
keys the cache stores are the normalised, rotated ones, as transformers writes them. Registered for
``MODEL_TYPES`` in engine/model/families/__init__.py; tests/engine/test_families_owned.py checks it against
transformers' forward.
"""

from __future__ import annotations

import torch

from engine.model.families.llama import LlamaDecoder, shared_reason, split_projections_reason

MODEL_TYPES = ("qwen3",)


def unsupported_reason(model: torch.nn.Module, quantize: str | None) -> str | None:
    """Why :class:`Qwen3Decoder` cannot run ``model`` (None: it can)."""
    reason = shared_reason(model, quantize, MODEL_TYPES)
    if reason:
        return reason
    layer = model.model.layers[0]
    attention = layer.self_attn
    if getattr(attention, "q_norm", None) is None or getattr(attention, "k_norm", None) is None:
        return "attention without per-head q/k norms"
    if hasattr(attention, "sinks"):
        return "learned sinks in attention"
    return split_projections_reason(layer)


class Qwen3Decoder(LlamaDecoder):
    """:class:`LlamaDecoder` with Qwen3's per-head q/k RMS norms."""

    unsupported_reason = staticmethod(unsupported_reason)

    def head_norms(self, attention: torch.nn.Module) -> torch.Tensor:
        q, k = attention.q_norm.weight.detach(), attention.k_norm.weight.detach()  # (D,) each
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError("the owned decode step does not cover this model: q/k norms over more than a head")
        return torch.cat([q.expand(self.heads, -1), k.expand(self.kv_heads, -1)]).contiguous()
