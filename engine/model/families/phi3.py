"""The owned decode step for Phi-3 (and Phi-3.5, Phi-4-mini: ``model_type`` phi3): the Llama step over
Phi-3's fused projections.

Phi-3 stores the attention's query, key and value projections as one ``qkv_proj`` (rows: the H query
heads, then the Hkv key heads, then the value heads) and the MLP's gate and up projections as one
``gate_up_proj`` (the gate's rows first); the step fuses them the same way, so its weights are those
matrices as they are. The rest is Llama's: RMSNorm, SiLU gating, RoPE, residual dropout that inference
skips. Its rotary embedding may rotate only the first ``partial_rotary_factor`` of each head (Phi-4-mini),
and may be ``longrope`` (``su`` in older configs): cos and sin come from the model's own rotary module, its
short factors and attention scaling included, for a cache no longer than ``original_max_position_embeddings``
(engine/cache/rope.py refuses a longer one). Registered for ``MODEL_TYPES`` in engine/model/families/__init__.py;
tests/engine/test_families_owned.py checks it against transformers' forward.
"""

from __future__ import annotations

import torch

from engine.model.families.llama import LlamaDecoder, shared_reason

MODEL_TYPES = ("phi3",)


def unsupported_reason(model: torch.nn.Module, quantize: str | None) -> str | None:
    """Why :class:`Phi3Decoder` cannot run ``model`` (None: it can)."""
    reason = shared_reason(model, quantize, MODEL_TYPES)
    if reason:
        return reason
    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    if getattr(attention, "qkv_proj", None) is None or getattr(mlp, "gate_up_proj", None) is None:
        return "attention or MLP without Phi-3's fused projections"
    if attention.qkv_proj.bias is not None or mlp.gate_up_proj.bias is not None:
        return "fused projections with a bias"
    if any(hasattr(attention, name) for name in ("q_norm", "k_norm", "sinks")):
        return "per-head norms or learned sinks in attention"
    return None


class Phi3Decoder(LlamaDecoder):
    """:class:`LlamaDecoder` over Phi-3's fused ``qkv_proj`` and ``gate_up_proj``."""

    unsupported_reason = staticmethod(unsupported_reason)

    def qkv_weights(self, attention: torch.nn.Module) -> tuple[torch.Tensor, None]:
        return attention.qkv_proj.weight.detach(), None

    def gate_up_weight(self, mlp: torch.nn.Module) -> torch.Tensor:
        return mlp.gate_up_proj.weight.detach()
